"""slimtune's training loop vs the loop it replaces (Hugging Face ``transformers.Trainer`` + peft), same run.

    python bench/trainer.py [--steps 300] [--recipe configs/quickstart.yaml] [--out bench/results]

Each contender runs the recipe (default: the quickstart, LoRA r=32 on a tiny Llama, fp32, batch 32, cosine with 10%
warm-up) for ``--steps`` steps with eval_steps=0, save_steps=0, plots=false, logging_steps=1 and a temporary
output_dir, in its own subprocess (so one does not warm the other), one after the other, torch.set_num_threads(2).
``--rounds R`` (default 2) repeats the pair in ABBA order (slimtune, HF, HF, slimtune, ...) so drift in the
machine's load cannot favour either side; timing figures are the median over each contender's runs, and the
table also lists every run's median step time, so the spread is visible:

* slimtune: ``Trainer(recipe, prepare(recipe), progress=False).train()``;
* HF: the *same* ``prepare(recipe)`` (seeded model init, LoRA, tokenizer, tokenized examples) trained by
  ``transformers.Trainer`` with the recipe's lr, scheduler, warm-up steps, batch, clipping, weight decay, Adam
  betas/eps and seed, ``optim="adamw_torch"``; data: a torch ``Dataset`` over the examples, collator: slimtune's
  ``collate``. Both print nothing (HF's PrinterCallback removed, slimtune progress=False).

Measured (the first 10 steps are left out of the step statistics):

* step time: wall time between the ends of consecutive optimizer steps, i.e. all the loop does per step (fetch and
  collate, forward, backward, clip, AdamW, scheduler, logging); slimtune: ``Trainer.optimizer_step`` wrapped,
  HF: ``TrainerCallback.on_step_end``. tokens/s: non-pad tokens of those steps / their summed time;
* peak RSS: the child's ``ru_maxrss`` after training (includes building model and data, the same in both);
  "added by training": the peak from the start of training (kernel peak mark reset via /proc/self/clear_refs)
  minus the RSS then, i.e. the library import, trainer setup and loop;
* train wall: first step start (HF: on_train_begin) to last step end;
* quality: eval loss and exact match computed for both after training by the same slimtune functions
  (``evaluate.eval_loss``, ``evaluate.exact_match_score``).

Same math: HF's sampler (accelerate's SeedableRandomSampler) draws ``randperm`` from seed + epoch like slimtune, and
at one micro-batch per step HF's ``num_items_in_batch`` scaling equals slimtune's token weighting, so the two runs
see the same batches and their per-step losses agree (the table prints the largest difference). What differs is
loop overhead: HF adds accelerate's dataloader wrapper, flos and token counting and callbacks per step; slimtune
writes a metrics.jsonl record with an RSS reading per logged step. slimtune's before/after evaluation is skipped
(eval examples withheld from its Trainer) so both are evaluated once, by the same code; its end-of-run checkpoint
and adapter save come after the timed loop. Step times are wall-clock on a possibly shared machine: compare the
ratio within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

SKIP = 10  # warm-up steps left out of the step statistics
NAMES = {"slimtune": "slimtune", "hf": "HF Trainer + peft"}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------- contenders (child processes)
def train_slimtune(recipe, prep) -> dict:
    from slimtune.finetune.trainer import Trainer

    run = {"ends": [], "tokens": []}

    def on_step(step, began, ended, tokens):
        run.setdefault("begin", began)
        run["ends"].append(ended)
        run["tokens"].append(tokens)

    trainer = Trainer(recipe, prep, progress=False, on_step=on_step)
    run["losses"] = trainer.train().losses
    return run


def train_hf(recipe, prep, **arguments) -> dict:
    """``transformers.Trainer`` on ``prep``'s model and examples with the recipe's settings; ``arguments`` override
    or extend the ``TrainingArguments`` (e.g. ``gradient_checkpointing``, ``optim``)."""
    import torch
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    from slimtune.finetune.batches import collate
    from slimtune.finetune.trainer import total_steps, warmup_steps

    t, o, pad_id = recipe.training, recipe.optimizer, prep.tokenizer.pad_token_id
    steps, run = total_steps(recipe, len(prep.train_examples)), {"ends": [], "tokens": [], "losses": []}

    class Examples(torch.utils.data.Dataset):
        __len__, __getitem__ = (lambda self: len(prep.train_examples)), (lambda self, i: prep.train_examples[i])

    def collator(features):
        batch = collate(features, pad_id)
        run["tokens"].append(int(batch["attention_mask"].sum()))  # what slimtune's optimizer_step counts
        return batch

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            run["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            run["ends"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                run["losses"].append(float(logs["loss"]))

    args = TrainingArguments(**{**dict(
        output_dir=str(Path(recipe.output.output_dir) / "hf"), learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=warmup_steps(recipe, steps), max_steps=steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        optim="adamw_torch", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=True, seed=t.seed,
        bf16=t.bf16, remove_unused_columns=False),  # the collator already yields exactly the model's inputs
        **arguments})
    trainer = HFTrainer(model=prep.model, args=args, train_dataset=Examples(), data_collator=collator,
                        callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # prints every log record; slimtune prints nothing (progress=False)
    trainer.train()
    run["tokens"] = run["tokens"][:len(run["ends"])]  # the dataloader may have collated one batch ahead
    return run


def child(name: str, recipe_path: str, steps: int, json_path: str) -> None:
    import torch

    torch.set_num_threads(2)
    from slimtune.finetune.build import prepare
    from slimtune.finetune.evaluate import eval_loss, exact_match_score
    from slimtune.finetune.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(recipe_path, [
            f"training.max_steps={steps}", "training.eval_steps=0", "output.save_steps=0", "output.plots=false",
            "output.logging_steps=1", f"output.output_dir={tmp}/run", "output.overwrite_output_dir=true"])
        t, prep = recipe.training, prepare(recipe)
        eval_examples, prep.eval_examples = prep.eval_examples, None  # evaluated below, the same way for both
        setup_peak = peak_rss()
        start_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        try:  # reset the kernel's peak-RSS mark (what ru_maxrss reads) to the current RSS; Linux >= 4.0
            was_reset = Path("/proc/self/clear_refs").write_text("5") == 1
        except OSError:
            was_reset = False
        run = {"slimtune": train_slimtune, "hf": train_hf}[name](recipe, prep)  # import, setup, loop
        run.update(peak_rss_bytes=max(setup_peak, peak_rss()), added_rss_bytes=peak_rss() - start_rss if was_reset
                   else None, threads=torch.get_num_threads(), batch_size=t.per_device_train_batch_size)
        run["eval_loss"] = eval_loss(prep.model, eval_examples, t.per_device_eval_batch_size,
                                     prep.tokenizer.pad_token_id, prep.device, t.bf16)
        run["exact_match"], _ = exact_match_score(prep.model, prep.tokenizer, prep.eval_pairs,
                                                  recipe.data.max_new_tokens, t.per_device_eval_batch_size,
                                                  prep.device, t.bf16)
    Path(json_path).write_text(json.dumps(run))


# --------------------------------------------------------------------------------------- report (parent process)
ROWS = [("median step (ms)", "median_step_ms", "{:.1f}"), ("mean step (ms)", "mean_step_ms", "{:.1f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"), ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
        ("RSS added by training (MiB)", "added_rss_mib", "{:.0f}"), ("train wall (s)", "train_wall_s", "{:.1f}"),
        ("train loss (mean of last 10)", "final_train_loss", "{:.4f}"), ("eval loss", "eval_loss", "{:.4f}"),
        ("exact match", "exact_match", "{:.1%}")]
RATIOS = ["median_step_ms", "mean_step_ms", "tokens_per_s", "peak_rss_mib", "added_rss_mib", "train_wall_s"]


def summarize(run: dict) -> dict:
    times = [b - a for a, b in zip([run["begin"]] + run["ends"], run["ends"])][SKIP:]
    return {"steps": len(run["ends"]), "median_step_ms": 1e3 * statistics.median(times),
            "mean_step_ms": 1e3 * statistics.fmean(times), "tokens_per_s": sum(run["tokens"][SKIP:]) / sum(times),
            "peak_rss_mib": run["peak_rss_bytes"] / 2**20,
            "added_rss_mib": float("nan") if run["added_rss_bytes"] is None else run["added_rss_bytes"] / 2**20,
            "train_wall_s": run["ends"][-1] - run["begin"], "final_train_loss": statistics.fmean(run["losses"][-10:]),
            "eval_loss": run["eval_loss"], "exact_match": run["exact_match"], "threads": run["threads"]}


def combine(per_run: list[dict]) -> dict:
    """One contender over several runs: timing and memory as the median of the runs, the rest from the first."""
    out = dict(per_run[0])
    for key in RATIOS:
        out[key] = statistics.median(r[key] for r in per_run)
    out["runs_step_ms"] = [round(r["median_step_ms"], 1) for r in per_run]
    return out


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() + Path("/proc/meminfo").read_text().splitlines()
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.processor())
    mem_kib = next(int(x.split()[1]) for x in lines if x.startswith("MemTotal"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM; torch {version('torch')}, "
            f"transformers {version('transformers')}, peft {version('peft')}, Python {platform.python_version()}")


def table(stats: dict, header: str) -> str:
    s, h = stats["slimtune"], stats["hf"]
    lines = [header, "", f"| metric | {NAMES['slimtune']} | {NAMES['hf']} | slimtune / HF |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        ratio = f"{s[key] / h[key]:.2f}x" if key in RATIOS else ""
        lines.append(f"| {label} | {fmt.format(s[key])} | {fmt.format(h[key])} | {ratio} |")
    lines.append(f"| median step of each run (ms) | {s['runs_step_ms']} | {h['runs_step_ms']} | |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, stats: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_step, ax_rss) = plt.subplots(1, 3, figsize=(15, 4.5), width_ratios=[2.2, 0.8, 1])
    colors, styles = {"slimtune": "tab:blue", "hf": "tab:orange"}, {"slimtune": "-", "hf": "--"}
    for name, run in runs.items():
        ax_loss.plot(range(1, len(run["losses"]) + 1), run["losses"], styles[name], color=colors[name], lw=1,
                     label=NAMES[name])
    ax_loss.set(xlabel="optimizer step", ylabel="train loss", yscale="log", title="per-step training loss")
    ax_loss.legend()
    bars = ax_step.bar(list(NAMES.values()), [s["median_step_ms"] for s in stats.values()],
                       color=[colors[n] for n in stats])
    ax_step.bar_label(bars, fmt="%.1f")
    ax_step.set(ylabel="ms", title=f"median step time (steps > {SKIP})")
    groups = [("process peak", "peak_rss_mib"), ("added by training", "added_rss_mib")]
    for i, name in enumerate(stats):
        bars = ax_rss.bar([g + 0.4 * i for g in range(len(groups))], [stats[name][k] for _, k in groups], 0.4,
                          color=colors[name], label=NAMES[name])
        ax_rss.bar_label(bars, fmt="%.0f", fontsize=8)
    ax_rss.set_xticks([g + 0.2 for g in range(len(groups))], [label for label, _ in groups])
    ax_rss.set(ylabel="MiB", title="peak RSS")
    ax_rss.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recipe", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds: each contender runs this many times")
    ap.add_argument("--child", choices=list(NAMES), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.recipe, a.steps, a.json)
    if a.steps <= SKIP:
        ap.error(f"--steps must exceed the {SKIP} warm-up steps left out of the statistics")
    out, runs = Path(a.out), {}
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    order = [n for r in range(a.rounds) for n in (list(NAMES) if r % 2 == 0 else list(NAMES)[::-1])]  # ABBA
    all_runs: dict[str, list[dict]] = {name: [] for name in NAMES}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(order):  # one after the other: they never compete for the cores
            print(f"run {i + 1}/{len(order)}: {NAMES[name]} ({a.steps} steps) ...", file=sys.stderr, flush=True)
            path = Path(tmp) / f"{name}-{i}.json"
            subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(a.steps), "--recipe", a.recipe,
                            "--json", str(path)], check=True, env=env)
            all_runs[name].append(json.loads(path.read_text()))
    runs = {name: rs[0] for name, rs in all_runs.items()}
    stats = {name: combine([summarize(r) for r in rs]) for name, rs in all_runs.items()}
    assert all(s["steps"] == a.steps for s in stats.values()), {n: s["steps"] for n, s in stats.items()}
    host, pairs = machine(), list(zip(runs["slimtune"]["losses"], runs["hf"]["losses"]))
    max_diff = max(abs(x - y) for x, y in pairs)
    threads = "/".join(str(s["threads"]) for s in stats.values())
    header = (f"## Training loop: slimtune vs HF Trainer + peft ({a.recipe}, {a.steps} steps, batch "
              f"{runs['slimtune']['batch_size']}, torch threads {threads})\n\nMachine: {host}\n\n"
              f"{a.rounds} round(s) in ABBA order; timing and memory rows are the median over each contender's "
              f"runs. Step statistics skip the first {SKIP} steps. Ratios are slimtune / HF (< 1: slimtune faster or "
              f"smaller; tokens/s > 1: slimtune faster). Largest per-step train-loss difference over {len(pairs)} "
              f"steps: {max_diff:.3g}.")
    text = table(stats, header)
    print(text)
    (out / "trainer.md").write_text(text)
    (out / "trainer.json").write_text(json.dumps({
        "machine": host, "recipe": a.recipe, "steps": a.steps, "skip": SKIP, "stats": stats,
        "ratios_slimtune_over_hf": {k: stats["slimtune"][k] / stats["hf"][k] for k in RATIOS},
        "max_abs_loss_diff": max_diff, "losses": {n: r["losses"] for n, r in runs.items()}}, indent=2) + "\n")
    plot(runs, stats, f"slimtune vs HF Trainer + peft, {a.recipe}, {a.steps} steps — {host}", out / "trainer.png")
    print(f"wrote {out / 'trainer.md'}, {out / 'trainer.json'}, {out / 'trainer.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
