"""Train what does not fit: whole-run peak RSS against one host-memory budget, streamed load/save vs whole load.

    python bench/scale.py [--budget 2GB] [--steps 2] [--only qlora mezo adamw galore] [--dir /path/on/nvme]

Llama models are built from a config (hidden 2048, intermediate 5632, 16 heads, vocab 32000, the shape of a
Llama-2/TinyLlama layer) and written as sharded bf16 safetensors checkpoints one layer at a time (random weights;
nothing here ever holds a model whole), then trained by ``slimtune train`` in a child process at
``offload.cpu_memory = --budget`` with every streamable thing on NVMe:

* ``qlora``: a 4-bit base streamed from NVMe, bf16 weights >= 2x the budget;
* ``mezo``: full-parameter MeZO streamed from NVMe, the same model;
* ``adamw`` / ``galore``: full fine-tuning with params + fp32 masters + optimizer state on NVMe, bf16 weights about
  the budget (training bytes >= 7x it).

Each row runs twice: slimtune (streamed load -> train -> checkpoint -> streamed save) and "whole load", today's
path before issue 13 (``from_pretrained`` of the whole model, then the engine streams; the full model saved by
``save_pretrained`` after every layer came back), which the child gets by swapping ``finetune.build.load_base``.
Peak RSS is the child's own high-water mark (``VmHWM``, printed at exit: the whole process, load to save), as a
ratio to the budget (goal <= 1.10). Step time = the run's training seconds / steps.

A second table gives, per row kind, the smallest ``offload.cpu_memory`` the plan accepts for 16 and 32 layers of
the same width (bisection on the planner, no weights; ``--depth-only`` runs just this): host memory must not grow
with depth, and the table names the plan items that do.

Writes bench/results/scale.{md,json,png}. Needs ~2.5x the largest checkpoint of free disk in ``--dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WIDTH = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
             vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False)
KINDS = {  # kind -> (bf16 weights as a multiple of the budget, recipe overrides)
    "qlora": (2.0, {"model": {"load_in_4bit": True}, "adapter": {"type": "qlora", "r": 8, "alpha": 16},
                    "offload": {"params": "nvme"}}),
    "mezo": (2.0, {"adapter": {"type": "none"}, "optimizer": {"name": "mezo", "noise": "per_tensor"},
                   "training": {"learning_rate": 1e-6}, "offload": {"params": "nvme"}}),
    "adamw": (1.0, {"adapter": {"type": "none"}, "training": {"max_grad_norm": 0.0, "learning_rate": 1e-5},
                    "offload": {"params": "nvme", "optimizer_state": "nvme", "gradients": "cpu",
                                "staging_chunk": "8MiB"}}),
    "galore": (1.0, {"adapter": {"type": "none"}, "optimizer": {"name": "galore", "rank": 64},
                     "training": {"max_grad_norm": 0.0, "learning_rate": 1e-5},
                     "offload": {"params": "nvme", "optimizer_state": "nvme", "gradients": "cpu",
                                 "staging_chunk": "8MiB"}}),
}

CHILD = r"""
import atexit, json, sys
from pathlib import Path
from slimtune.offload import peak_rss_bytes
out = Path(sys.argv[3])
atexit.register(lambda: out.write_text(json.dumps({"peak_rss_bytes": peak_rss_bytes()})))
if sys.argv[2] == "whole":  # the path before streamed load/save: the model whole in memory first and last
    import slimtune.finetune.build as build
    import slimtune.finetune.offloading as offloading
    from slimtune.finetune.model import load_model

    def whole_load(recipe, source, device):
        t = recipe.training
        return None, load_model(recipe.model, source, device, recipe.quantized, t.gradient_checkpointing), None

    def whole_save(engine, directory):
        engine.sync()
        engine.streamer.detach()  # every weight back on the device, then save_pretrained
        engine.streamer = None
        engine.model.save_pretrained(directory, safe_serialization=True)

    build.load_base = whole_load
    offloading.OffloadEngine.save_model = whole_save
