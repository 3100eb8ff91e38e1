"""slimtune's memory-lean optimizers side by side: AdamW, GaLore, FRUGAL, SPAM, MeZO, plus galore-torch as a peer.

    python bench/optimizers.py [--steps 300] [--rounds 2] [--mezo-long-steps 1500] [--lr galore=3e-3 ...]

Every contender fine-tunes the same tiny model: ``configs/quickstart.yaml`` (2-layer Llama, hidden 128, intermediate
512, fp32, batch 32, cosine with 10% warm-up, seed 42) with ``adapter.type=none`` (full-parameter training, so the
projection methods act on real 128x128 / 128x512 weight matrices), ``training.max_grad_norm=0`` for every method
(MeZO has no gradient to clip, SPAM clips spikes itself: no global clipping anywhere, for uniformity),
eval_steps=0, save_steps=0, plots=false and a per-method learning rate (``LR`` below, from short sweeps). Method
settings, scaled to this model and run length (gap = steps // 3): GaLore rank 32 (< min(m, n) = 128),
update_proj_gap gap, scale 0.25; FRUGAL density 0.25, update_gap gap (columns, sign-SGD on the rest); SPAM
delta_t gap, warmup_steps 10, grad_accu_steps 5 (dense); MeZO eps 1e-3, one SPSA sample; mezo-long: MeZO for
``--mezo-long-steps`` steps (its usual regime is 10-100x the steps of first-order methods; one round only).

The peer, galore-torch 1.0 (PyPI; installed by the test-only dev extra, ``pip install -e '.[dev]'``; the column is
skipped with the reason if it does not import), runs inside the *same* slimtune Trainer on the same
model, data, param groups (``split_targets`` + ``decay_groups``, group keys rank/update_proj_gap/scale/proj_type) and
hyperparameters as our GaLore: ``trainer.optimizer`` is replaced by ``galore_torch.GaLoreAdamW`` and
``trainer.scheduler`` rebuilt with ``get_scheduler`` as the Trainer does, so only the optimizer class differs.

Each run is its own subprocess (``prepare(recipe)`` + ``Trainer(...).train()``, torch.set_num_threads(2)); with
``--rounds 2`` every contender runs twice, the second round in reverse order. Measured:

* step time: wall time between the ends of consecutive ``Trainer.optimizer_step`` calls (wrapped), first 10 steps
  left out; the table gives the median over runs of each run's median, and its ratio to AdamW's;
* optimizer state: predicted = ``slimtune.optimizers.optimizer_state_bytes`` (not defined for the peer);
  allocated = bytes of every tensor in ``optimizer.state`` after training (the peer's GaLoreProjector object:
  its ``ortho_matrix`` counted too). Ratio: allocated / AdamW's allocated;
* peak RSS: ``ru_maxrss`` after training; "added by training": the peak from the start of the Trainer (kernel
  peak mark reset via /proc/self/clear_refs) minus the RSS then. On a 0.6M-parameter model both are dominated by
  the interpreter, activations and allocator, not by optimizer state (AdamW's state here is ~4.6 MiB);
* quality: train loss (mean of the last 10 step losses; MeZO logs L(theta + eps z)), eval loss on all 240
  held-out rows and exact match of greedy answers on 120 of them, both after training by slimtune's
  ``evaluate.eval_loss`` / ``exact_match_score``;
* GaLore vs galore-torch: the largest per-step train-loss difference (same math: small float differences only).

Writes bench/results/optimizers.{md,json,png}. Wall-clock numbers on a shared machine: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
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

LABELS = {"adamw": "AdamW (torch)", "adamw-8bit": "AdamW, 8-bit state", "galore": "GaLore",
          "galore-randomized": "GaLore, randomized SVD refresh",
          "galore-torch": "galore-torch 1.0 (peer)",
          "frugal": "FRUGAL", "spam": "SPAM", "mezo": "MeZO", "mezo-long": "MeZO, long run"}
# Learning rates: lowest eval loss in 150-step sweeps on this model (adamw 1e-3/2e-3/4e-3, galore 2e-3/4e-3/1e-2/
# 2e-2, frugal 1e-3/2e-3/4e-3, spam 1e-3/2e-3/4e-3, mezo 3e-4/1e-3/3e-3/1e-2: 3e-3 and up diverge); --lr NAME=LR.
LR = {"adamw": 1e-3, "adamw-8bit": 1e-3, "galore": 1e-2, "galore-randomized": 1e-2, "galore-torch": 1e-2,
      "frugal": 2e-3, "spam": 1e-3,
      "mezo": 1e-3, "mezo-long": 5e-4}


def optimizer_overrides(name: str, steps: int) -> list[str]:
    gap = max(1, steps // 3)
    galore = ["optimizer.name=galore", "optimizer.rank=32", f"optimizer.update_proj_gap={gap}", "optimizer.scale=0.25"]
    return {"adamw": ["optimizer.name=adamw"], "adamw-8bit": ["optimizer.name=adamw", "optimizer.state_bits=8"],
            "galore": galore, "galore-torch": galore,
            "galore-randomized": galore + ["optimizer.svd_method=randomized"],
            "frugal": ["optimizer.name=frugal", "optimizer.density=0.25", f"optimizer.update_gap={gap}"],
            "spam": ["optimizer.name=spam", f"optimizer.delta_t={gap}", "optimizer.warmup_steps=10",
                     "optimizer.grad_accu_steps=5"],
            "mezo": ["optimizer.name=mezo"], "mezo-long": ["optimizer.name=mezo"]}[name]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def allocated_bytes(optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` (and tensor attributes of objects kept there)."""
    import torch

    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            found = [v] if isinstance(v, torch.Tensor) else list(getattr(v, "__dict__", {}).values())
            total += sum(t.numel() * t.element_size() for t in found if isinstance(t, torch.Tensor))
    return total


