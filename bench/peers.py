"""slimtune beside the stock Hugging Face Trainer, row for row, on one ~200M-parameter Llama: step time and peak RSS.

    python bench/peers.py [--steps 6] [--rounds 2] [--only ROW ...] [--dir /path/on/nvme] [--out bench/results]

The model is built from a config (hidden 1024, intermediate 2816, 16 heads, 12 layers, vocab 32000, untied; random
bf16 weights, written as a sharded safetensors checkpoint by bench/scale.py's ``write_model``) and trained on the
quickstart rows packed into 256-token blocks, batch 4, bf16 autocast, ``--steps`` optimizer steps, one process per
row (``torch.set_num_threads(2)``), rows one after the other; with ``--rounds 2`` the second round runs in reverse
order. Every row uses the same seeded ``prepare(recipe)`` (model, adapter, tokenizer, packed examples):

* slimtune rows: ``Trainer(recipe, prep).train()`` (its own engine: in memory, or the base streamed from CPU or NVMe
  with ``offload.params``);
* HF rows: ``transformers.Trainer`` (bench/trainer.py's ``train_hf``: the recipe's lr, schedule, batch, clipping,
  Adam settings, ``bf16``, slimtune's collator) on the same prepared model; "+ GC" sets
  ``gradient_checkpointing=True`` (non-reentrant), the GaLore row ``optim="galore_adamw"`` with
  ``optim_target_modules=["attn", "mlp"]`` and slimtune's rank / gap / scale (galore-torch 1.0).

Rows (adapters on all linear layers; LoRA r 16 / alpha 32; QLoRA: NF4, double quant, bf16 compute):
``lora``, ``qlora``, ``full`` (AdamW on the bf16 weights, as HF's adamw_torch does), ``galore`` (rank 128, gap 200,
scale 0.25; slimtune also with ``svd_method: randomized``), each with an HF twin; ``qlora`` also as HF + GC and as
slimtune with the 4-bit base streamed from CPU and from NVMe.

Measured: the first step (it holds GaLore's SVDs) and the median of the later steps (wall time between the ends of
consecutive optimizer steps), and the whole process's peak RSS (``VmHWM``: load, train). The table puts each
slimtune row beside its HF twin (ratios) and checks the issue-14 goals: streamed QLoRA <= 1.10x HF QLoRA + GC's step
at <= 0.6x its peak RSS; in-memory rows <= 1.0x their HF rows. Writes bench/results/peers.{md,json,png}. Wall-clock
on a possibly shared machine: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import ROOT, layer_params, write_model  # noqa: E402  (bench/scale.py: the sharded checkpoint writer)
from trainer import machine, train_hf  # noqa: E402  (bench/trainer.py: the stock HF Trainer run)

WIDTH = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
             vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False)
LAYERS = 12
QLORA = {"model": {"load_in_4bit": True}, "adapter": {"type": "qlora"}}
FULL = {"adapter": {"type": "none"}, "training": {"learning_rate": 1e-5}}
GALORE = {"adapter": {"type": "none"}, "optimizer": {"name": "galore", "rank": 128, "update_proj_gap": 200,
                                                     "scale": 0.25}, "training": {"learning_rate": 1e-5}}
HF_GALORE = {"optim": "galore_adamw", "optim_target_modules": ["attn", "mlp"],
             "optim_args": "rank=128,update_proj_gap=200,scale=0.25"}
GC = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
# row -> (label, side, recipe overrides, HF TrainingArguments extras, HF twin for the ratio)
ROWS = {
    "hf-lora": ("HF LoRA", "hf", {}, {}, None),
    "lora": ("slimtune LoRA", "slimtune", {}, None, "hf-lora"),
    "hf-qlora": ("HF QLoRA", "hf", QLORA, {}, None),
    "hf-qlora-gc": ("HF QLoRA + GC", "hf", QLORA, GC, None),
    "qlora": ("slimtune QLoRA", "slimtune", QLORA, None, "hf-qlora"),
    "qlora-cpu": ("slimtune QLoRA, base streamed from CPU", "slimtune", {**QLORA, "offload": {"params": "cpu"}},
                  None, "hf-qlora-gc"),
    "qlora-nvme": ("slimtune QLoRA, base streamed from NVMe", "slimtune", {**QLORA, "offload": {"params": "nvme"}},
                   None, "hf-qlora-gc"),
    "hf-full": ("HF full AdamW", "hf", FULL, {}, None),
    "full": ("slimtune full AdamW", "slimtune", FULL, None, "hf-full"),
    "hf-galore": ("HF GaLore (galore-torch)", "hf", GALORE, HF_GALORE, None),
    "galore": ("slimtune GaLore", "slimtune", GALORE, None, "hf-galore"),
    "galore-randomized": ("slimtune GaLore, randomized SVD", "slimtune",
                          {**GALORE, "optimizer": {**GALORE["optimizer"], "svd_method": "randomized"}}, None,
                          "hf-galore"),
}
GOALS = {"lora": 1.0, "qlora": 1.0, "full": 1.0, "galore": 1.0, "qlora-cpu": 1.10, "qlora-nvme": 1.10}
RSS_GOAL = 0.6  # streamed QLoRA's peak RSS / HF QLoRA + GC's
FIRST_STEP_GOALS = {"galore-randomized": 3.0}  # first step (the SVD refresh) / a later step


def recipe(row: str, model_dir: Path, run_dir: Path, steps: int) -> dict:
    data = {
        "model": {"name_or_path": str(model_dir), "dtype": "bfloat16"},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(ROOT / "configs/data/quickstart.jsonl"), "format": "alpaca", "packing": True,
                 "val_size": 0, "max_length": 256, "metric": "none"},
        "training": {"learning_rate": 1e-4, "per_device_train_batch_size": 4, "max_steps": steps, "seed": 0,
                     "bf16": True, "eval_steps": 0, "warmup_ratio": 0.0},
        "offload": {"device": "cpu", "nvme_dir": str(run_dir.parent / "nvme")},
        "output": {"output_dir": str(run_dir), "logging_steps": 1, "save_steps": 0, "plots": False,
                   "overwrite_output_dir": True},
    }
    for section, values in ROWS[row][2].items():
        data.setdefault(section, {}).update(values)
    return data


# --------------------------------------------------------------------------------------- one row (child process)
def child(row: str, model_dir: str, steps: int, json_path: str) -> None:
    import torch

    torch.set_num_threads(2)
    from slimtune.finetune.build import prepare
    from slimtune.finetune.recipe import recipe_from_dict
    from slimtune.finetune.trainer import Trainer
    from slimtune.offload import peak_rss_bytes

    _, side, _, hf_arguments, _ = ROWS[row]
    with tempfile.TemporaryDirectory(dir=Path(model_dir).parent) as tmp:
        (Path(tmp) / "nvme").mkdir()
        r = recipe_from_dict(recipe(row, Path(model_dir), Path(tmp) / "run", steps))
        started = time.perf_counter()
        prep = prepare(r)
        prep.eval_examples = None
        loaded = time.perf_counter()
        if side == "hf":
            run = train_hf(r, prep, **hf_arguments)
        else:
            run = {"ends": []}

            def on_step(step, began, ended, tokens):
                run.setdefault("begin", began)
                run["ends"].append(ended)

            run["losses"] = Trainer(r, prep, progress=False, on_step=on_step).train().losses
        run.update(load_seconds=loaded - started, peak_rss_bytes=peak_rss_bytes(),
                   params=sum(p.numel() for p in prep.model.parameters()), tokens=len(prep.train_examples))
    Path(json_path).write_text(json.dumps(run))


# --------------------------------------------------------------------------------------- report (parent process)
def summarize(runs: list[dict]) -> dict:
    def steps(run):
        return [b - a for a, b in zip([run["begin"]] + run["ends"], run["ends"])]

    return {"first_step_s": statistics.median(steps(r)[0] for r in runs),
            "step_s": statistics.median(statistics.median(steps(r)[1:]) for r in runs),
            "runs_step_s": [round(statistics.median(steps(r)[1:]), 3) for r in runs],
            "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in runs) / 2**20,
            "load_s": statistics.median(r["load_seconds"] for r in runs), "params": runs[0]["params"],
            "losses": runs[0]["losses"]}


def table(stats: dict, header: str) -> str:
    cols = ("row | first step (s) | later steps (s) | first / later | peak RSS (MiB) | HF twin | step / twin | "
            "peak RSS / twin | goal | later steps of each run (s)")
    lines = [header, "", f"| {cols} |", "|---|" + "---:|" * 4 + "---|---:|---:|---|---|"]
    for row, s in stats.items():
        label, twin = ROWS[row][0], ROWS[row][4]
        cells = ["", "", "", ""]
        if twin in stats:
            t = stats[twin]
            step_ratio, rss_ratio = s["step_s"] / t["step_s"], s["peak_rss_mib"] / t["peak_rss_mib"]
            goal = GOALS.get(row)
            verdict = ""
            if goal is not None:
                ok = step_ratio <= goal and (row not in ("qlora-cpu", "qlora-nvme") or rss_ratio <= RSS_GOAL)
                rss = f", RSS <= {RSS_GOAL}x" if row in ("qlora-cpu", "qlora-nvme") else ""
                verdict = f"step <= {goal:.2f}x{rss}: {'met' if ok else 'NOT met'}"
            if row in FIRST_STEP_GOALS:
                ok = s["first_step_s"] <= FIRST_STEP_GOALS[row] * s["step_s"]
                verdict = f"first step <= {FIRST_STEP_GOALS[row]:.0f}x later: {'met' if ok else 'NOT met'}"
            cells = [ROWS[twin][0], f"{step_ratio:.2f}x", f"{rss_ratio:.2f}x", verdict]
        lines.append(f"| {label} | {s['first_step_s']:.2f} | {s['step_s']:.2f} | "
                     f"{s['first_step_s'] / s['step_s']:.1f} | {s['peak_rss_mib']:.0f} | {' | '.join(cells)} | "
                     f"{s['runs_step_s']} |")
    return "\n".join(lines) + "\n"


def plot(stats: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(stats)
    labels = [ROWS[r][0] for r in rows]
    colors = ["tab:gray" if ROWS[r][1] == "hf" else "tab:blue" for r in rows]
    fig, (ax_step, ax_rss) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    ax_step.barh(labels, [stats[r]["step_s"] for r in rows], color=colors)
    ax_step.set(xlabel="later steps: median step (s)", title="step time (grey: stock HF Trainer)")
    ax_rss.barh(labels, [stats[r]["peak_rss_mib"] for r in rows], color=colors)
    ax_rss.set(xlabel="peak RSS of the process (MiB)", title="memory")
    ax_step.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per row (the first is reported apart)")
    ap.add_argument("--rounds", type=int, default=2, help="each row runs this many times (2nd round reversed)")
    ap.add_argument("--only", nargs="*", choices=list(ROWS), help="run only these rows")
    ap.add_argument("--dir", help="where the checkpoint and NVMe homes go (default: a temporary folder)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.model, a.steps, a.json)
    if a.steps < 3:
        ap.error("--steps must be at least 3 (the first step is reported apart from the later ones)")
    names = [n for n in ROWS if not a.only or n in a.only]
    order = [n for r in range(a.rounds) for n in (names if r % 2 == 0 else names[::-1])]
    out, runs = Path(a.out), {n: [] for n in names}
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        model_dir = Path(tmp) / "model"
        write_model(model_dir, LAYERS, width=WIDTH)
        for i, name in enumerate(order):  # one after the other: they never compete for the cores
            print(f"run {i + 1}/{len(order)}: {ROWS[name][0]} ({a.steps} steps) ...", file=sys.stderr, flush=True)
            path = Path(tmp) / f"{name}-{i}.json"
            subprocess.run([sys.executable, __file__, "--child", name, "--model", str(model_dir), "--steps",
                            str(a.steps), "--json", str(path)], check=True, env=env, cwd=ROOT)
            runs[name].append(json.loads(path.read_text()))
    stats = {n: summarize(rs) for n, rs in runs.items()}
    host, load_end = machine(), os.getloadavg()[0]
    params = 2 * WIDTH["vocab_size"] * WIDTH["hidden_size"] + WIDTH["hidden_size"] + LAYERS * layer_params(
        WIDTH["hidden_size"], WIDTH["intermediate_size"])
    header = (
        f"## slimtune beside the stock Hugging Face Trainer ({a.steps} steps per row, {a.rounds} round(s))\n\n"
        f"Machine: {host}\n\nLlama, hidden {WIDTH['hidden_size']}, {LAYERS} layers, vocab {WIDTH['vocab_size']} "
        f"({params / 1e6:.0f}M parameters), bf16 weights and autocast, "
        f"quickstart rows packed into 256-token blocks, batch 4, torch threads 2, one process per row. Later steps = "
        f"median over runs of each run's median step after the first. Peak RSS: the process's VmHWM (load and train). "
        f"1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end ({os.cpu_count()} cores). "
        f"Total bench time {time.perf_counter() - started:.0f} s.")
    text = table(stats, header)
    print(text)
    (out / "peers.md").write_text(text)
    (out / "peers.json").write_text(json.dumps({"machine": host, "steps": a.steps, "rounds": a.rounds,
                                                "width": WIDTH, "layers": LAYERS, "stats": stats,
                                                "load_average": [load_start, load_end]}, indent=2) + "\n")
    plot(stats, f"slimtune vs HF Trainer, {params / 1e6:.0f}M Llama, bf16 — {host}", out / "peers.png")
    print(f"wrote {out / 'peers.md'}, {out / 'peers.json'}, {out / 'peers.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