from slimtune.cli.main import main
sys.exit(main(["train", sys.argv[1], "--no-progress"]))
"""


def layer_params(h: int, f: int) -> int:
    """Values of one Llama decoder layer (attention with as many KV heads as heads, gated MLP, two norms)."""
    return 4 * h * h + 3 * h * f + 2 * h


def depth_for(weight_bytes: float) -> int:
    """Layers of the WIDTH model whose bf16 weights reach ``weight_bytes``."""
    h, f, v = WIDTH["hidden_size"], WIDTH["intermediate_size"], WIDTH["vocab_size"]
    resident = 2 * v * h + h
    return max(1, math.ceil((weight_bytes / 2 - resident) / layer_params(h, f)))


def write_model(directory: Path, layers: int, weights: bool = True, shard_bytes: int = 1 << 30,
                width: dict = WIDTH) -> int:
    """A Llama checkpoint of ``layers`` layers of ``width`` (bf16, std 0.02) written a layer at a time into ~1 GB
    shards with an index, plus a tokenizer; ``weights`` False writes the config alone (for planning). Returns the
    bf16 bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from slimtune.finetune.tokenizer import train_tokenizer
    from slimtune.offload.stream.shards import INDEX

    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **width)
    rows = [json.loads(line) for line in (ROOT / "configs/data/quickstart.jsonl").open()]
    texts = [" ".join(str(v) for v in row.values()) for row in rows]
    tok = train_tokenizer(texts, 1024)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, \
        tok.pad_token_id
    config.save_pretrained(directory)
    tok.save_pretrained(directory)
    h, f, v = width["hidden_size"], width["intermediate_size"], width["vocab_size"]
    total = 2 * (2 * v * h + h + layers * layer_params(h, f))
    if not weights:
        return total
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    def tensors_of(i: int) -> dict:
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
                p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                p + "mlp.down_proj.weight": rand(h, f), p + "input_layernorm.weight": ones(h),
                p + "post_attention_layernorm.weight": ones(h)}

    groups = [lambda: {"model.embed_tokens.weight": rand(v, h)}] + [lambda i=i: tensors_of(i) for i in range(layers)]
    groups.append(lambda: {"model.norm.weight": ones(h), "lm_head.weight": rand(v, h)})
    shards, current, size = [], {}, 0
    weight_map: dict[str, str] = {}

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            name = f"model-{len(shards):05d}-of-NNNNN.safetensors"
            save_file(current, directory / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(current, name))
            current, size = {}, 0
            shards[-1] = name

    for make in groups:
        part = make()
        current.update(part)
        size += sum(t.numel() * 2 for t in part.values())
        if size >= shard_bytes:
            flush()
    flush()
    n = len(shards)
    for k, name in enumerate(shards):  # the final count in every name, as save_pretrained writes them
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        (directory / name).rename(directory / final)
        weight_map = {key: final if value == name else value for key, value in weight_map.items()}
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def recipe(model_dir: Path, run_dir: Path, nvme: Path, budget: int, kind: str, steps: int) -> dict:
    data = {
        "model": {"name_or_path": str(model_dir), "dtype": "bfloat16"},
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "data": {"path": str(ROOT / "configs/data/quickstart.jsonl"), "format": "alpaca", "max_samples": 64,
                 "val_size": 0, "max_length": 128, "metric": "none"},
        "training": {"learning_rate": 1e-4, "per_device_train_batch_size": 1, "max_steps": steps, "seed": 0,
                     "bf16": False},
        "offload": {"device": "cpu", "cpu_memory": budget, "nvme_dir": str(nvme)},
        "output": {"output_dir": str(run_dir), "logging_steps": 1, "save_steps": 0, "plots": False,
                   "overwrite_output_dir": True},
    }
    for section, values in KINDS[kind][1].items():
        data.setdefault(section, {}).update(values)
    return data


def run(kind: str, mode: str, model_dir: Path, work: Path, budget: int, steps: int) -> dict:
    """One child training run; its outcome, whole-process peak RSS and step time."""
    import yaml

    run_dir, nvme = work / f"run-{kind}-{mode}", work / "nvme"
    shutil.rmtree(run_dir, ignore_errors=True)
    nvme.mkdir(exist_ok=True)
    path = work / f"{kind}-{mode}.yaml"
    path.write_text(yaml.safe_dump(recipe(model_dir, run_dir, nvme, budget, kind, steps)))
    peak_file = work / f"peak-{kind}-{mode}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(peak_file)], capture_output=True,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak = json.loads(peak_file.read_text())["peak_rss_bytes"] if peak_file.exists() else None
    out = {"kind": kind, "mode": mode, "exit": proc.returncode, "wall_s": round(wall, 1), "peak_rss_bytes": peak}
    summary = run_dir / "summary.json"
    if proc.returncode == 0 and summary.exists():
        s = json.loads(summary.read_text())
        out["step_s"] = round(s["train_seconds"] / max(s["steps"], 1), 2)
        out["final_loss"] = s["final_loss"]
        saved = run_dir / "adapter"
        out["saved_files"] = sorted(p.name for p in saved.glob("*.safetensors"))[:3]
    else:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        out["error"] = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")[:400]
    shutil.rmtree(run_dir, ignore_errors=True)
    for swap in nvme.glob("*.swap"):
        swap.unlink()
    return out