def use_galore_torch(trainer, recipe) -> None:
    """Swap galore_torch.GaLoreAdamW (same groups and hyperparameters as build_galore) into a slimtune Trainer."""
    import galore_torch
    from transformers import get_scheduler

    from slimtune.finetune.trainer import warmup_steps
    from slimtune.optimizers import decay_groups, split_targets

    o, t = recipe.optimizer, recipe.training
    targets, rest = split_targets(trainer.params, o.target_modules)
    groups = decay_groups(rest, t.weight_decay)
    groups.append({"params": [p for _, p in targets], "rank": o.rank, "update_proj_gap": o.update_proj_gap,
                   "scale": o.scale, "proj_type": o.proj_type, "weight_decay": t.weight_decay})
    trainer.optimizer = galore_torch.GaLoreAdamW(groups, lr=t.learning_rate, betas=tuple(o.betas), eps=o.eps,
                                                 weight_decay=t.weight_decay, no_deprecation_warning=True)
    trainer.scheduler = get_scheduler(t.lr_scheduler_type, trainer.optimizer,
                                      num_warmup_steps=warmup_steps(recipe, trainer.steps),
                                      num_training_steps=trainer.steps)


# --------------------------------------------------------------------------------------- one contender (child process)
def child(name: str, recipe_path: str, steps: int, lr: float, json_path: str) -> None:
    import torch

    torch.set_num_threads(2)
    from slimtune.finetune.build import prepare
    from slimtune.finetune.evaluate import eval_loss, exact_match_score
    from slimtune.finetune.recipe import load_recipe
    from slimtune.finetune.trainer import Trainer
    from slimtune.optimizers import optimizer_state_bytes

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(recipe_path, [
            "adapter.type=none", f"training.max_steps={steps}", f"training.learning_rate={lr}",
            "training.max_grad_norm=0", "training.eval_steps=0", "output.save_steps=0", "output.plots=false",
            "output.logging_steps=50", "data.metric_samples=120", f"output.output_dir={tmp}/run",
            "output.overwrite_output_dir=true", *optimizer_overrides(name, steps)])
        t, prep = recipe.training, prepare(recipe)
        eval_examples, prep.eval_examples = prep.eval_examples, None  # evaluated once below, the same way for all
        setup_peak = peak_rss()
        start_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        try:  # reset the kernel's peak-RSS mark (what ru_maxrss reads) to the current RSS; Linux >= 4.0
            was_reset = Path("/proc/self/clear_refs").write_text("5") == 1
        except OSError:
            was_reset = False
        trainer, run = Trainer(recipe, prep, progress=False), {"ends": []}
        if name == "galore-torch":
            use_galore_torch(trainer, recipe)
        run["predicted_state_bytes"] = None if name == "galore-torch" else optimizer_state_bytes(trainer.optimizer)
        def on_step(step, began, ended, tokens):
            run.setdefault("begin", began)
            run["ends"].append(ended)

        trainer.on_step = on_step
        run["losses"] = trainer.train().losses
        run.update(allocated_state_bytes=allocated_bytes(trainer.optimizer), peak_rss_bytes=max(setup_peak, peak_rss()),
                   added_rss_bytes=peak_rss() - start_rss if was_reset else None, lr=lr,
                   params=sum(p.numel() for _, p in trainer.params), threads=torch.get_num_threads())
        run["eval_loss"] = eval_loss(prep.model, eval_examples, t.per_device_eval_batch_size,
                                     prep.tokenizer.pad_token_id, prep.device, t.bf16)
        run["exact_match"], _ = exact_match_score(prep.model, prep.tokenizer, prep.eval_pairs,
                                                  recipe.data.max_new_tokens, t.per_device_eval_batch_size,
                                                  prep.device, t.bf16)
        run["eval_rows"], run["metric_rows"] = len(eval_examples), len(prep.eval_pairs)
    Path(json_path).write_text(json.dumps(run))


