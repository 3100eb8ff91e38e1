"""The support matrix: every architecture x feature through ``slimtune train``, each cell trains correctly or is
refused with a reason.

A cell runs the CLI in-process on a tiny model of one family (tests/zoo.py) and ends in one of:

* ``trains``: exit 0, and either the eval loss fell (in-memory features, a few steps at a high learning rate) or the
  streamed run equals the in-memory run of the same recipe (losses and trained weights, 2 steps);
* ``refused``: exit 2 with a one-line reason that names a recipe key, no traceback, nothing trained;
* ``broken``: anything else (a crash, a traceback, a streamed run that differs, a loss that did not fall, a swap
  file left behind). No cell may be broken: ``tests/test_support_matrix.py`` asserts it.

``python tests/support_matrix.py [--readme]`` runs every cell, prints the table and, with ``--readme``, writes it
into README.md between the ``support-matrix`` markers; the test checks that README's table is the one the matrix
produces, so the table is generated, never edited by hand.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

README = zoo.ROOT / "README.md"
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"

# Full fine-tuning comparisons run Adam with eps 1e-3: a parameter whose true gradient is zero (a key bias: softmax
# ignores it) gets a gradient of pure rounding noise, which Adam at eps 1e-8 blows up to updates of size lr whose
# values depend on the summation order. At 1e-3 that noise moves nothing, real gradients still move weights by
# ~lr per step, and the offloaded and in-memory updates can be held to 1e-5.
WELL_CONDITIONED = "optimizer.eps=1e-3"

# Evals that also generate (exact match of greedy answers): decoding runs the layers with a KV cache, which a
# streamed layer's training recompute must not see (GPT-2 passes it positionally).
GENERATE = ("data.metric=exact_match", "data.metric_samples=3", "data.max_new_tokens=4")

# feature -> (label in the table, overrides of the cell run, overrides of the in-memory reference run or None)
FEATURES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...] | None]] = {
    "lora": ("LoRA", ("adapter.type=lora",), None),
    "qlora": ("QLoRA", ("adapter.type=qlora",), None),
    "mixlora": ("MixLoRA", ("adapter.type=mixlora", "adapter.num_experts=4", "adapter.top_k=2"), None),
    "lora_nvme": ("LoRA, base streamed from NVMe",
                  ("adapter.type=lora", "offload.params=nvme", "training.max_steps=2", *GENERATE),
                  ("adapter.type=lora", "training.max_steps=2", *GENERATE)),
    "galore_nvme": ("full GaLore, params + state on NVMe",
                    ("adapter.type=none", "optimizer.name=galore", "optimizer.rank=4", WELL_CONDITIONED,
                     "training.max_grad_norm=0", "training.learning_rate=1e-3", "offload.params=nvme",
                     "offload.optimizer_state=nvme", "training.max_steps=2"),
                    ("adapter.type=none", "optimizer.name=galore", "optimizer.rank=4", WELL_CONDITIONED,
                     "training.max_grad_norm=0", "training.learning_rate=1e-3", "training.max_steps=2")),
    "mezo_nvme": ("MeZO, streamed from NVMe",
                  ("adapter.type=none", "optimizer.name=mezo", "training.learning_rate=1e-4",
                   "training.max_grad_norm=0",
                   "offload.params=nvme", "training.max_steps=2"),
                  ("adapter.type=none", "optimizer.name=mezo", "optimizer.noise=per_tensor", "training.max_grad_norm=0",
                   "training.learning_rate=1e-4", "training.max_steps=2")),
}


def recipe(model_dir: Path, out: Path, *overrides: str) -> dict:
    """A cell's recipe: the tiny model by path, 32 alpaca rows, 8 held out, a few steps."""
    from slimtune.finetune.recipe import apply_overrides

    data = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(zoo.DATA), "format": "alpaca", "max_samples": 32, "val_size": 8, "max_length": 64},
        "training": {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "max_steps": 6, "seed": 7,
                     "lr_scheduler_type": "constant", "max_grad_norm": 1.0},
        "output": {"output_dir": str(out), "logging_steps": 1, "plots": False},
    }
    return apply_overrides(data, list(overrides))


def read_yaml_recipe(path: Path, *overrides: str) -> dict:
    """A recipe file as a dict with ``overrides`` applied and its relative data path made absolute."""
    from slimtune.finetune.recipe import apply_overrides, read_yaml

    data = read_yaml(path)
    data["data"]["path"] = str((Path(path).parent / data["data"]["path"]).resolve())
    return apply_overrides(data, list(overrides))


@dataclass
class Outcome:
    status: str  # trains | refused | broken
    detail: str = ""

    def cell(self) -> str:
        return {"trains": "yes", "refused": "refused"}.get(self.status, "BROKEN")


