"""Padding vs packing (``data.packing``) on a length-skewed instruction dataset: the issue-16 bench, packing half.

    python bench/data.py [--rows 2000] [--steps 24] [--rounds 2] [--threads 2] [--out bench/results/data]

The data: ``--rows`` synthetic alpaca rows (seeded) whose responses have log-normally skewed lengths (median ~20
words, a tail of a few hundred), as real SFT sets do; most micro-batches then hold one long example and several
short ones, and padding every row to the longest wastes most of the compute. The model: a Llama built from a config
(hidden 256, 4 layers, 8 heads, fp32, vocab from the data), LoRA r16 on all linear layers, batch 8, max_length 512.
Each contender runs in its own child process (peak RSS per process), ``--rounds`` times in ABBA order:

* ``padded``: every micro-batch right-padded to its longest example (the default);
* ``packed``: ``data.packing: true``, the same micro-batches padding-free (one row, positions restarting per
  example, attention kept within each example).

Both train on the same examples in the same order, so their losses agree (tests/test_packing.py asserts it). Measured
per contender: median step time after the first 3 steps, real (non-padding) input tokens per second, the tokens the
model computes on per step (padding included), peak RSS. The table gives packed / padded ratios. Writes
``<out>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer import machine  # bench/trainer.py: the machine line

SKIP = 3
CONTENDERS = {"padded": [], "packed": ["data.packing=true"]}
WORDS = ("the model learns to answer short questions with a long or a brief reply depending on what was asked of "
         "it and how much detail the reader needs today").split()


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    """Alpaca rows with log-normally skewed response lengths (median ~20 words, capped at 400)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            n = min(400, max(2, int(rng.lognormvariate(3.0, 1.0))))
            f.write(json.dumps({"instruction": f"Write reply number {i}.", "input": "",
                                "output": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")


def recipe(data: Path, out: Path, steps: int) -> dict:
    return {
        "model": {"architecture": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                                   "num_attention_heads": 8, "max_position_embeddings": 512},
                  "tokenizer_vocab_size": 1024, "dtype": "float32"},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(data), "format": "alpaca", "max_length": 512, "val_size": 0, "metric": "none"},
        "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_steps": steps, "seed": 0,
                     "max_grad_norm": 1.0},
        "output": {"output_dir": str(out), "logging_steps": 1000, "plots": False, "overwrite_output_dir": True},
    }


# --------------------------------------------------------------------------------------- one contender (child process)
def child(name: str, recipe_path: str, json_path: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from slimtune.finetune.build import prepare
    from slimtune.finetune.recipe import load_recipe
    from slimtune.finetune.trainer import Trainer

    recipe = load_recipe(recipe_path, CONTENDERS[name])
    prep = prepare(recipe)
    run = {"ends": [], "tokens": [], "computed": []}
    trainer = Trainer(recipe, prep, progress=False)
    bs = recipe.training.per_device_train_batch_size
    original = trainer.micro_batches

    def counted():  # the tokens each micro-batch makes the model compute on, padding included
        for batch in original():
            run["computed"].append(int(batch["input_ids"].numel()))
            yield batch

    trainer.micro_batches = counted

    def on_step(step, began, ended, tokens):
        run.setdefault("begin", began)
        run["ends"].append(ended)
        run["tokens"].append(tokens)

    trainer.on_step = on_step
    run["losses"] = trainer.train().losses
    run["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run["batch"] = bs
    Path(json_path).write_text(json.dumps(run))


# --------------------------------------------------------------------------------------- report (parent process)
def summarize(runs: list[dict]) -> dict:
    def per_run(run):
        times = [b - a for a, b in zip([run["begin"]] + run["ends"], run["ends"])][SKIP:]
        return statistics.median(times), sum(run["tokens"][SKIP:]) / sum(times)

    step = statistics.median(per_run(r)[0] for r in runs)
    rate = statistics.median(per_run(r)[1] for r in runs)
    first = runs[0]
    return {"median_step_s": step, "real_tokens_per_s": rate,
            "real_tokens_per_step": statistics.fmean(first["tokens"]),
            "computed_tokens_per_step": sum(first["computed"]) / len(first["tokens"]),
            "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in runs) / 2**20,
            "losses": first["losses"], "runs_step_s": [round(per_run(r)[0], 3) for r in runs]}


def table(stats: dict, header: str) -> str:
    base = stats["padded"]
    lines = [header, "", "| contender | median step (s) | step / padded | real tokens/s | tokens/s vs padded | "
             "real tokens per step | tokens computed per step | peak RSS (MiB) | RSS vs padded | final loss |",
             "|---|" + "---:|" * 9]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['median_step_s']:.3f} | {s['median_step_s'] / base['median_step_s']:.2f}x | "
                     f"{s['real_tokens_per_s']:.0f} | {s['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x | "
                     f"{s['real_tokens_per_step']:.0f} | {s['computed_tokens_per_step']:.0f} | "
                     f"{s['peak_rss_mib']:.0f} | {s['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | "
                     f"{s['losses'][-1]:.4f} |")
    return "\n".join(lines) + "\n"


def plot(stats: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(stats)
    ax_rate.bar(names, [stats[n]["real_tokens_per_s"] for n in names], color=["gray", "tab:blue"])
    ax_rate.set(ylabel="real (non-padding) tokens / s", title="throughput")
    for n in names:
        ax_loss.plot(range(1, len(stats[n]["losses"]) + 1), stats[n]["losses"], label=n, lw=1)
    ax_loss.set(xlabel="optimizer step", ylabel="train loss", title="same examples, same order")
    ax_loss.legend()
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "data"))
    parser.add_argument("--child", nargs=3, metavar=("NAME", "RECIPE", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, threads=args.threads)
        return
    import yaml

    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        data, recipe_path = Path(tmp) / "skewed.jsonl", Path(tmp) / "recipe.yaml"
        write_rows(data, args.rows)
        recipe_path.write_text(yaml.safe_dump(recipe(data, Path(tmp) / "run", args.steps)))
        for r in range(args.rounds):
            order = list(CONTENDERS) if r % 2 == 0 else list(reversed(CONTENDERS))
            for name in order:
                out = Path(tmp) / f"{name}-{r}.json"
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", name,
                                str(recipe_path), str(out)], check=True)
                runs[name].append(json.loads(out.read_text()))
                print(f"{name} round {r + 1}: {time.perf_counter() - started:.0f} s", flush=True)
    stats = {name: summarize(rs) for name, rs in runs.items()}
    header = (f"bench/data.py: {args.rows} length-skewed rows, batch 8, max_length 512, LoRA r16 on a 4-layer "
              f"hidden-256 Llama (fp32), {args.steps} steps x {args.rounds} rounds, torch threads {args.threads}; "
              f"{machine()}")
    text = table(stats, header)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "stats": stats}, indent=1))
    plot(stats, header, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
