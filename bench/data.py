"""Padding vs packing (``data.packing``) on a length-skewed instruction dataset: the issue-16 bench, packing half.

    python bench/data.py [--rows 2000] [--steps 24] [--rounds 2] [--threads 2] [--out bench/results/data]
    python bench/data.py --part prepare [--prepare-rows 1000000]

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

``--part prepare`` (the other half): peak RSS and time of preparing ``--prepare-rows`` (default 1,000,000) synthetic
alpaca rows for training, each way in its own child process, one tokenizing process each:

* ``lists``: the old path, the examples as Python lists of ints (``tokenize_rows``, what ``prepare`` held before);
* ``arrow``: the new path, ``tokenize_dataset``: ``Dataset.map`` writing int32 token ids to an Arrow file that the
  trainer reads memory-mapped;
* ``arrow, cached``: the same again, as a second run does: the fingerprinted tokenization is loaded, not redone.

Both use the same tokenizer (byte-level BPE, vocab 1024, trained on the first 20,000 rows) and batched encoding, so
the difference is where the examples live. Writes ``<out>-prepare.{md,json,png}``.
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


def write_rows(path: Path, rows: int, seed: int = 0, mu: float = 3.0, sigma: float = 1.0, cap: int = 400) -> None:
    """Alpaca rows with log-normally skewed response lengths (default: median ~20 words, capped at 400)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            n = min(cap, max(2, int(rng.lognormvariate(mu, sigma))))
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


# --------------------------------------------------------------------------------------- preparing a large dataset
PREPARE = ("lists", "arrow", "arrow, cached")


def train_tokenizer(data: Path, folder: Path) -> None:
    """A byte-level BPE tokenizer (vocab 1024) trained on the first 20,000 rows, saved to ``folder``."""
    from itertools import islice

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with data.open() as f:
        texts = [json.loads(line)["output"] for line in islice(f, 20_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, show_progress=False,
                                                       special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def prepare_child(kind: str, data: str, tokenizer_dir: str, json_path: str) -> None:
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    from slimtune.finetune.data import load_records
    from slimtune.finetune.recipe import DataConfig
    from slimtune.finetune.tokens import tokenize_dataset, tokenize_rows
    from slimtune.offload import current_rss_bytes

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = DataConfig(path=data, max_length=512, num_proc=1)
    before = current_rss_bytes()  # the interpreter and libraries, before any row is read
    started = time.perf_counter()
    rows, _ = load_records(cfg, seed=0)
    if kind == "lists":
        examples = tokenize_rows(rows, cfg, tokenizer)
        seconds = time.perf_counter() - started
        tokens = sum(len(e["input_ids"]) for e in examples)
    else:
        examples = tokenize_dataset(rows, cfg, tokenizer)
        seconds = time.perf_counter() - started
        tokens = pc.sum(pc.list_value_length(examples.data.column("input_ids"))).as_py()
    Path(json_path).write_text(json.dumps({
        "seconds": seconds, "examples": len(examples), "tokens": tokens,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before_bytes": before}))


def prepare_part(args) -> None:
    import os

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, tokenizer_dir = Path(tmp) / "rows.jsonl", Path(tmp) / "tokenizer"
        write_rows(data, args.prepare_rows, seed=1, mu=2.5, sigma=0.8, cap=200)  # a few dozen tokens a row
        train_tokenizer(data, tokenizer_dir)
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf-cache")}  # no cache from an earlier run
        for kind in PREPARE:
            out = Path(tmp) / "result.json"
            subprocess.run([sys.executable, __file__, "--prepare-child", kind.split(",")[0], str(data),
                            str(tokenizer_dir), str(out)], check=True, env=env)
            results[kind] = json.loads(out.read_text())
            print(f"{kind}: {results[kind]}", flush=True)
        size = data.stat().st_size
    base = results["lists"]
    header = (f"bench/data.py --part prepare: {args.prepare_rows:,} alpaca rows ({size / 2**20:.0f} MiB of JSON "
              f"Lines, {base['tokens']:,} tokens), one tokenizing process; {machine()}")
    lines = [header, "", "| path | examples | time (s) | time vs lists | peak RSS (MiB) | RSS vs lists | "
             "peak RSS growth (MiB) | growth vs lists | growth per token (bytes) |",
             "|---|" + "---:|" * 8]

    def growth(r):
        return r["peak_rss_bytes"] - r["rss_before_bytes"]

    for kind, r in results.items():
        lines.append(f"| {kind} | {r['examples']:,} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f}x | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x | "
                     f"{growth(r) / 2**20:.0f} | {growth(r) / growth(base):.2f}x | {growth(r) / r['tokens']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out + "-prepare")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["gray", "tab:blue", "tab:green"]
    ax_rss.bar(list(results), [r["peak_rss_bytes"] / 2**30 for r in results.values()], color=colors)
    ax_rss.set(ylabel="peak RSS (GiB)", title="preparing the training examples")
    ax_time.bar(list(results), [r["seconds"] for r in results.values()], color=colors)
    ax_time.set(ylabel="seconds", title="load + validate + tokenize")
    fig.suptitle(textwrap.fill(header, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "data"))
    parser.add_argument("--part", choices=("packing", "prepare"), default="packing")
    parser.add_argument("--prepare-rows", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=3, metavar=("NAME", "RECIPE", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, threads=args.threads)
        return
    if args.prepare_child:
        prepare_child(*args.prepare_child)
        return
    if args.part == "prepare":
        prepare_part(args)
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
