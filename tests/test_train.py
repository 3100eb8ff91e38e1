"""The loop end to end on CPU: the CLI in-process, LoRA/QLoRA/full training, exact resume, atomic checkpoints."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune.cli.main import main
from slimtune.finetune import load_recipe, recipe_from_dict, train
from slimtune.finetune.checkpoint import list_checkpoints, load_checkpoint
from slimtune.finetune.errors import CheckpointError, SlimtuneError
from slimtune.finetune.metrics import read_metrics
from slimtune.finetune.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data" / "quickstart.jsonl"


def tiny(tmp_path: Path, *overrides: str) -> dict:
    """A recipe small enough for a few seconds per run: 2 layers, hidden 32, 64 examples."""
    data = {
        "model": {"architecture": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "max_position_embeddings": 128},
                  "tokenizer_vocab_size": 320},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": str(DATA), "format": "alpaca", "max_samples": 48, "val_size": 8, "max_length": 96,
                 "metric": "exact_match", "metric_samples": 4, "max_new_tokens": 4},
        "training": {"learning_rate": 3e-3, "per_device_train_batch_size": 4, "max_steps": 8, "seed": 7,
                     "lr_scheduler_type": "cosine", "warmup_steps": 2},
        "output": {"output_dir": str(tmp_path / "run"), "logging_steps": 1, "plots": False},
    }
    from slimtune.finetune.recipe import apply_overrides

    return apply_overrides(data, list(overrides))


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_cli_train_end_to_end(tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny(tmp_path, "output.plots=true", "training.max_steps=12"))
    assert main(["train", str(recipe), "--no-progress", "training.learning_rate=5e-3"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "memory.png", "summary.json", "recipe.yaml", "base_model/config.json"):
        assert (run / name).is_file(), name
    records = read_metrics(run / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    for key in ("step", "loss", "lr", "tokens_per_s", "peak_rss_bytes"):
        assert all(r.get(key) is not None for r in train_records), key
    evals = [r for r in records if "eval_loss" in r]
    assert [e["step"] for e in evals] == [0, 12] and "eval_exact_match" in evals[0]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learned something
    assert yaml.safe_load((run / "recipe.yaml").read_text())["training"]["learning_rate"] == 5e-3  # override kept
    assert "eval loss" in out and "exact match" in out and "peak RSS" in out and str(run / "adapter") in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["samples"]


@pytest.mark.parametrize("adapter", ["lora", "qlora", "none"])
def test_training_reduces_loss(tmp_path, adapter):
    lr = "2e-3" if adapter == "none" else "2e-2"
    recipe = recipe_from_dict(tiny(tmp_path, f"adapter.type={adapter}", "training.max_steps=16",
                                   f"training.learning_rate={lr}", "data.metric=none", "adapter.dropout=0"))
    result = train(recipe, progress=False)
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"] - 0.2
    sd = load_file(result.adapter_dir / ("model.safetensors" if adapter == "none" else "adapter_model.safetensors"))
    assert sd and all(torch.isfinite(t).all() for t in sd.values())


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = ("adapter.dropout=0", "data.metric=none", "training.max_steps=4", "training.max_grad_norm=0")
    big = train(recipe_from_dict(tiny(tmp_path / "a", *common, "training.per_device_train_batch_size=4")),
                progress=False)
    acc = train(recipe_from_dict(tiny(tmp_path / "b", *common, "training.per_device_train_batch_size=2",
                                      "training.gradient_accumulation_steps=2")), progress=False)
    assert acc.losses == pytest.approx(big.losses, rel=1e-5)
    a = load_file(big.adapter_dir / "adapter_model.safetensors")
    b = load_file(acc.adapter_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


class Interrupt(Exception):
    pass


def run_killed_at(monkeypatch, die_at: int, start: Callable[[], object]) -> None:
    """Run ``start()`` with its ``die_at``-th optimizer step raising :class:`Interrupt`, as a crash would."""
    original, calls = Trainer.optimizer_step, {"n": 0}

    def dying_step(self, micro):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise Interrupt()
        return original(self, micro)

    monkeypatch.setattr(Trainer, "optimizer_step", dying_step)
    with pytest.raises(Interrupt):
        start()
    monkeypatch.setattr(Trainer, "optimizer_step", original)


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    # dropout (RNG), accumulation and an epoch boundary (40 rows / (4*2) = 5 steps per epoch) between save and end
    args = ("training.max_steps=12", "output.save_steps=4", "training.gradient_accumulation_steps=2",
            "data.max_samples=48", "adapter.dropout=0.1", "data.metric=none")
    resumed_equals_uninterrupted(tmp_path, monkeypatch, args)


def resumed_equals_uninterrupted(tmp_path, monkeypatch, args: tuple[str, ...]):
    """A 12-step run, and the same run killed after checkpoint-4 (and two more steps) and resumed: the same losses
    and weights, bit for bit on CPU fp32. Returns both results."""
    full = train(recipe_from_dict(tiny(tmp_path / "full", *args)), progress=False)
    run_killed_at(monkeypatch, 7, lambda: train(recipe_from_dict(tiny(tmp_path / "cut", *args)), progress=False))
    run = tmp_path / "cut" / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-4"]

    resumed = train(recipe_from_dict(tiny(tmp_path / "cut", *args, "training.resume_from_checkpoint=true")),
                    progress=False)
    assert resumed.resumed_from.name == "checkpoint-4"
    assert losses(run) == losses(tmp_path / "full" / "run") and len(losses(run)) == 12  # steps 1..12
    a = load_file(full.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    return full, resumed


def test_resume_refuses_a_changed_recipe(tmp_path):
    args = ("training.max_steps=4", "output.save_steps=2", "data.metric=none")
    train(recipe_from_dict(tiny(tmp_path, *args)), progress=False)
    changed = recipe_from_dict(tiny(tmp_path, *args, "training.resume_from_checkpoint=true",
                                    "training.learning_rate=1e-2", "adapter.r=8"))
    with pytest.raises(CheckpointError) as info:
        train(changed, progress=False)
    assert "training.learning_rate: 0.003 -> 0.01" in str(info.value) and "adapter.r: 4 -> 8" in str(info.value)


def test_new_run_refuses_a_used_output_dir(tmp_path):
    args = ("training.max_steps=2", "data.metric=none")
    train(recipe_from_dict(tiny(tmp_path, *args)), progress=False)
    with pytest.raises(SlimtuneError, match="already holds a run"):
        train(recipe_from_dict(tiny(tmp_path, *args)), progress=False)
    train(recipe_from_dict(tiny(tmp_path, *args, "output.overwrite_output_dir=true")), progress=False)


def test_save_total_limit_and_tensor_only_state(tmp_path):
    result = train(recipe_from_dict(tiny(tmp_path, "training.max_steps=8", "output.save_steps=2",
                                         "output.save_total_limit=2", "data.metric=none")), progress=False)
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-6", "checkpoint-8"]
    ckpt = load_checkpoint(result.run_dir / "checkpoints" / "checkpoint-8")  # every .pt via weights_only=True
    assert ckpt.state.step == 8 and ckpt.optimizer["state"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import slimtune.finetune.checkpoint as ck
    from slimtune.finetune import load_recipe, train
    real_save = torch.save
    def slow_save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        if "checkpoint-4" in str(path):
            print("SAVING", flush=True)
            time.sleep(600)   # the parent kills us here, mid-checkpoint
    ck.torch.save = slow_save
    train(load_recipe(sys.argv[1]), progress=False)
""")


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    recipe = write_recipe(tmp_path, tiny(tmp_path, "training.max_steps=6", "output.save_steps=2",
                                         "data.metric=none"))
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(recipe)], stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout.readline, "")
        assert any(line.strip() == "SAVING" for line in lines)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())  # the torn write
    assert load_checkpoint(run / "checkpoints" / "checkpoint-2").state.step == 2
    result = train(load_recipe(recipe, ["training.resume_from_checkpoint=true"]), progress=False)
    assert result.resumed_from.name == "checkpoint-2" and result.steps == 6
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())


