"""The offload engine through `slimtune train`: offloaded runs equal in-memory runs (losses and final weights) for
LoRA/QLoRA streaming, full-parameter training with optimizer state on CPU and NVMe, and zeroth-order streaming;
resume with offloaded state equals the uninterrupted run; metrics report the tiers; bad settings fail up front."""

from __future__ import annotations

import glob
import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import losses, tiny, write_recipe

from slimtune.cli.main import main
from slimtune.finetune.build import prepare
from slimtune.finetune.recipe import recipe_from_dict
from slimtune.finetune.trainer import Trainer

FULL = ("adapter.type=none", "data.metric=none", "training.gradient_accumulation_steps=2", "training.max_steps=6")


def train(tmp_path, name, *overrides):
    recipe = recipe_from_dict(tiny(tmp_path / name, *overrides))
    return Trainer(recipe, prepare(recipe), progress=False).train()


def weights(result) -> dict[str, torch.Tensor]:
    """The saved result's tensors: an adapter, or a full model (one file, or shards from the streamed save)."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(result.adapter_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_same_run(a, b, atol: float = 0.0):
    la, lb = losses(a.run_dir), losses(b.run_dir)
    assert la.keys() == lb.keys()
    assert max(abs(la[k] - lb[k]) for k in la) <= atol, (la, lb)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("extra", [("offload.params=cpu",), ("offload.params=nvme", "offload.prefetch=2"),
                                   ("model.load_in_4bit=true", "adapter.type=qlora", "offload.params=nvme"),
                                   ("adapter.type=mixlora", "adapter.num_experts=4", "offload.params=nvme")])
def test_streamed_lora_and_qlora_equal_in_memory(tmp_path, extra):
    quant = tuple(x for x in extra if not x.startswith("offload."))
    expected = train(tmp_path, "memory", *quant)
    nvme = f"offload.nvme_dir={tmp_path}"
    got = train(tmp_path, "offload", *extra, nvme)
    assert_same_run(expected, got)  # bit-identical: same ops, dropout recomputed from the saved RNG state
    assert got.eval_after == expected.eval_after
    assert not glob.glob(str(tmp_path / "*.swap"))  # swap files removed with the run
    record = [r for r in map(json.loads, (got.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    assert record["bytes_to_device_per_step"] > 0 and record["gpu_tier_bytes"] > 0
    tier = "nvme" if "offload.params=nvme" in extra else "cpu"
    assert record[f"{tier}_tier_bytes"] > 0
    if tier == "nvme":
        assert record["nvme_read_bytes_per_step"] == record["bytes_to_device_per_step"]


@pytest.mark.parametrize("optimizer,state", [("adamw", "cpu"), ("adamw", "nvme"), ("galore", "nvme"),
                                             ("frugal", "cpu"), ("adamw-8bit", "nvme"), ("spam-8bit", "nvme")])
def test_full_parameter_offloaded_state_equals_in_memory(tmp_path, optimizer, state):
    name, bits = optimizer.split("-8bit")[0], "8" if optimizer.endswith("-8bit") else "32"
    opt = (f"optimizer.name={name}", "training.max_grad_norm=0", f"optimizer.state_bits={bits}")
    if optimizer == "galore":
        opt += ("optimizer.rank=4",)
    expected = train(tmp_path, "memory", *FULL, *opt)
    params = ("offload.params=nvme",) if state == "nvme" else ()
    got = train(tmp_path, "offload", *FULL, *opt, f"offload.optimizer_state={state}", *params,
                f"offload.nvme_dir={tmp_path}")
    # per-tensor update on fp32 masters vs torch's grouped step: equal up to float rounding of the same math
    assert_same_run(expected, got, atol=2e-6)
    assert not glob.glob(str(tmp_path / "*.swap"))


def test_offloaded_clipping_equals_in_memory(tmp_path):
    expected = train(tmp_path, "memory", *FULL, "training.max_grad_norm=0.5")
    got = train(tmp_path, "offload", *FULL, "training.max_grad_norm=0.5", "offload.optimizer_state=cpu",
                "offload.params=cpu")
    assert_same_run(expected, got, atol=2e-6)
    norms = [r["grad_norm"] for r in map(json.loads, (got.run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert all(n is not None and n > 0 for n in norms)


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_zeroth_order_streaming_equals_in_memory_mezo(tmp_path, adapter):
    common = ("optimizer.name=mezo", "training.learning_rate=1e-3", f"adapter.type={adapter}")
    expected = train(tmp_path, "memory", *common, "optimizer.noise=per_tensor")
    got = train(tmp_path, "offload", *common, "offload.params=nvme", f"offload.nvme_dir={tmp_path}")
    assert_same_run(expected, got)
    assert got.eval_after == expected.eval_after  # eval after the deferred update was flushed


class Interrupt(Exception):
    pass


def test_resume_with_state_on_nvme_equals_uninterrupted(tmp_path, monkeypatch):
    run = (*FULL, "training.max_grad_norm=0", "offload.optimizer_state=nvme", "offload.params=nvme",
           f"offload.nvme_dir={tmp_path}", "output.save_steps=3")
    full = train(tmp_path, "full", *run)
    original, calls = Trainer.optimizer_step, {"n": 0}

    def dying_step(self, micro):
        calls["n"] += 1
        if calls["n"] == 5:  # after checkpoint-3 was written and one more step ran
            raise Interrupt()
        return original(self, micro)

    monkeypatch.setattr(Trainer, "optimizer_step", dying_step)
    with pytest.raises(Interrupt):
        train(tmp_path, "cut", *run)
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    assert not glob.glob(str(tmp_path / "*.swap"))  # a failed run removes its swap files too
    resumed = train(tmp_path, "cut", *run, "training.resume_from_checkpoint=true")
    assert resumed.resumed_from.name == "checkpoint-3" and (resumed.resumed_from / "offload").is_dir()
    assert_same_run(full, resumed)


def test_bad_nvme_dir_and_too_small_budget_fail_before_training(tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny(tmp_path, "offload.params=nvme", f"offload.nvme_dir={tmp_path}/missing"))
    assert main(["train", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "offload.nvme_dir" in err and "missing" in err and "Traceback" not in err
    recipe = write_recipe(tmp_path, tiny(tmp_path, "offload.cpu_memory=64MB"))
    assert main(["train", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "offload.cpu_memory" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained, nothing half-written


PEAK_PROBE = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
from test_train import tiny
from pathlib import Path
from slimtune.finetune.build import prepare
from slimtune.finetune.offloading import _NOT_MEASURED
from slimtune.finetune.recipe import recipe_from_dict
from slimtune.finetune.trainer import Trainer
from slimtune.finetune.planning import plan_recipe

from slimtune.offload import current_rss_bytes

recipe = recipe_from_dict(tiny(Path(sys.argv[2]), *json.loads(sys.argv[3])))
prepared = prepare(recipe)
model = prepared.model
config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
trainer = Trainer(recipe, prepared, progress=False)
trainer.evaluate(None)  # warm: the first forward's kernel workspaces belong to the runtime, not to the plan
# runtime = RSS minus what the engine says it holds (device tier, cpu tier): libraries, data, workspaces. Its
# highest over a second eval: one reading between them dips by ~60 MB when the heap was just trimmed (malloc_trim)
import threading, time
held, rss, done = trainer.engine.tier_bytes(), [current_rss_bytes()], threading.Event()
def sample():
    while not done.is_set():
        rss.append(current_rss_bytes())
        time.sleep(0.005)
sampler = threading.Thread(target=sample)
sampler.start()
trainer.evaluate(None)
done.set()
sampler.join()
runtime = max(rss) - held["gpu_tier_bytes"] - held["cpu_tier_bytes"]
plan = plan_recipe(recipe, config=config, bandwidths=_NOT_MEASURED, runtime_bytes=runtime)
with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on: the run, not setup's transient copies
    f.write("5")
trainer.train()
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"predicted": plan.host_bytes, "measured": peak}))
"""

WIDE = ("model.architecture.hidden_size=768", "model.architecture.intermediate_size=2048",
        "model.architecture.num_hidden_layers=4", "training.max_steps=3", "data.metric=none")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("extra", [("adapter.type=none",), ("offload.params=nvme",),
                                   ("adapter.type=none", "training.max_grad_norm=0", "offload.params=nvme",
                                    "offload.optimizer_state=nvme")])
def test_plan_predicts_the_measured_peak_within_10_percent(tmp_path, extra):
    """The plan's host-memory peak (this is a CPU device: device tier + cpu tier + runtime) vs the measured peak RSS
    of the same run in a fresh process (setup's transient copies excluded: the peak is reset when training starts)."""
    import subprocess
    import sys
    from pathlib import Path

    overrides = [*WIDE, *extra, f"offload.nvme_dir={tmp_path}"]
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(Path(__file__).parent), str(tmp_path),
                          json.dumps(overrides)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(result["measured"] / result["predicted"] - 1) <= 0.10, result