def run_cli(data: dict, workdir: Path) -> tuple[int, str]:
    """``slimtune train`` in-process on ``data``; returns (exit code, stderr + stdout)."""
    import yaml

    from slimtune.cli.main import main

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["train", str(path), "--no-progress"])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - a crash is an outcome ("broken"), with its traceback
            import traceback

            traceback.print_exc(file=err)
            code = -1
            del exc
    return code, err.getvalue() + out.getvalue()


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    adapter = run / "adapter"
    files = sorted(adapter.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _refusal(code: int, text: str) -> Outcome | None:
    """A clean refusal (exit 2, one message naming a recipe key, no traceback), a failure, or None (it ran)."""
    if code == 0:
        return Outcome("broken", f"a traceback was printed: {text.strip()[-2000:]}") if "Traceback" in text else None
    if code == 2 and "Traceback" not in text and "error:" in text:
        line = next(line for line in text.splitlines() if "error:" in line)
        more = [line.strip() for line in text.splitlines() if line.strip().startswith("- ")]
        return Outcome("refused", (more[0][2:] if more else line.split("error:", 1)[1]).strip())
    return Outcome("broken", f"exit {code}: {text.strip()[-2000:]}")


def run_cell(family: str, feature: str, model_dir: Path, tmp: Path) -> Outcome:
    """Run one cell (and its in-memory reference when it has one) in ``tmp``."""
    _, overrides, reference = FEATURES[feature]
    if reference is not None:
        return compare(model_dir, tmp, overrides, reference)
    code, text = run_cli(recipe(model_dir, tmp / "run", *overrides), tmp)
    outcome = _refusal(code, text)
    if outcome is not None:
        return outcome
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
    if not after < before:
        return Outcome("broken", f"eval loss did not fall: {before:.4f} -> {after:.4f}")
    return Outcome("trains", f"eval loss {before:.3f} -> {after:.3f}")


def compare(model_dir: Path, tmp: Path, overrides: tuple[str, ...], reference: tuple[str, ...],
            atol: float = 1e-5) -> Outcome:
    """Run ``overrides`` (offloaded: swap files in ``tmp``) and the in-memory ``reference``: ``trains`` when both
    ran and their losses and trained weights agree within ``atol``."""
    nvme = (f"offload.nvme_dir={tmp}",) if any(o.startswith("offload.") for o in overrides) else ()
    code, text = run_cli(recipe(model_dir, tmp / "run", *overrides, *nvme), tmp)
    outcome = _refusal(code, text)
    if glob.glob(str(tmp / "*.swap")):
        return Outcome("broken", "swap files left behind: " + ", ".join(glob.glob(str(tmp / "*.swap"))))
    if outcome is not None:
        return outcome
    code, text = run_cli(recipe(model_dir, tmp / "memory", *reference), tmp / "ref")
    if code != 0:
        return Outcome("broken", f"the in-memory reference failed (exit {code}): {text.strip()[-2000:]}")
    got, want = _losses(tmp / "run"), _losses(tmp / "memory")
    if len(got) != len(want) or max(abs(a - b) for a, b in zip(got, want)) > atol:
        return Outcome("broken", f"streamed losses {got} != in-memory {want}")
    wg, ww = _weights(tmp / "run"), _weights(tmp / "memory")
    if wg.keys() != ww.keys():
        return Outcome("broken", f"saved weights differ in keys: {sorted(set(wg) ^ set(ww))[:5]}")
    worst = max((float((wg[k].float() - ww[k].float()).abs().max()) for k in wg), default=0.0)
    if worst > atol:
        return Outcome("broken", f"trained weights differ from in-memory by {worst:.3g}")
    return Outcome("trains", f"equals in-memory (losses {', '.join(f'{v:.4f}' for v in got)})")


def table(outcomes: dict[tuple[str, str], Outcome]) -> str:
    """Markdown table: a row per architecture, a column per feature; refusals footnoted with their reason."""
    features = list(FEATURES)
    lines = ["| architecture | " + " | ".join(FEATURES[f][0] for f in features) + " |",
             "|---|" + "---|" * len(features)]
    notes: list[str] = []
    for family in zoo.FAMILIES:
        cells = []
        for f in features:
            o = outcomes[(family, f)]
            text = o.cell()
            if o.status == "refused":
                if o.detail not in notes:
                    notes.append(o.detail)
                text += f" [{notes.index(o.detail) + 1}]"
            cells.append(text)
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- [{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def readme_table() -> str | None:
    text = README.read_text()
    if BEGIN not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def write_readme(generated: str) -> None:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{BEGIN}\n{generated}\n{END}{tail}")


def main(argv: list[str]) -> int:
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = zoo.tokenizer()
    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in zoo.FAMILIES:
            model_dir = zoo.build(family, Path(tmp) / "models" / family, tok)
            for feature in FEATURES:
                o = run_cell(family, feature, model_dir, Path(tmp) / family / feature)
                outcomes[(family, feature)] = o
                print(f"{family:9s} {feature:12s} {o.status:8s} {o.detail.splitlines()[-1] if o.detail else ''}",
                      flush=True)
    generated = table(outcomes)
    print(generated)
    if "--readme" in argv:
        write_readme(generated)
    return 0 if all(o.status != "broken" for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