def smallest_budget(kind: str, layers: int, work: Path, runtime: int, resolution: int = 1 << 20
                    ) -> tuple[int | None, dict[str, int]]:
    """The smallest offload.cpu_memory (to ``resolution``) the plan accepts for ``layers`` layers of WIDTH, and that
    plan's host memory by item (params, grads, activations, ...: device + cpu tiers, the train phase)."""
    from slimtune.finetune.planning import plan_recipe
    from slimtune.finetune.recipe import recipe_from_dict
    from slimtune.offload.plan import PlanError

    model_dir = work / f"config-{layers}"
    write_model(model_dir, layers, weights=False)
    bandwidths = {k: 1e9 for k in ("cpu->gpu", "gpu->cpu", "nvme->cpu", "cpu->nvme", "memcpy", "flops")}

    def plan(budget: int):
        data = recipe(model_dir, work / "plan-run", work, budget, kind, 2)
        try:
            return plan_recipe(recipe_from_dict(data), bandwidths=bandwidths, runtime_bytes=runtime)
        except PlanError:
            return None

    lo, hi = runtime, 64 << 30
    if plan(hi) is None:
        return None, {}
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if plan(mid) is not None else (mid, hi)
    bd = plan(hi).breakdown
    return hi, {item: bd["gpu"][item] + bd["cpu"][item] for item in bd["cpu"]}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    from slimtune.offload.units import format_size, parse_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="2GB", help="offload.cpu_memory of every run (default 2GB)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", nargs="*", choices=list(KINDS), default=list(KINDS))
    ap.add_argument("--dir", default=str(ROOT / "bench" / ".scale"), help="models, runs and swap files (NVMe)")
    ap.add_argument("--no-whole", action="store_true", help="skip today's whole-load contrast runs")
    ap.add_argument("--report", action="store_true", help="only re-render bench/results/scale.* from scale.json")
    ap.add_argument("--depth-only", action="store_true", help="only the planner's depth table (no training runs)")
    args = ap.parse_args()
    if args.report:
        saved = json.loads((RESULTS / "scale.json").read_text())
        return report(saved["rows"], saved["depth"], saved["machine"], saved["budget"])
    budget, work = parse_bytes(args.budget), Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    machine = f"{cpu_name()}, {__import__('os').cpu_count()} cores, {format_size(_ram(), binary=True)} RAM"
    free = shutil.disk_usage(work).free
    rows = []
    models: dict[float, tuple[Path, int, int]] = {}
    for kind in [] if args.depth_only else args.only:
        multiple = KINDS[kind][0]
        if multiple not in models:
            layers = depth_for(multiple * budget)
            model_dir = work / f"llama-{layers}"
            need = 2 * layers * layer_params(WIDTH["hidden_size"], WIDTH["intermediate_size"]) * 3
            if need > free:
                sys.exit(f"{work} has {format_size(free)} free; this row needs about {format_size(need)}")
            t0 = time.perf_counter()
            weights = write_model(model_dir, layers)
            print(f"wrote {model_dir.name}: {layers} layers, {format_size(weights)} of bf16 weights "
                  f"({weights / budget:.2f}x the budget) in {time.perf_counter() - t0:.0f} s", flush=True)
            for old_dir, _, _ in models.values():
                shutil.rmtree(old_dir, ignore_errors=True)  # one checkpoint on disk at a time
            models = {multiple: (model_dir, layers, weights)}
        model_dir, layers, weights = models[multiple]
        for mode in ("slimtune", "whole")[: 1 if args.no_whole else 2]:
            r = run(kind, mode, model_dir, work, budget, args.steps)
            r.update(layers=layers, weights_bytes=weights, budget=budget)
            r["peak_over_budget"] = round(r["peak_rss_bytes"] / budget, 3) if r["peak_rss_bytes"] else None
            print(json.dumps(r), flush=True)
            rows.append(r)
    runtime = _runtime_bytes()
    depth = []
    for kind in args.only:
        entry = {"kind": kind}
        for n in (16, 32):
            entry[f"min_budget_{n}"], entry[f"items_{n}"] = smallest_budget(kind, n, work, runtime)
        depth.append(entry)
    shutil.rmtree(work, ignore_errors=True)
    rows, depth = merged(rows, depth, machine, budget)
    report(rows, depth, machine, budget)


