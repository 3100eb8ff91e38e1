"""Every architecture x feature through ``slimtune train`` trains correctly or is refused with the reason
(tests/support_matrix.py runs a cell), and README's support table is the one these cells produce. Also: each
optimizer with gradient accumulation through the streamed paths, the combinations that used to crash or silently
lose work, a diverged run, and no network access during a local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import support_matrix as sm  # noqa: E402
import zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """family -> a saved tiny model of it (built on first use)."""
    tok, root, built = zoo.tokenizer(), tmp_path_factory.mktemp("zoo"), {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = zoo.build(family, root / family, tok)
        return built[family]

    return get


def _readme_cells() -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """README's table as {(family, feature): cell text} and its footnotes {"[k]": reason}."""
    text = sm.readme_table()
    assert text, f"README.md has no {sm.BEGIN} ... {sm.END} table: run python tests/support_matrix.py --readme"
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| architecture")]
    cells = {}
    for row in rows:
        family, *values = [c.strip() for c in row.strip("|").split("|")]
        cells.update({(family, f): v for f, v in zip(sm.FEATURES, values)})
    notes = {line.split(" ", 2)[1]: line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("- [")}
    return cells, notes


@pytest.mark.parametrize("feature", list(sm.FEATURES))
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_cell_trains_or_is_refused_as_the_readme_says(tmp_path, model_dirs, family, feature):
    outcome = sm.run_cell(family, feature, model_dirs(family), tmp_path)
    assert outcome.status != "broken", outcome.detail
    cells, notes = _readme_cells()
    shown = cells.get((family, feature), "")
    assert shown.split(" [")[0] == outcome.cell(), (
        f"README says {shown!r}, the cell {outcome.status} ({outcome.detail}); regenerate the table with "
        "python tests/support_matrix.py --readme")
    if outcome.status == "refused":
        assert notes.get(shown.split(" ")[-1]) == outcome.detail
        assert "adapter." in outcome.detail or "offload." in outcome.detail or "model." in outcome.detail


# ------------------------------------------------------------------------------------ accumulation, streamed
STREAMED = {
    "lora_nvme": (("adapter.type=lora", "offload.params=nvme"), ("adapter.type=lora",)),
    "full_nvme": (("adapter.type=none", "training.max_grad_norm=0", "training.learning_rate=1e-3",
                   sm.WELL_CONDITIONED, "offload.params=nvme", "offload.optimizer_state=nvme"),
                  ("adapter.type=none", "training.max_grad_norm=0", "training.learning_rate=1e-3",
                   sm.WELL_CONDITIONED)),
}
OPTIMIZERS = {"adamw": (), "galore": ("optimizer.name=galore", "optimizer.rank=4"),
              "frugal": ("optimizer.name=frugal",), "spam": ("optimizer.name=spam",)}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("path", list(STREAMED))
def test_every_optimizer_accumulates_through_the_streamed_paths(tmp_path, model_dirs, path, optimizer):
    cell, reference = STREAMED[path]
    common = (*OPTIMIZERS[optimizer], "training.gradient_accumulation_steps=2", "training.max_steps=2")
    outcome = sm.compare(model_dirs("llama"), tmp_path, (*cell, *common), (*reference, *common))
    assert outcome.status == "trains", outcome.detail


def test_streamed_mezo_uses_every_micro_batch(tmp_path, model_dirs):
    """ZOStream.step used to get only the first micro-batch of an accumulated step: the SPSA batch is all of them,
    as in memory (equal up to the rounding of the weights' perturbation round trips)."""
    _, cell, reference = sm.FEATURES["mezo_nvme"]
    ga = ("training.gradient_accumulation_steps=3",)
    outcome = sm.compare(model_dirs("qwen2"), tmp_path, (*cell, *ga), (*reference, *ga))
    assert outcome.status == "trains", outcome.detail


def test_streamed_mezo_on_mixlora_without_router_loss_equals_in_memory_and_with_it_is_refused(tmp_path, model_dirs):
    """ZO streaming computes the LM loss per perturbed chunk and has no MixLoRA router loss: with the loss off it is
    the in-memory run; with it on (the default) the recipe is refused rather than trained on another objective."""
    mix = ("adapter.type=mixlora", "adapter.num_experts=4", "optimizer.name=mezo", "training.max_grad_norm=0",
           "training.learning_rate=1e-3", "training.max_steps=2")
    outcome = sm.compare(model_dirs("llama"), tmp_path / "off", (*mix, "adapter.router_aux_loss_coef=0",
                                                                  "offload.params=nvme"),
                         (*mix, "adapter.router_aux_loss_coef=0", "optimizer.noise=per_tensor"))
    assert outcome.status == "trains", outcome.detail
    outcome = sm.compare(model_dirs("llama"), tmp_path / "on", (*mix, "offload.params=nvme"), mix)
    assert outcome.status == "refused" and "adapter.router_aux_loss_coef" in outcome.detail, outcome.detail


