"""slimtune's training loop vs the loop it replaces (Hugging Face ``transformers.Trainer`` + peft), same run.

    python bench/trainer.py [--steps 300] [--recipe configs/quickstart.yaml] [--out bench/results]

What runs: the recipe (default: the quickstart, LoRA r=32 on a tiny Llama, fp32, batch 32, cosine schedule with 10%
warm-up) for ``--steps`` optimizer steps, with ``eval_steps=0``, ``save_steps=0``, ``plots=false``, and a temporary
output_dir. Each contender runs in its own subprocess, one after the other, with ``torch.set_num_threads(2)``:

* slimtune: ``Trainer(recipe, prepare(recipe), progress=False).train()``;
* HF: the *same* ``prepare(recipe)`` (same seeded model init, LoRA config, tokenizer and tokenized examples), trained
  by ``transformers.Trainer`` with the recipe's lr, scheduler, warm-up steps, batch size, grad clipping, weight decay,
  Adam betas/eps, ``optim="adamw_torch"`` and seed; data is a ``torch.utils.data.Dataset`` over the examples and
  the collator is slimtune's ``collate`` (same right padding and label masking).

Measured per contender (the first 10 steps are skipped in the step statistics):

* step time: wall time between the ends of consecutive optimizer steps, i.e. everything the loop does per step
  (fetch + collate the batch, forward, backward, clip, AdamW, scheduler, logging). slimtune: ``optimizer_step`` is
  wrapped; HF: a ``TrainerCallback.on_step_end``. Both log every step (``logging_steps=1``) and print nothing
  (HF's ``PrinterCallback`` removed; slimtune ``progress=False``);
* tokens/s: non-pad input tokens of the timed steps / their summed step time;
* peak RSS: the child's ``ru_maxrss`` right after training (it includes building the model and data, identical in
  both, and each library's imports); eval is run after that reading;
* train wall: start of the training loop to its end (slimtune also writes its final checkpoint + adapter there);
* quality: eval loss and exact match on the prepared eval set, computed for both by the same slimtune functions
  (``evaluate.eval_loss``, ``evaluate.exact_match_score``) after training.

What differs and could not be removed: data order (slimtune shuffles with ``randperm(seed + epoch)``, HF with its
seeded ``RandomSampler``), so the loss curves are not equal step for step; HF scales the loss by the batch's label
count (``num_items_in_batch``) and slimtune by its supervised-token count, which agree with one micro-batch per
step. slimtune skips its built-in before/after evaluation here (eval examples are withheld from its Trainer) so that
both contenders are evaluated once, by the same code, outside the timed loop.
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

SKIP = 10  # warm-up steps left out of the step-time statistics
NAMES = {"slimtune": "slimtune", "hf": "HF Trainer + peft"}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------- contenders (child side)
def train_slimtune(recipe, prep) -> dict:
    from slimtune.finetune.trainer import Trainer

    trainer = Trainer(recipe, prep, progress=False)
    ends, tokens, begin = [], [], []
    inner = trainer.optimizer_step

    def timed_step(micro):
        if not begin:
            begin.append(time.perf_counter())
        loss, grad_norm, n = inner(micro)
        ends.append(time.perf_counter())
        tokens.append(n)
        return loss, grad_norm, n

    trainer.optimizer_step = timed_step
    result = trainer.train()
    return {"begin": begin[0], "ends": ends, "tokens": tokens, "losses": result.losses,
            "train_wall_s": result.train_seconds}


def train_hf(recipe, prep) -> dict:
    import torch
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    from slimtune.finetune.data import collate
    from slimtune.finetune.trainer import total_steps, warmup_steps

    t, o = recipe.training, recipe.optimizer
    steps, pad_id, tokens = total_steps(recipe, len(prep.train_examples)), prep.tokenizer.pad_token_id, []

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(prep.train_examples)

        def __getitem__(self, i):
            return prep.train_examples[i]

    def collator(features):
        batch = collate(features, pad_id)
        tokens.append(int(batch["attention_mask"].sum()))  # slimtune counts the same per step
        return batch

    class Timer(TrainerCallback):
        begin, end, ends, losses = 0.0, 0.0, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(Path(recipe.output.output_dir) / "hf"), learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=warmup_steps(recipe, steps), max_steps=steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        optim="adamw_torch", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=True, seed=t.seed,
        remove_unused_columns=False)  # our collator already yields exactly the model's inputs
    timer = Timer()
    trainer = HFTrainer(model=prep.model, args=args, train_dataset=Examples(), data_collator=collator,
                        callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints every log; slimtune prints nothing (progress=False)
    trainer.train()
    return {"begin": timer.begin, "ends": timer.ends, "tokens": tokens[:len(timer.ends)], "losses": timer.losses,
            "train_wall_s": timer.ends[-1] - timer.begin}


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
        prep = prepare(recipe)
        eval_examples, pairs = prep.eval_examples, prep.eval_pairs
        prep.eval_examples = None  # evaluated once below, by the same code for both contenders
        run = {"slimtune": train_slimtune, "hf": train_hf}[name](recipe, prep)
        run["peak_rss_bytes"] = peak_rss_bytes()
        run["threads"] = torch.get_num_threads()
        t = recipe.training
        run["batch_size"] = t.per_device_train_batch_size
        run["eval_loss"] = eval_loss(prep.model, eval_examples, t.per_device_eval_batch_size,
                                     prep.tokenizer.pad_token_id, prep.device, t.bf16)
        run["exact_match"], _ = exact_match_score(prep.model, prep.tokenizer, pairs, recipe.data.max_new_tokens,
                                                  t.per_device_eval_batch_size, prep.device, t.bf16)
    Path(json_path).write_text(json.dumps(run))


# ------------------------------------------------------------------------------------------- parent side
def summarize(run: dict) -> dict:
    times = [b - a for a, b in zip([run["begin"]] + run["ends"], run["ends"])][SKIP:]
    toks = run["tokens"][SKIP:len(times) + SKIP]
    return {"median_step_ms": 1e3 * statistics.median(times), "mean_step_ms": 1e3 * statistics.fmean(times),
            "tokens_per_s": sum(toks) / sum(times), "peak_rss_mib": run["peak_rss_bytes"] / 2**20,
            "train_wall_s": run["train_wall_s"], "final_train_loss": statistics.fmean(run["losses"][-10:]),
            "eval_loss": run["eval_loss"], "exact_match": run["exact_match"], "steps": len(run["ends"]),
            "threads": run["threads"]}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM; torch {version('torch')}, "
            f"transformers {version('transformers')}, peft {version('peft')}, Python {platform.python_version()}")


COLUMNS = [("median step (ms)", "median_step_ms", "{:.1f}"), ("mean step (ms)", "mean_step_ms", "{:.1f}"),
           ("tokens/s", "tokens_per_s", "{:,.0f}"), ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
           ("train wall (s)", "train_wall_s", "{:.1f}"), ("train loss (last 10)", "final_train_loss", "{:.4f}"),
           ("eval loss", "eval_loss", "{:.4f}"), ("exact match", "exact_match", "{:.1%}")]
RATIO_KEYS = {"median_step_ms", "mean_step_ms", "tokens_per_s", "peak_rss_mib", "train_wall_s"}


def table(stats: dict, header: str) -> str:
    lines = [header, "", "| contender | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, s in stats.items():
        lines.append(f"| {NAMES[name]} | " + " | ".join(f.format(s[k]) for _, k, f in COLUMNS) + " |")
    ratio = [f"{stats['slimtune'][k] / stats['hf'][k]:.2f}x" if k in RATIO_KEYS else "" for _, k, _ in COLUMNS]
    lines.append("| **slimtune / HF** | " + " | ".join(ratio) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, stats: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_step, ax_rss) = plt.subplots(1, 3, figsize=(15, 4.5), width_ratios=[2.2, 1, 1])
    colors = {"slimtune": "tab:blue", "hf": "tab:orange"}
    for name, run in runs.items():
        ax_loss.plot(range(1, len(run["losses"]) + 1), run["losses"], label=NAMES[name], color=colors[name], lw=1)
    ax_loss.set(xlabel="optimizer step", ylabel="train loss", yscale="log", title="per-step training loss")
    ax_loss.legend()
    labels = [NAMES[n] for n in stats]
    for ax, key, ylabel in ((ax_step, "median_step_ms", "median step time (ms)"),
                            (ax_rss, "peak_rss_mib", "peak RSS (MiB)")):
        values = [s[key] for s in stats.values()]
        bars = ax.bar(labels, values, color=[colors[n] for n in stats])
        ax.bar_label(bars, fmt="%.0f")
        ax.set(ylabel=ylabel, title=ylabel)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recipe", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", choices=list(NAMES), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.recipe, a.steps, a.json)
    if a.steps <= SKIP:
        ap.error(f"--steps must exceed the {SKIP} warm-up steps left out of the statistics")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:  # sequential: the two never compete for the 2 threads
            print(f"running {NAMES[name]} ({a.steps} steps) ...", file=sys.stderr, flush=True)
            path = Path(tmp) / f"{name}.json"
            env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(a.steps), "--recipe", a.recipe,
                            "--json", str(path)], check=True, env=env)
            runs[name] = json.loads(path.read_text())
    stats = {name: summarize(run) for name, run in runs.items()}
    assert all(s["steps"] == a.steps for s in stats.values()), {n: s["steps"] for n, s in stats.items()}
    host = machine()
    header = (f"## Training loop: slimtune vs HF Trainer + peft ({a.recipe}, {a.steps} steps, batch "
              f"{runs['slimtune']['batch_size']}, torch threads {stats['slimtune']['threads']}/{stats['hf']['threads']})\n\n"
              f"Machine: {host}\n\nStep statistics skip the first {SKIP} steps. Ratios are slimtune / HF "
              "(< 1 = slimtune faster or smaller; for tokens/s > 1 = slimtune faster).")
    text = table(stats, header)
    print(text)
    (out / "trainer.md").write_text(text)
    (out / "trainer.json").write_text(json.dumps({
        "machine": host, "recipe": a.recipe, "steps": a.steps, "skip": SKIP, "stats": stats,
        "ratios_slimtune_over_hf": {k: stats["slimtune"][k] / stats["hf"][k] for k in sorted(RATIO_KEYS)},
        "losses": {n: r["losses"] for n, r in runs.items()}}, indent=2) + "\n")
    plot(runs, stats, f"slimtune vs HF Trainer + peft, {a.recipe}, {a.steps} steps — {host}", out / "trainer.png")
    print(f"wrote {out / 'trainer.md'}, {out / 'trainer.json'}, {out / 'trainer.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