def test_saved_adapter_loads_with_peft_and_generates(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path, tiny(tmp_path, "data.metric=none"))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    run = tmp_path / "run"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    capsys.readouterr()
    assert main(["generate", str(run), "--instruction", "Repeat the last word.", "--input", "red blue",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_malformed_dataset_row_is_a_clean_cli_error(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    recipe = write_recipe(tmp_path, tiny(tmp_path, f"data.path={data}", "data.val_size=0", "data.metric=none",
                                         "data.max_samples=null"))
    assert main(["train", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "line 2" in err and "output" in err and "Traceback" not in err


def test_report_to_tensorboard_writes_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(recipe_from_dict(tiny(tmp_path, "training.max_steps=3", "data.metric=none",
                                         "output.report_to=[tensorboard]")), progress=False)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(result.losses, rel=1e-6)
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 3]


def test_resume_with_longer_max_steps_warns_and_continues(tmp_path):
    train(recipe_from_dict(tiny(tmp_path, "training.max_steps=4", "data.metric=none")), progress=False)
    longer = recipe_from_dict(tiny(tmp_path, "training.max_steps=6", "data.metric=none",
                                   "training.resume_from_checkpoint=true"))
    with pytest.warns(UserWarning, match=r"training.max_steps: 4 -> 6"):
        result = train(longer, progress=False)
    assert result.steps == 6 and sorted(losses(result.run_dir)) == [1, 2, 3, 4, 5, 6]


def test_gradient_checkpointing_gives_the_same_run_and_bf16_trains(tmp_path):
    common = ("adapter.dropout=0", "data.metric=none", "training.max_steps=6")
    plain = train(recipe_from_dict(tiny(tmp_path / "a", *common)), progress=False)
    ckpt = train(recipe_from_dict(tiny(tmp_path / "b", *common, "training.gradient_checkpointing=true")),
                 progress=False)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)  # recomputation, not approximation
    bf16 = train(recipe_from_dict(tiny(tmp_path / "c", *common, "training.bf16=true")), progress=False)
    assert bf16.losses == pytest.approx(plain.losses, rel=2e-2)  # autocast: same run to bf16 precision
    assert bf16.losses != plain.losses  # and autocast really was on


def test_disk_full_during_save_is_a_clean_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    import slimtune.finetune.checkpoint as ck

    real_save = ck.torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    recipe = recipe_from_dict(tiny(tmp_path, "training.max_steps=6", "output.save_steps=2", "data.metric=none"))
    with pytest.raises(CheckpointError, match=r"No space left on device; the previous checkpoint .*checkpoint-2 is"):
        train(recipe, progress=False)
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    load_checkpoint(run / "checkpoints" / "checkpoint-2")


def _chat_and_text_files(tmp_path: Path) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:64]]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"{r['instruction']} {r['input']}"},
        {"role": "assistant", "content": r["output"]}]}) + "\n" for r in rows))
    text = tmp_path / "text.csv"
    text.write_text("text\n" + "".join(f"\"{r['instruction']} {r['input']} -> {r['output']}\"\n" for r in rows))
    return chat, text


