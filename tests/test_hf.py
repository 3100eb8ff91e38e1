"""The Hugging Face route (slimtune.finetune.hf): a recipe run through ``transformers.Trainer`` gives the per-step
losses of ``slimtune train`` on the same recipe, Trainer checkpoints resume our optimizers exactly, and a user's own
Trainer script gets slimtune's optimizers and logs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from test_optimizer_integration import METHODS
from test_train import tiny

from slimtune.finetune import RecipeError, recipe_from_dict, train
from slimtune.finetune.hf import SlimtuneCallback, SlimtuneTrainer, from_recipe, slimtune_optimizer
from slimtune.finetune.metrics import read_metrics
from slimtune.offload import PlanError
from slimtune.optimizers import allocated_state_bytes

QUIET = ("data.metric=none", "data.val_size=0")
ROUTES = {
    "lora-adamw": ("training.gradient_accumulation_steps=2",),
    "qlora-galore": ("adapter.type=qlora", "model.load_in_4bit=true", *METHODS["galore"]),
    "full-frugal": ("adapter.type=none", "training.learning_rate=2e-3", *METHODS["frugal"]),
    "lora-spam": METHODS["spam"],
    "mixlora": ("adapter.type=mixlora", "adapter.num_experts=4", "adapter.top_k=2",
                "adapter.router_aux_loss_coef=0.01"),
    "per-layer-galore-accumulation": ("adapter.type=none", "training.learning_rate=2e-3", *METHODS["galore"],
                                      "optimizer.per_layer=true", "training.max_grad_norm=0",
                                      "training.gradient_accumulation_steps=2"),
    "mezo": ("adapter.type=none", "optimizer.name=mezo", "training.learning_rate=1e-3", "training.max_grad_norm=0",
             "training.gradient_accumulation_steps=2"),
}


def both_routes(tmp_path, *overrides: str) -> tuple[list[float], SlimtuneTrainer]:
    ours = train(recipe_from_dict(tiny(tmp_path / "cli", *QUIET, *overrides)), progress=False).losses
    trainer = from_recipe(recipe_from_dict(tiny(tmp_path / "hf", *QUIET, *overrides)))
    trainer.train()
    return ours, trainer


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_hf_route_gives_the_losses_of_slimtune_train(tmp_path, route):
    ours, trainer = both_routes(tmp_path, *ROUTES[route])
    assert len(ours) == 8
    assert trainer.step_losses == pytest.approx(ours, rel=1e-6)
    assert len(set(ours)) > 1  # the steps trained something different each time


def test_the_recipes_eval_split_is_the_trainers_eval_dataset(tmp_path):
    from slimtune.finetune.evaluate import eval_loss

    recipe = recipe_from_dict(tiny(tmp_path, "data.metric=none", "data.val_size=8", "training.eval_steps=4",
                                   "training.per_device_eval_batch_size=8"))
    trainer = from_recipe(recipe)
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [4, 8]
    ours = eval_loss(trainer.model, trainer.eval_dataset, 8, trainer.processing_class.pad_token_id,
                     trainer.args.device, False)  # one batch of all 8 rows: the same token mean
    assert evals[-1]["eval_loss"] == pytest.approx(ours, rel=1e-6)


def test_streamed_lora_from_nvme_on_the_hf_route(tmp_path):
    ours, trainer = both_routes(tmp_path, "offload.params=nvme", f"offload.nvme_dir={tmp_path}")
    assert trainer.engine.streamer is not None  # the layers really streamed
    assert trainer.step_losses == pytest.approx(ours, rel=1e-6)
    trainer.engine.close()


class Interrupt(Exception):
    pass


class DieAtStep(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt()


RESUMED = {"adamw": (), **METHODS, "mezo": ("optimizer.name=mezo", "training.learning_rate=1e-3",
                                          "training.max_grad_norm=0")}


@pytest.mark.parametrize("method", list(RESUMED))
def test_trainer_checkpoints_resume_our_optimizers_exactly(tmp_path, method):
    # galore/frugal refresh at step 5, spam resets at step 8: across the checkpoint at 4 and the crash at 6
    args = (*QUIET, "training.max_steps=8", "output.save_steps=4", "adapter.dropout=0.1", *RESUMED[method])
    full = from_recipe(recipe_from_dict(tiny(tmp_path / "full", *args)))
    full.train()
    cut = from_recipe(recipe_from_dict(tiny(tmp_path / "cut", *args)), callbacks=[DieAtStep(6)])
    with pytest.raises(Interrupt):  # two steps after checkpoint-4 was written
        cut.train()
    resumed = from_recipe(recipe_from_dict(tiny(tmp_path / "cut", *args, "output.overwrite_output_dir=true")))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "run" / "checkpoint-4"))
    assert resumed.step_losses == full.step_losses[4:]  # bit-identical on CPU fp32
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_stock_trainer_gets_a_slimtune_optimizer_and_the_callbacks_logs(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    optimizer = slimtune_optimizer(model, "galore", args, rank=4, update_proj_gap=2, scale=1.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                                   callbacks=[SlimtuneCallback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6 and all("peak_rss_bytes" in entry for entry in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert trainer.optimizer.optimizer is optimizer and any(optimizer.state[p] for p in optimizer.state)
    # the step-0 check predicted the optimizer state GaLore then allocated (projected moments, projectors)
    allocated = sum(allocated_state_bytes(optimizer, p) for g in optimizer.param_groups for p in g["params"])
    assert logs[-1]["plan_optimizer_state_bytes"] == allocated > 0


def test_a_stock_trainer_run_that_cannot_fit_is_refused_at_step_0_with_the_numbers(tmp_path, tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # full fine-tuning: 8 B/param state
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none", use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    data = [{"input_ids": torch.arange(3, 19), "labels": torch.arange(3, 19)}] * 4
    state = 8 * sum(p.numel() for p in model.parameters())
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[SlimtuneCallback(free_bytes=state)])  # state fits, gradients do not
    with pytest.raises(PlanError, match="optimizer state .* free. Smaller state"):
        trainer.train()
    assert trainer.state.global_step == 0


def stock_trainer(tmp_path, model_dir, make_optimizer, **args):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    ids = torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, **args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(make_optimizer(model, args), None))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("name, hparams", [("adamw", {}), ("frugal", dict(update_gap=3, density=0.5))])
def test_per_layer_updates_on_a_stock_trainer_with_accumulation_equal_the_grouped_step(tmp_path, tiny_model_dir,
                                                                                     name, hparams):
    # 2 micro-batches per step (transformers' own layer-wise GaLore refuses accumulation): the update runs in the
    # last micro-batch's backward. (GaLore's per-layer refresh takes its projector from the first micro-batch, so
    # it is close to, not equal to, the grouped step: tests/test_optimizer_integration.py.)
    common = dict(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                  max_grad_norm=0.0, lr_scheduler_type="cosine", warmup_steps=1)
    grouped = stock_trainer(tmp_path / "g", tiny_model_dir,
                            lambda model, args: slimtune_optimizer(model, name, args, **hparams), **common)
    fused = stock_trainer(tmp_path / "p", tiny_model_dir,
                          lambda model, args: slimtune_optimizer(model, name, args, per_layer=True, **hparams),
                          **common)
    assert fused == pytest.approx(grouped, rel=1e-5) and len(set(grouped)) == 6
    with pytest.raises(RecipeError, match="max_grad_norm=0"):
        slimtune_optimizer(torch.nn.Linear(4, 4), "adamw", transformers.TrainingArguments(
            output_dir=str(tmp_path), report_to="none", use_cpu=True), per_layer=True)


def test_fsdp_is_refused_with_the_reason_not_run_as_something_else(tmp_path):
    with pytest.raises(RecipeError, match="does not shard parameters"):
        from_recipe(recipe_from_dict(tiny(tmp_path, *QUIET)), fsdp="full_shard")


def test_a_stock_trainer_refuses_a_zeroth_order_optimizer_with_the_way_out(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(RecipeError, match="SlimtuneTrainer"):
        slimtune_optimizer(torch.nn.Linear(2, 2), "mezo", args)


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_examples() -> dict[str, str]:
    """The README's ``<!-- example: NAME -->`` python blocks, by name."""
    text = README.read_text()
    found = re.findall(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)```", text, flags=re.S)
    return dict(found)


def test_the_readme_examples_run_as_written(tmp_path, tiny_model_dir, monkeypatch):
    examples = readme_examples()
    assert list(examples) == ["stock-trainer", "slimtune-trainer", "from-recipe"]
    monkeypatch.chdir(tmp_path)
    root = README.parent
    namespace: dict = {}
    for name, code in examples.items():  # one script: the second example continues the first
        code = code.replace('"meta-llama/Llama-3.2-1B"', repr(str(tiny_model_dir)))
        code = code.replace('"configs/quickstart.yaml"', repr(str(root / "configs" / "quickstart.yaml")))
        exec(compile(code, f"README example {name}", "exec"), namespace)
        trainer = namespace["trainer"]
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert logs and all(math.isfinite(entry["loss"]) for entry in logs), name
        if name == "stock-trainer":
            assert "peak_rss_bytes" in logs[-1] and logs[-1]["loss"] < logs[0]["loss"]
        if name == "slimtune-trainer":
            assert trainer.zeroth_order and len(trainer.step_losses) == 20
        if name == "from-recipe":
            assert trainer.state.global_step == 50
            assert (tmp_path / "runs/hf-quickstart/adapter_model.safetensors").is_file()  # the quickstart's LoRA


# ------------------------------------------------------------------------------------------- several processes
RANKS_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import transformers
    from slimtune.finetune import load_recipe
    from slimtune.finetune.hf import from_recipe

    class DieAtStep(transformers.TrainerCallback):  # SIGKILL, as a crash or an OOM killer would
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["DIE_AT"]) and state.is_world_process_zero:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = from_recipe(load_recipe(sys.argv[1]), callbacks=[DieAtStep()] if "DIE_AT" in os.environ else [])
    trainer.train(resume_from_checkpoint=sys.argv[3] if len(sys.argv) > 3 else None)
    if trainer.is_world_process_zero():
        json.dump(trainer.step_losses, open(sys.argv[2], "w"))
""")
TWO_PROCESS_RUNS = {
    "lora-adamw": (),
    "full-galore": ("adapter.type=none", "training.learning_rate=2e-3", *METHODS["galore"]),
    "mezo": ("adapter.type=none", "optimizer.name=mezo", "training.learning_rate=1e-3", "training.max_grad_norm=0"),
    "full-frugal": ("adapter.type=none", "training.learning_rate=2e-3", *METHODS["frugal"]),
    "lora-spam": METHODS["spam"],
    # against one process with the same micro-batches (2 x accumulation 2): MixLoRA's router loss is computed per
    # micro-batch (per process), and bitsandbytes' 4-bit CPU matmul rounds differently at 2 and 4 rows (4e-5
    # relative after 8 steps, in one process as in two)
    "mixlora": ("adapter.type=mixlora", "adapter.num_experts=4", "adapter.top_k=2",
                "adapter.router_aux_loss_coef=0.01"),
    "qlora-adamw": ("adapter.type=qlora", "model.load_in_4bit=true"),
    # each process takes every other micro-batch of one seeded stream: 22 rows = 11 micro-batches per epoch, so the
    # rounds straddle epoch ends, as 2 accumulation steps of one process do
    "streamed": ("data.streaming=true", "data.shuffle_buffer=8", "data.max_samples=22"),
}
SAME_MICRO_BATCHES = {"mixlora", "qlora-adamw", "streamed"}


def two_processes(tmp_path, overrides, *extra_args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The recipe on 2 CPU processes (torchrun, gloo), 2 examples per process per micro-batch."""
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump(tiny(tmp_path / "two", *QUIET, *overrides,
                                          "training.per_device_train_batch_size=2")))
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(recipe),
               str(tmp_path / "losses.json"), *extra_args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def one_process(tmp_path, overrides, same_micro_batches: bool = False) -> list[float]:
    """The same recipe in this process, at the same global batch (4 examples per micro-batch, or 2 with
    accumulation 2: the micro-batches the two processes run)."""
    batch = ("training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2") \
        if same_micro_batches else ("training.per_device_train_batch_size=4",)
    trainer = from_recipe(recipe_from_dict(tiny(tmp_path / "one", *QUIET, *overrides, *batch)))
    trainer.train()
    return trainer.step_losses


@pytest.mark.parametrize("kind", list(TWO_PROCESS_RUNS))
def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path, kind):
    overrides = ("adapter.dropout=0", *TWO_PROCESS_RUNS[kind])
    proc = two_processes(tmp_path, overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    two = json.loads((tmp_path / "losses.json").read_text())
    assert two == pytest.approx(one_process(tmp_path, overrides, kind in SAME_MICRO_BATCHES), rel=1e-5)
    assert len(two) == 8


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_losses(tmp_path):
    overrides = ("adapter.dropout=0", "output.save_steps=4")
    proc = two_processes(tmp_path, overrides, env={"DIE_AT": "6"})
    assert proc.returncode != 0 and not (tmp_path / "losses.json").exists()
    checkpoint = tmp_path / "two" / "run" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").is_file()
    proc = two_processes(tmp_path, (*overrides, "output.overwrite_output_dir=true"), str(checkpoint))
    assert proc.returncode == 0, proc.stderr[-6000:]
    resumed = json.loads((tmp_path / "losses.json").read_text())
    assert resumed == pytest.approx(one_process(tmp_path, overrides)[4:], rel=1e-5)


@pytest.mark.parametrize("refused, reason", [
    (("optimizer.per_layer=true", "training.max_grad_norm=0"), "before DDP has averaged it"),
    (("offload.params=cpu",), "the offload engine runs in one process"),
])
def test_what_several_processes_cannot_run_is_refused_with_the_reason(tmp_path, refused, reason):
    proc = two_processes(tmp_path, refused)
    assert proc.returncode != 0 and reason in proc.stderr


EXIT_SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    import torch.distributed as dist
    from slimtune.finetune.hf.process_group import destroy_process_group_at_exit

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    atexit.register(lambda: open(sys.argv[2] + ".after", "w").write(str(dist.is_initialized())))  # runs after ours
    destroy_process_group_at_exit()

    def free_late():  # a gloo worker thread freeing the last collective's Python tensors just after the last line
        time.sleep(0.05)
        open(sys.argv[2], "w").write(str(dist.is_initialized()))

    threading.Thread(target=free_late, daemon=True).start()
""")


def test_the_exit_hook_lets_threads_that_need_the_gil_finish_before_the_group_and_interpreter_end(tmp_path):
    # A gloo worker thread that takes the GIL once the interpreter is finalizing kills the process with SIGABRT
    # (finetune/hf/process_group.py). Without the hook CPython ends this thread before it writes (timing-dependent,
    # so not asserted here); with it, the thread finishes while the group is up, then the group is destroyed.
    script = tmp_path / "ends.py"
    script.write_text(EXIT_SCRIPT)
    marker = tmp_path / "freed"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(marker)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "True"  # ran while the group was still up
    assert Path(f"{marker}.after").read_text() == "False"  # then the hook destroyed it


def test_slimtune_train_on_two_processes_writes_one_run_directory_or_refuses_with_exit_2(tmp_path):
    def launch(*overrides: str, torchrun: bool = False) -> subprocess.CompletedProcess:
        recipe = tmp_path / "cli.yaml"
        recipe.write_text(yaml.safe_dump(tiny(tmp_path / "cli", *QUIET, "training.per_device_train_batch_size=2",
                                              "output.overwrite_output_dir=true", *overrides)))
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "slimtune.cli",
                   "train", str(recipe)] if torchrun else ["-m", "slimtune.cli", "train", str(recipe), "--nproc", "2"]
        return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600)

    proc = launch("output.save_steps=4")
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = tmp_path / "cli" / "run"  # what one process writes, written once
    assert "done on 2 processes: 8 steps" in proc.stdout and proc.stdout.count("done on") == 1
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "summary.json",
                 "recipe.yaml", "checkpoint-4/optimizer.pt", "checkpoint-8/optimizer.pt"):
        assert (run / name).is_file(), name
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9)) and all(r["tokens_per_s"] > 0 for r in records)

    per_layer = ("optimizer.per_layer=true", "training.max_grad_norm=0")
    proc = launch(*per_layer)  # refused before any process starts
    assert proc.returncode == 2 and "before DDP has averaged it" in proc.stderr and "torch" not in proc.stderr
    proc = launch(*per_layer, torchrun=True)  # launched by hand: every process refuses, exit 2
    assert "slimtune train: error:" in proc.stderr and "before DDP has averaged it" in proc.stderr
    assert "exitcode  : 2" in proc.stderr