def test_galore_8bit_per_layer_with_accumulation_trains_and_tracks_32bit(tmp_path, model_dirs):
    """configs/gpu-24gb/llama3-8b-galore-8bit-per-layer.yaml's combination (8-bit GaLore state, updates fused into
    backward, gradient accumulation, checkpointing) end to end: the moments really are 8-bit (rank 32 makes the MLP's
    projected moments >= min_8bit_size), the run learns, and it tracks the same run with 32-bit state to the
    quantization error. (Per-layer accumulation refreshes a projector from the first micro-batch's gradient, so it
    is close to, not equal to, the grouped step: tests/test_galore.py pins that down.)"""
    import torch

    galore = ("adapter.type=none", "optimizer.name=galore", "optimizer.rank=32", "optimizer.per_layer=true",
              "optimizer.update_proj_gap=3", "training.max_grad_norm=0", "training.learning_rate=3e-3",
              "training.gradient_accumulation_steps=2", "training.gradient_checkpointing=true",
              "training.max_steps=8", "output.save_steps=4")
    runs = {}
    for bits in (8, 32):
        code, text = sm.run_cli(sm.recipe(model_dirs("llama"), tmp_path / str(bits), *galore,
                                          f"optimizer.state_bits={bits}"), tmp_path / f"w{bits}")
        assert code == 0, text
        runs[bits] = tmp_path / str(bits)
    state = torch.load(runs[8] / "checkpoints" / "checkpoint-8" / "optimizer.pt", weights_only=True)["state"]
    assert any(v.dtype == torch.uint8 for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
    summary = json.loads((runs[8] / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.5
    l8, l32 = sm._losses(runs[8]), sm._losses(runs[32])
    assert max(abs(a - b) for a, b in zip(l8, l32)) < 1e-2 and l8[-1] < l8[0] - 1.0, (l8, l32)


# ------------------------------------------------------------------------------------ combinations
def test_full_training_with_streamed_weights_updates_their_home(tmp_path, model_dirs):
    """offload.params cpu with the state left to the planner: the update runs on the CPU and writes the layers'
    homes (before, the plan kept the state on the device and every update landed in a ring slot and was lost)."""
    full = ("adapter.type=none", "training.max_grad_norm=0", "training.learning_rate=1e-3", sm.WELL_CONDITIONED,
            "training.max_steps=2")
    outcome = sm.compare(model_dirs("gpt2"), tmp_path, (*full, "offload.params=cpu"), full)
    assert outcome.status == "trains", outcome.detail


def test_full_training_with_streamed_weights_and_device_state_is_refused(tmp_path, model_dirs):
    full = ("adapter.type=none", "training.max_grad_norm=0", "offload.params=nvme", "offload.optimizer_state=gpu",
            f"offload.nvme_dir={tmp_path}")
    code, text = sm.run_cli(sm.recipe(model_dirs("llama"), tmp_path / "run", *full), tmp_path)
    assert code == 2 and "Traceback" not in text, text
    assert "offload.optimizer_state" in text and "offload.params nvme" in text and "cpu or nvme" in text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_model_without_a_layer_list_is_refused_when_offloaded(tmp_path, model_dirs, monkeypatch):
    """The engine's 'no decoder layers' error reaches the user as the one-line error (exit 2), not a traceback."""
    import slimtune.finetune.streamed_load as streamed_load

    original = streamed_load.AutoModelForCausalLM.from_config  # streamed params: the model is built from its config

    def odd_model(*args, **kwargs):  # a model whose config does not describe its layer list
        model = original(*args, **kwargs)
        model.config.num_hidden_layers = 7
        return model

    monkeypatch.setattr(streamed_load.AutoModelForCausalLM, "from_config", odd_model)
    code, text = sm.run_cli(sm.recipe(model_dirs("llama"), tmp_path / "run", "offload.params=nvme",
                                      f"offload.nvme_dir={tmp_path}"), tmp_path)
    assert code == 2 and "Traceback" not in text, text
    assert "cannot be offloaded" in text and "offload.params" in text


# ------------------------------------------------------------------------------------ divergence
def test_a_diverged_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    """The quickstart at learning rate 1e6 without clipping: the loss becomes NaN within a few steps."""
    run = tmp_path / "run"
    data = sm.read_yaml_recipe(ROOT / "configs" / "quickstart.yaml", "training.learning_rate=1e6",
                               "training.max_grad_norm=0", "training.max_steps=40", "output.save_steps=1",
                               "output.save_total_limit=1", "output.logging_steps=1", "data.max_samples=256",
                               "data.val_size=16",
                               "data.metric_samples=4", f"output.output_dir={run}")
    code, text = sm.run_cli(data, tmp_path)
    assert code == 2 and "Traceback" not in text, text
    line = next(line for line in text.splitlines() if "error:" in line)
    step = int(line.split(" at step ")[1].split()[0])
    assert "the loss became nan" in line or "the loss became inf" in line, line
    assert "training.learning_rate" in line and "training.max_grad_norm" in line
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == [f"checkpoint-{step - 1}"] and f"checkpoint-{step - 1}" in line
    records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]  # valid JSON throughout
    assert max(r["step"] for r in records) == step - 1
    assert not (run / "adapter").exists()  # no final adapter from a diverged run


# ------------------------------------------------------------------------------------ no network
GUARD = r"""
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("network access during a local run")
socket.getaddrinfo = refuse
socket.socket.connect = lambda self, address: refuse(address)
socket.socket.connect_ex = lambda self, address: refuse(address)
from slimtune.cli.main import main
code = main(sys.argv[1:])
print("NETWORK ATTEMPTS", len(attempts), attempts[:3], file=sys.stderr)
sys.exit(code)
"""


def test_a_local_qlora_run_opens_no_connection_and_prints_no_kernel_hub_message(tmp_path):
    """bitsandbytes asks the kernel hub for a CPU kernel at import (on AVX512-BF16 CPUs) and datasets pings its
    bucket when loading a local file: neither may happen, and neither may print, in a run on local files."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    args = ["train", str(ROOT / "configs" / "quickstart.yaml"), "--no-progress", "adapter.type=qlora",
            "training.max_steps=2", "data.metric_samples=4", f"output.output_dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-c", GUARD, *args], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NETWORK ATTEMPTS 0 " in out.stderr, out.stderr[-3000:]
    for text in ("kernels-community", "Failed to load", "publisher trust"):
        assert text not in out.stdout + out.stderr