def test_a_sharegpt_file_trains_exactly_like_the_same_conversations_as_messages(tmp_path):
    chat, _ = _chat_and_text_files(tmp_path)
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    share = tmp_path / "share.jsonl"
    share.write_text("".join(json.dumps({"conversations": [{"from": speaker[t["role"]], "value": t["content"]}
                                                           for t in json.loads(line)["messages"]]}) + "\n"
                             for line in chat.read_text().splitlines()))
    runs = [train(recipe_from_dict(tiny(tmp_path / fmt, f"data.path={path}", f"data.format={fmt}", "data.metric=none",
                                        "training.max_steps=4", "data.max_samples=null")), progress=False)
            for fmt, path in (("messages", chat), ("sharegpt", share))]
    assert runs[0].losses == runs[1].losses and len(runs[0].losses) == 4


@pytest.mark.parametrize("fmt, packing", [("messages", False), ("messages", True), ("text", True)])
def test_chat_and_text_formats_train_end_to_end(tmp_path, fmt, packing):
    chat, text = _chat_and_text_files(tmp_path)
    path = chat if fmt == "messages" else text
    metric = "exact_match" if fmt == "messages" else "none"
    result = train(recipe_from_dict(tiny(tmp_path, f"data.path={path}", f"data.format={fmt}",
                                         f"data.packing={str(packing).lower()}", f"data.metric={metric}",
                                         "training.max_steps=10", "training.learning_rate=1e-2",
                                         "data.max_samples=null")), progress=False)
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    if fmt == "messages":
        assert "eval_exact_match" in result.eval_after and result.samples
        assert "<|assistant|>" in result.samples[0][0]  # the built-in chat template (the tokenizer has none)