# --------------------------------------------------------------------------------------- report (parent process)
def ensure_peer() -> str | None:
    """None when galore-torch imports in this interpreter (the dev extra installs it), else why not."""
    r = subprocess.run([sys.executable, "-c", "import galore_torch"], capture_output=True, text=True, check=False)
    if r.returncode == 0:
        return None
    return f"import galore_torch failed ({r.stderr.strip().splitlines()[-1:]}); install it: pip install -e '.[dev]'"


def summarize(runs: list[dict]) -> dict:
    """One contender: timing and memory as the median over its runs, the rest (deterministic) from the first."""
    def med_step(run):
        times = [b - a for a, b in zip([run["begin"]] + run["ends"], run["ends"])][SKIP:]
        return 1e3 * statistics.median(times)

    r = runs[0]
    return {"steps": len(r["ends"]), "lr": r["lr"], "runs_step_ms": [round(med_step(x), 2) for x in runs],
            "median_step_ms": statistics.median(med_step(x) for x in runs),
            "predicted_state_mib": None if r["predicted_state_bytes"] is None else r["predicted_state_bytes"] / 2**20,
            "allocated_state_mib": r["allocated_state_bytes"] / 2**20,
            "peak_rss_mib": statistics.median(x["peak_rss_bytes"] for x in runs) / 2**20,
            "added_rss_mib": (statistics.median(x["added_rss_bytes"] for x in runs) / 2**20
                              if r["added_rss_bytes"] is not None else float("nan")),
            "final_train_loss": statistics.fmean(r["losses"][-10:]), "eval_loss": r["eval_loss"],
            "exact_match": r["exact_match"], "params": r["params"], "eval_rows": r["eval_rows"],
            "metric_rows": r["metric_rows"], "threads": r["threads"]}