def merged(rows: list[dict], depth: list[dict], machine: str, budget: int) -> tuple[list[dict], list[dict]]:
    """This run's rows and depth entries, with those of the other row kinds from the last results file of the same
    machine and budget (``--only`` reruns some rows; the table keeps one line per kind, in KINDS order)."""
    path = RESULTS / "scale.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("machine") == machine and old.get("budget") == budget:
            ran = {r["kind"] for r in rows}
            rows = [r for r in old["rows"] if r["kind"] not in ran] + rows
            depth = [d for d in old["depth"] if d["kind"] not in {e["kind"] for e in depth}] + depth
    order = list(KINDS)
    return (sorted(rows, key=lambda r: (order.index(r["kind"]), r["mode"] != "slimtune")),
            sorted(depth, key=lambda d: order.index(d["kind"])))


def _runtime_bytes() -> int:
    """A fresh process's resident memory once slimtune's training stack is imported: the plan's runtime for the
    depth table (a real run adds its data and tokenizer, a few MB here)."""
    code = ("import torch, transformers, peft, slimtune.cli.main, slimtune.finetune.build, slimtune.finetune.trainer;"
            "from slimtune.offload import current_rss_bytes; print(current_rss_bytes())")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.split()[-1])


def _ram() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))


def report(rows: list[dict], depth: list[dict], machine: str, budget: int) -> None:
    from slimtune.offload.units import format_size

    by = {(r["kind"], r["mode"]): r for r in rows}
    lines = [f"# Whole-run peak RSS at offload.cpu_memory = {format_size(budget)} ({machine})", "",
             "| row | layers | bf16 weights | slimtune: outcome | peak RSS | / budget | step s | whole load: outcome "
             "| peak RSS | / budget | step s | step ratio |",
             "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        s, w = by.get((kind, "slimtune"), {}), by.get((kind, "whole"), {})

        def cells(r):
            if not r:
                return ["-", "-", "-", "-"]
            error = r.get("error", "")
            outcome = ("trains" if r["exit"] == 0 else "refused by the plan after loading" if "no placement fits"
                       in error else f"exit {r['exit']}: {error[:80]}")
            peak = r.get("peak_rss_bytes")
            return [outcome, format_size(peak) if peak else "-", f"{r['peak_over_budget']:.2f}" if peak else "-",
                    str(r.get("step_s", "-"))]

        ratio = f"{s['step_s'] / w['step_s']:.2f}" if s.get("step_s") and w.get("step_s") else "-"
        lines.append(f"| {kind} | {s.get('layers', w.get('layers'))} | "
                     f"{format_size(s.get('weights_bytes', w.get('weights_bytes', 0)))} | "
                     + " | ".join(cells(s) + cells(w)) + f" | {ratio} |")
    lines += ["", "Smallest offload.cpu_memory the plan accepts (1 MiB resolution), same width, two depths, and the "
              "plan's host items that grow from 16 to 32 layers (per added layer):", "",
              "| row | 16 layers | 32 layers | grows with depth by | per layer | what grows |",
              "|---|---:|---:|---:|---:|---|"]
    for d in depth:
        a, b = d["min_budget_16"], d["min_budget_32"]
        grown = {k: v - d.get("items_16", {}).get(k, 0) for k, v in d.get("items_32", {}).items()}
        what = ", ".join(f"{k} {format_size(v // 16)}" for k, v in grown.items() if v > 0) or "nothing"
        lines.append(f"| {d['kind']} | {format_size(a) if a else 'none'} | {format_size(b) if b else 'none'} | "
                     f"{format_size(b - a) if a and b else '-'} | {format_size((b - a) // 16) if a and b else '-'} "
                     f"| {what} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.md").write_text(text)
    (RESULTS / "scale.json").write_text(json.dumps({"machine": machine, "budget": budget, "rows": rows,
                                                    "depth": depth}, indent=2) + "\n")
    plot(rows, budget, machine)


def plot(rows: list[dict], budget: int, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, mode in enumerate(("slimtune", "whole")):
        values = [next((r["peak_over_budget"] or 0 for r in rows if r["kind"] == kind and r["mode"] == mode), 0)
                  for kind in kinds]
        ax.bar([i + 0.38 * k for i in range(len(kinds))], values, 0.36,
               label="slimtune (streamed load/save)" if mode == "slimtune" else "whole-model load")
    ax.axhline(1.10, color="k", ls="--", lw=1, label="goal 1.10x budget")
    ax.set_xticks([i + 0.19 for i in range(len(kinds))], kinds)
    ax.set_ylabel("whole-run peak RSS / budget")
    ax.set_title(f"budget {budget / 1e9:.1f} GB - {machine}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=120)


if __name__ == "__main__":
    main()