def test_resume_from_an_explicit_checkpoint_path(tmp_path):
    args = ("training.max_steps=6", "output.save_steps=2", "output.save_total_limit=null", "data.metric=none",
            "adapter.dropout=0.1")
    first = train(recipe_from_dict(tiny(tmp_path, *args)), progress=False)
    original = losses(first.run_dir)
    path = first.run_dir / "checkpoints" / "checkpoint-2"
    again = train(recipe_from_dict(tiny(tmp_path, *args, f"training.resume_from_checkpoint={path}")), progress=False)
    assert again.resumed_from == path
    assert losses(again.run_dir) == original  # steps 3..6 replayed exactly; the log holds each step once


def test_train_from_a_local_model_directory_with_qlora(tmp_path):
    first = train(recipe_from_dict(tiny(tmp_path / "a", "training.max_steps=1", "data.metric=none")), progress=False)
    base_dir = first.run_dir / "base_model"  # a plain save_pretrained directory (weights + tokenizer)
    data = tiny(tmp_path / "b", "adapter.type=qlora", "training.max_steps=12", "training.learning_rate=2e-2",
                "data.metric=none", "adapter.dropout=0")
    data["model"] = {"name_or_path": str(base_dir), "dtype": "float32"}
    result = train(recipe_from_dict(data), progress=False)
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"] - 0.2
    meta = json.loads((result.adapter_dir / "slimtune.json").read_text())
    assert meta["quantized"] and meta["quantization"]["quant_type"] == "nf4"
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == base_dir.resolve()


def test_on_step_reports_each_step_with_its_time_and_tokens(tmp_path):
    """The seam the benches time steps through: one call per optimizer step, in order, with the step's bounds and
    the same token count the metrics log."""
    calls = []
    recipe = recipe_from_dict(tiny(tmp_path, "training.max_steps=3", "data.metric=none"))
    from slimtune.finetune.build import prepare

    result = Trainer(recipe, prepare(recipe), progress=False,
                     on_step=lambda *args: calls.append(args)).train()
    assert [c[0] for c in calls] == [1, 2, 3] and result.steps == 3
    assert all(began <= ended for _, began, ended, _ in calls)
    assert all(calls[i][2] <= calls[i + 1][1] for i in range(2))
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "tokens_seen" in r][-1]
    assert sum(c[3] for c in calls) == last["tokens_seen"]


FAULTS_SCRIPT = """
import resource, sys, torch
from slimtune.finetune.engine import InMemoryEngine
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 256))
if sys.argv[1] == "engine":
    InMemoryEngine(model, torch.device("cpu"))
x = torch.randn(2560, 256)  # activations of 40 MiB: above any threshold glibc adjusts to
def faults_of_steps(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        model(x).square().mean().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_steps(5)
print(faults_of_steps(10))
"""


def test_in_memory_training_reuses_freed_activations_instead_of_faulting_them_in_every_step(tmp_path):
    """With nothing offloaded, the engine keeps freed activations in the heap (a fixed high mmap threshold): a
    training step's 40 MiB activations are not mapped, page-faulted and zeroed again every step, as glibc's default
    does above its 32 MiB cap (measured: 12-15% of the quickstart's step). Minor page faults over 10 steady
    steps, each process fresh (the setting is process-wide): the engine's must be a fraction of the default's."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS_SCRIPT)
    faults = {mode: int(subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("default", "engine")}
    assert faults["default"] > 10 * 10240, faults  # glibc's default: at least one 40 MiB activation per step
    assert faults["engine"] < faults["default"] / 10, faults