def table(stats: dict, header: str) -> str:
    a = stats["adamw"]
    cols = ("optimizer | steps | lr | state predicted (MiB) | state allocated (MiB) | state / AdamW | peak RSS (MiB) | "
            "RSS added by training (MiB) | median step (ms) | step / AdamW | train loss | eval loss | exact match | "
            "median step of each run (ms)")
    lines = [header, "", f"| {cols} |", "|---|" + "---:|" * 12 + "---|"]
    for name, s in stats.items():
        pred = "—" if s["predicted_state_mib"] is None else f"{s['predicted_state_mib']:.3f}"
        lines.append(
            f"| {LABELS[name]} | {s['steps']} | {s['lr']:g} | {pred} | {s['allocated_state_mib']:.3f} | "
            f"{s['allocated_state_mib'] / a['allocated_state_mib']:.3f} | {s['peak_rss_mib']:.0f} | "
            f"{s['added_rss_mib']:.0f} | {s['median_step_ms']:.1f} | "
            f"{s['median_step_ms'] / a['median_step_ms']:.2f}x | "
            f"{s['final_train_loss']:.4f} | {s['eval_loss']:.4f} | {s['exact_match']:.1%} | {s['runs_step_ms']} |")
    return "\n".join(lines) + "\n"


def plot(losses: dict, stats: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mem, ax_step) = plt.subplots(1, 3, figsize=(17, 5), width_ratios=[2.2, 1, 1])
    colors = dict(zip(LABELS, ["black", "tab:gray", "tab:blue", "tab:orange", "tab:cyan", "tab:green", "tab:red",
                              "tab:purple", "tab:pink"]))
    for name, curve in losses.items():
        ax_loss.plot(range(1, len(curve) + 1), curve, "--" if name == "galore-torch" else "-", color=colors[name],
                     lw=1, label=LABELS[name])
    long = "mezo-long" in losses  # its many more steps would squeeze the other curves: log x then
    ax_loss.set(xlabel="optimizer step" + (" (log scale)" if long else ""), ylabel="train loss", yscale="log",
                xscale="log" if long else "linear", title="per-step training loss")
    ax_loss.legend(fontsize=8)
    names = list(stats)
    for ax, key, fmt, label in [(ax_mem, "allocated_state_mib", "%.2f", "optimizer state allocated (MiB)"),
                                (ax_step, "step_ratio", "%.2f", "median step time / AdamW")]:
        bars = ax.bar(range(len(names)), [stats[n][key] for n in names], color=[colors[n] for n in names])
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        ax.set_xticks(range(len(names)), [LABELS[n] for n in names], rotation=35, ha="right", fontsize=8)
        ax.set_title(label)
    ax_step.axhline(1.0, color="gray", lw=0.8, ls=":")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2, help="each contender runs this many times (2nd round reversed)")
    ap.add_argument("--mezo-long-steps", type=int, default=1500, help="MeZO long-run column, one round; 0: off")
    ap.add_argument("--lr", nargs="*", default=[], metavar="NAME=LR", help="override a contender's learning rate")
    ap.add_argument("--only", nargs="*", choices=list(LABELS), help="run only these contenders (sweeps)")
    ap.add_argument("--recipe", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", choices=list(LABELS), help=argparse.SUPPRESS)
    ap.add_argument("--child-lr", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.recipe, a.steps, a.child_lr, a.json)
    if a.steps <= SKIP:
        ap.error(f"--steps must exceed the {SKIP} warm-up steps left out of the statistics")
    lrs = {**LR, **{k: float(v) for k, v in (x.split("=", 1) for x in a.lr)}}
    names = [n for n in LABELS if n != "mezo-long" and (not a.only or n in a.only)]
    peer_note = ensure_peer() if "galore-torch" in names else None
    if peer_note:
        print(f"peer column skipped: {peer_note}", file=sys.stderr)
        names.remove("galore-torch")
    order = [(n, a.steps) for r in range(a.rounds) for n in (names if r % 2 == 0 else names[::-1])]
    if a.mezo_long_steps and (not a.only or "mezo-long" in a.only):
        order.append(("mezo-long", a.mezo_long_steps))
    out, all_runs = Path(a.out), {n: [] for n, _ in order}
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, steps) in enumerate(order):  # one after the other: they never compete for the cores
            print(f"run {i + 1}/{len(order)}: {LABELS[name]} ({steps} steps, lr {lrs[name]:g}) ...",
                  file=sys.stderr, flush=True)
            path = Path(tmp) / f"{name}-{i}.json"
            subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps), "--recipe", a.recipe,
                            "--child-lr", str(lrs[name]), "--json", str(path)], check=True, env=env)
            all_runs[name].append(json.loads(path.read_text()))
    stats = {n: summarize(rs) for n, rs in all_runs.items()}
    if "adamw" not in stats:
        return print(json.dumps(stats, indent=1))  # a sweep without the AdamW reference: raw numbers only
    for s in stats.values():
        s["step_ratio"] = s["median_step_ms"] / stats["adamw"]["median_step_ms"]
        s["state_ratio"] = s["allocated_state_mib"] / stats["adamw"]["allocated_state_mib"]
    losses = {n: rs[0]["losses"] for n, rs in all_runs.items()}
    peer = ""
    if "galore-torch" in stats and "galore" in stats:
        diff = max(abs(x - y) for x, y in zip(losses["galore"], losses["galore-torch"]))
        ratio = stats["galore"]["median_step_ms"] / stats["galore-torch"]["median_step_ms"]
        stats["galore"]["max_abs_loss_diff_vs_peer"] = diff
        peer = (f" **GaLore vs galore-torch 1.0: step time ours / theirs = {ratio:.2f}x; largest per-step train-loss "
                f"difference over {len(losses['galore'])} steps: {diff:.3g}.**")
    elif peer_note:
        peer = f" Peer column skipped: {peer_note}."
    s0, host = stats["adamw"], machine()
    header = (
        f"## Optimizers on the quickstart model, full-parameter ({a.recipe} + adapter.type=none, {a.steps} steps, "
        f"batch 32, torch threads {s0['threads']})\n\nMachine: {host}\n\n"
        f"{s0['params']:,} trainable parameters. Settings: max_grad_norm 0 for all, cosine with 10% warm-up, "
        "per-method "
        f"lr (column); GaLore rank 32, update_proj_gap {max(1, a.steps // 3)}, scale 0.25; FRUGAL density 0.25 "
        f"(columns), update_gap {max(1, a.steps // 3)}; SPAM delta_t {max(1, a.steps // 3)}, warmup_steps 10, "
        f"grad_accu_steps 5; MeZO eps 1e-3. {a.rounds} round(s), second in reverse order (mezo-long: one run); step "
        f"time = median over runs of each run's median, first {SKIP} steps skipped; RSS = median over runs. Eval loss "
        f"on {s0['eval_rows']} held-out rows, exact match on {s0['metric_rows']}. State ratio: allocated / AdamW's; "
        f"step ratio: / AdamW's.{peer} Total bench time {time.perf_counter() - started:.0f} s.")
    text = table(stats, header)
    print(text)
    (out / "optimizers.md").write_text(text)
    (out / "optimizers.json").write_text(json.dumps({
        "machine": host, "recipe": a.recipe, "steps": a.steps, "rounds": a.rounds, "skip": SKIP,
        "mezo_long_steps": a.mezo_long_steps, "peer_skipped": peer_note, "stats": stats, "losses": losses},
        indent=2) + "\n")
    plot(losses, stats, f"optimizers, full fine-tuning of the quickstart model, {a.steps} steps — {host}",
         out / "optimizers.png")
    print(f"wrote {out / 'optimizers.md'}, {out / 'optimizers.json'}, {out / 'optimizers.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
