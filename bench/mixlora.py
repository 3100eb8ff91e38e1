"""LoRA vs MixLoRA at a matched trainable-parameter count, on the quickstart model and data.

    python bench/mixlora.py [--steps 300] [--rounds 1] [--recipe configs/quickstart.yaml] [--set KEY=VALUE ...]
                            [--out bench/results]

Every contender fine-tunes ``configs/quickstart.yaml`` (2-layer Llama, hidden 128, intermediate 512, fp32, batch 32,
cosine with 10% warm-up, lr 2e-3, seed 42, dropout 0) for ``--steps`` steps with eval_steps=0, save_steps=0,
plots=false, logging_steps=10 and a temporary output_dir, each in its own subprocess, once per torch thread count
(``--threads``, default ``2 1``: the other benches' setting and a single-thread row), one after the other; with
``--rounds 2`` the second round runs in reverse order. Contenders (trainable parameters within 1.1% of each other;
the table lists them):

* ``lora``: the quickstart's LoRA, r 32, alpha 64, on all 7 projections: 188,416 parameters;
* ``mixlora-4x8``: MixLoRA, 4 experts, top-2, attention LoRA r 32 / alpha 64 as above, expert LoRA r 8 / alpha 16
  (the same alpha / r) on gate/up/down, fp32 routers: 189,440;
* ``mixlora-8x4``: 8 experts, top-2, expert LoRA r 4 / alpha 8: 190,464.

The router settings are the recipe defaults (aux-loss coefficient 0.001, router init 0.02, no jitter). Measured:

* step time: wall time between the ends of consecutive ``Trainer.optimizer_step`` calls, first 10 steps left
  out; median over runs of each run's median;
* memory: peak RSS (``ru_maxrss``) and the RSS added by training (kernel peak mark reset via /proc/self/clear_refs
  at the start of the Trainer, minus the RSS then). A 0.8M-parameter model: both are dominated by the interpreter,
  activations and the allocator, not by the adapter;
* quality: train loss (mean of the last 10 steps; MixLoRA's includes the aux term, ~coef x top_k = 0.002), eval
  loss on all 240 held-out rows and exact match of greedy answers on 120 of them, both after training, by
  slimtune's ``evaluate.eval_loss`` / ``exact_match_score`` (the LM loss only);
* router balance (MixLoRA): the router load slimtune logs in metrics.jsonl (each expert's share of the top-k
  assignments of non-padding tokens since the previous log, averaged over layers), over the last 50 steps: the
  largest share x num_experts (1.0 = perfectly balanced, num_experts / top_k = collapsed onto top_k experts) and
  the normalised entropy of the per-layer shares (1.0 = balanced).

``--set`` changes every contender's recipe the same way, e.g. a realistic width for the step ratio alone
(``--set model.architecture.hidden_size=1024 --set model.architecture.intermediate_size=2816 --set
model.architecture.num_attention_heads=8 --steps 30 --threads 2 --out bench/results/mixlora-wide``: the quality
columns mean little after 30 steps).

Writes bench/results/mixlora.{md,json,png}. Wall-clock numbers on a shared machine: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer import SKIP, machine  # bench/trainer.py: same warm-up skip and machine line

LABELS = {"lora": "LoRA r32", "mixlora-4x8": "MixLoRA 4 experts, r8", "mixlora-8x4": "MixLoRA 8 experts, r4"}
CONTENDERS = {
    "lora": [],
    "mixlora-4x8": ["adapter.type=mixlora", "adapter.num_experts=4", "adapter.top_k=2", "adapter.expert_lora.r=8",
                    "adapter.expert_lora.alpha=16"],
    "mixlora-8x4": ["adapter.type=mixlora", "adapter.num_experts=8", "adapter.top_k=2", "adapter.expert_lora.r=4",
                    "adapter.expert_lora.alpha=8"],
}
LOG_EVERY = 10


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------- one contender (child process)
def child(name: str, recipe_path: str, steps: int, json_path: str, threads: int, sets: list[str]) -> None:
    import torch

    torch.set_num_threads(threads)
    from slimtune.finetune.build import prepare
    from slimtune.finetune.evaluate import eval_loss, exact_match_score
    from slimtune.finetune.metrics import read_metrics
    from slimtune.finetune.recipe import load_recipe
    from slimtune.finetune.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(recipe_path, [
            f"training.max_steps={steps}", "training.eval_steps=0", "output.save_steps=0", "output.plots=false",
            f"output.logging_steps={LOG_EVERY}", "data.metric_samples=120", f"output.output_dir={tmp}/run",
            "output.overwrite_output_dir=true", *CONTENDERS[name], *sets])
        t, prep = recipe.training, prepare(recipe)
        eval_examples, prep.eval_examples = prep.eval_examples, None  # evaluated once below, the same way for all
        setup_peak = peak_rss()
        start_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        try:  # reset the kernel's peak-RSS mark (what ru_maxrss reads) to the current RSS; Linux >= 4.0
            was_reset = Path("/proc/self/clear_refs").write_text("5") == 1
        except OSError:
            was_reset = False
        trainer, run = Trainer(recipe, prep, progress=False), {"ends": []}
        def on_step(step, began, ended, tokens):
            run.setdefault("begin", began)
            run["ends"].append(ended)

        trainer.on_step = on_step
        run["losses"] = trainer.train().losses
        run.update(peak_rss_bytes=max(setup_peak, peak_rss()),
                   added_rss_bytes=peak_rss() - start_rss if was_reset else None,
                   params=sum(p.numel() for _, p in trainer.params), threads=torch.get_num_threads(),
                   lr=t.learning_rate)
        records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
        run["router_load"] = [{"step": r["step"], "mean": r["router_load"], "per_layer": r["router_load_per_layer"]}
                              for r in records if r.get("router_load")]
        started = time.perf_counter()
        run["eval_loss"] = eval_loss(prep.model, eval_examples, t.per_device_eval_batch_size,
                                     prep.tokenizer.pad_token_id, prep.device, t.bf16)
        run["exact_match"], _ = exact_match_score(prep.model, prep.tokenizer, prep.eval_pairs,
                                                  recipe.data.max_new_tokens, t.per_device_eval_batch_size,
                                                  prep.device, t.bf16)
        run["eval_seconds"] = time.perf_counter() - started
        run["eval_rows"], run["metric_rows"] = len(eval_examples), len(prep.eval_pairs)
    Path(json_path).write_text(json.dumps(run))


# --------------------------------------------------------------------------------------- report (parent process)
def balance(loads: list[dict], last_steps: int = 50) -> dict | None:
    """Router balance over the logs of the last ``last_steps`` steps (see the module docstring)."""
    if not loads:
        return None
    final = loads[-1]["step"]
    window = [r for r in loads if r["step"] > final - last_steps]
    experts = len(window[0]["mean"])
    mean = [statistics.fmean(col) for col in zip(*(r["mean"] for r in window))]
    layers = [[statistics.fmean(col) for col in zip(*(r["per_layer"][i] for r in window))]
              for i in range(len(window[0]["per_layer"]))]
    entropy = [-sum(p * math.log(p) for p in row if p > 0) / math.log(experts) for row in layers]
    return {"mean_share": mean, "per_layer_share": layers, "max_share_x_experts": max(max(r) for r in layers) * experts,
            "min_share_x_experts": min(min(r) for r in layers) * experts, "entropy": statistics.fmean(entropy)}


def summarize(runs: list[dict]) -> dict:
    """One contender: timing and memory as the median over its runs, the rest (deterministic) from the first."""
    def med_step(run):
        times = [b - a for a, b in zip([run["begin"]] + run["ends"], run["ends"])][SKIP:]
        return 1e3 * statistics.median(times)

    r = runs[0]
    return {"steps": len(r["ends"]), "lr": r["lr"], "params": r["params"], "threads": r["threads"],
            "runs_step_ms": [round(med_step(x), 2) for x in runs],
            "median_step_ms": statistics.median(med_step(x) for x in runs),
            "peak_rss_mib": statistics.median(x["peak_rss_bytes"] for x in runs) / 2**20,
            "added_rss_mib": (statistics.median(x["added_rss_bytes"] for x in runs) / 2**20
                              if r["added_rss_bytes"] is not None else float("nan")),
            "final_train_loss": statistics.fmean(r["losses"][-10:]), "eval_loss": r["eval_loss"],
            "exact_match": r["exact_match"], "eval_seconds": statistics.median(x["eval_seconds"] for x in runs),
            "eval_rows": r["eval_rows"], "metric_rows": r["metric_rows"], "balance": balance(r["router_load"])}


def table(stats: dict, header: str) -> str:
    """One row per (contender, thread count); the step ratio is against LoRA at the same thread count."""
    cols = ("adapter | torch threads | trainable params | peak RSS (MiB) | RSS added by training (MiB) | median step "
            "(ms) | step / LoRA | train loss | eval loss | exact match | eval + generation (s) | router: max share x E "
            "| router: min share x E | router: load entropy | median step of each run (ms)")
    lines = [header, "", f"| {cols} |", "|---|" + "---:|" * 13 + "---|"]
    for key, s in stats.items():
        name, threads = key.split("@")
        base, b = stats[f"lora@{threads}"], s["balance"]
        router = (f"{b['max_share_x_experts']:.2f} | {b['min_share_x_experts']:.2f} | {b['entropy']:.3f}" if b
                  else "— | — | —")
        lines.append(
            f"| {LABELS[name]} | {threads} | {s['params']:,} | {s['peak_rss_mib']:.0f} | {s['added_rss_mib']:.0f} | "
            f"{s['median_step_ms']:.1f} | {s['median_step_ms'] / base['median_step_ms']:.2f}x | "
            f"{s['final_train_loss']:.4f} | {s['eval_loss']:.4f} | {s['exact_match']:.1%} | {s['eval_seconds']:.1f} | "
            f"{router} | {s['runs_step_ms']} |")
    return "\n".join(lines) + "\n"


def plot(losses: dict, stats: dict, loads: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routed = [n for n in stats if stats[n]["balance"]]
    fig, axes = plt.subplots(1, 1 + len(routed), figsize=(6 + 5 * len(routed), 4.5),
                             width_ratios=[1.4] + [1] * len(routed))
    ax_loss, load_axes = axes[0], axes[1:]
    colors = {"lora": "black", "mixlora-4x8": "tab:blue", "mixlora-8x4": "tab:red"}
    for name, curve in losses.items():
        ax_loss.plot(range(1, len(curve) + 1), curve, color=colors[name], lw=1, label=LABELS[name])
    ax_loss.set(xlabel="optimizer step", ylabel="train loss", yscale="log", title="per-step training loss")
    ax_loss.legend(fontsize=8)
    for ax, name in zip(load_axes, routed):
        steps = [r["step"] for r in loads[name]]
        experts = len(loads[name][0]["mean"])
        for e in range(experts):
            ax.plot(steps, [r["mean"][e] for r in loads[name]], lw=1, label=f"expert {e}")
        ax.axhline(1 / experts, color="gray", ls=":", lw=1, label="balanced")
        ax.set(xlabel="optimizer step", ylabel="share of routed tokens (mean over layers)", ylim=(0, None),
               title=f"{LABELS[name]}: router load")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=1, help="each contender runs this many times (2nd round reversed)")
    ap.add_argument("--only", nargs="*", choices=list(LABELS), help="run only these contenders")
    ap.add_argument("--recipe", default="configs/quickstart.yaml")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                    help="torch thread counts; every contender runs at each (the other benches: 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every contender, e.g. model.architecture.hidden_size=1024")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", choices=list(LABELS), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.recipe, a.steps, a.json, a.threads[0], a.set)
    if a.steps <= SKIP:
        ap.error(f"--steps must exceed the {SKIP} warm-up steps left out of the statistics")
    names = [n for n in LABELS if not a.only or n in a.only]
    if "lora" not in names:
        ap.error("the LoRA reference (lora) must be among the contenders")
    keys = [f"{n}@{t}" for t in a.threads for n in names]
    order = [k for r in range(a.rounds) for k in (keys if r % 2 == 0 else keys[::-1])]
    out, all_runs = Path(a.out), {k: [] for k in keys}
    out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for i, key in enumerate(order):  # one after the other: they never compete for the cores
            name, threads = key.split("@")
            print(f"run {i + 1}/{len(order)}: {LABELS[name]}, {threads} thread(s) ({a.steps} steps) ...",
                  file=sys.stderr, flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
                   "PYTHONWARNINGS": "ignore", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
            path = Path(tmp) / f"{name}-{threads}-{i}.json"
            subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(a.steps), "--recipe", a.recipe,
                            "--threads", threads, "--json", str(path), *(f"--set={kv}" for kv in a.set)],
                           check=True, env=env)
            all_runs[key].append(json.loads(path.read_text()))
    stats = {k: summarize(rs) for k, rs in all_runs.items()}
    first = a.threads[0]  # curves and router loads from the first thread count (the math is the same)
    losses = {n: all_runs[f"{n}@{first}"][0]["losses"] for n in names}
    loads = {n: all_runs[f"{n}@{first}"][0]["router_load"] for n in names}
    host, s0, load_end = machine(), stats[f"lora@{first}"], os.getloadavg()[0]
    header = (
        f"## LoRA vs MixLoRA on the quickstart model ({a.recipe}{''.join(', ' + kv for kv in a.set)}, {a.steps} "
        f"steps, batch 32, lr {s0['lr']:g}, torch threads {', '.join(map(str, a.threads))})\n\nMachine: {host}\n\n"
        f"Matched trainable parameters (column). MixLoRA: top-2, attention LoRA r 32, expert LoRA as labelled (alpha "
        f"/ r = 2 everywhere), recipe-default router settings. {a.rounds} round(s); step time = median over runs of "
        f"each run's median, first {SKIP} steps skipped. Eval loss on {s0['eval_rows']} held-out rows, exact match on "
        f"{s0['metric_rows']}; router columns over the last 50 steps (max/min share x E: 1.0 = balanced). One seed. "
        f"1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end ({os.cpu_count()} cores): "
        f"above the core count other jobs shared the machine, and step times are noisy. Total bench time "
        f"{time.perf_counter() - started:.0f} s.")
    text = table(stats, header)
    print(text)
    (out / "mixlora.md").write_text(text)
    (out / "mixlora.json").write_text(json.dumps({
        "machine": host, "recipe": a.recipe, "steps": a.steps, "rounds": a.rounds, "skip": SKIP, "stats": stats,
        "losses": losses, "router_load": loads, "load_average": [load_start, load_end]}, indent=2) + "\n")
    plot(losses, {n: stats[f"{n}@{first}"] for n in names}, loads,
         f"LoRA vs MixLoRA, quickstart model, {a.steps} steps — {host}", out / "mixlora.png")
    print(f"wrote {out / 'mixlora.md'}, {out / 'mixlora.json'}, {out / 'mixlora.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
