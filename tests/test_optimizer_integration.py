"""Optimizers inside the trainer: per-layer mode, zeroth-order steps, every method x adapter, resume, recipes."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.finetune import recipe_from_dict, train
from slimtune.finetune.build import prepare
from slimtune.finetune.errors import RecipeError
from slimtune.finetune.trainer import Trainer
from slimtune.optimizers import AdamW, allocated_state_bytes, optimizer_state_bytes

sys.path.insert(0, str(Path(__file__).parent))
from test_train import losses, run_killed_at, tiny  # noqa: E402

NO_CLIP = ("training.max_grad_norm=0", "adapter.dropout=0", "data.metric=none")


def run(tmp_path, *overrides):
    return train(recipe_from_dict(tiny(tmp_path, *NO_CLIP, *overrides)), progress=False)


def adapter_weights(result):
    name = "model.safetensors" if (result.adapter_dir / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(result.adapter_dir / name)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_per_layer_adamw_equals_grouped(tmp_path, accumulation):
    args = ("training.max_steps=6", f"training.gradient_accumulation_steps={accumulation}",
            "training.per_device_train_batch_size=2")
    grouped = run(tmp_path / "g", *args)
    fused = run(tmp_path / "p", *args, "optimizer.per_layer=true")
    assert fused.losses == pytest.approx(grouped.losses, rel=1e-5)  # torch AdamW vs its per-tensor twin: rounding
    a, b = adapter_weights(grouped), adapter_weights(fused)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_per_layer_frees_each_gradient_before_the_next_is_complete(tmp_path):
    recipe = recipe_from_dict(tiny(tmp_path, *NO_CLIP, "adapter.type=none", "optimizer.per_layer=true",
                                   "training.max_steps=1"))
    trainer = Trainer(recipe, prepare(recipe), progress=False)
    params = [p for _, p in trainer.params]
    alive = []
    for p in params:  # registered after the update hooks: sees the state right after each update
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    trainer.optimizer_step(trainer.micro_batches())
    assert len(alive) == len(params)
    assert max(alive) <= 1  # grouped mode would hold all of them before step()
    assert all(p.grad is None for p in params)


def test_recipe_refuses_per_layer_with_global_clipping_and_mezo_clipping(tmp_path):
    with pytest.raises(RecipeError, match="optimizer.per_layer true with training.max_grad_norm 1.0"):
        recipe_from_dict(tiny(tmp_path, "optimizer.per_layer=true"))
    with pytest.raises(RecipeError, match="training.max_grad_norm with optimizer mezo"):
        recipe_from_dict(tiny(tmp_path, "optimizer.name=mezo", "training.max_grad_norm=1.0"))
    recipe_from_dict(tiny(tmp_path, "optimizer.name=mezo"))  # the default max_grad_norm is not an explicit ask


def test_adamw_state_bytes_match_allocation(tmp_path):
    recipe = recipe_from_dict(tiny(tmp_path, *NO_CLIP, "optimizer.per_layer=true", "training.max_steps=1"))
    trainer = Trainer(recipe, prepare(recipe), progress=False)
    predicted = optimizer_state_bytes(trainer.optimizer)
    trainer.optimizer_step(trainer.micro_batches())
    assert isinstance(trainer.optimizer, AdamW)
    actual = sum(allocated_state_bytes(trainer.optimizer, p) for _, p in trainer.params)
    assert predicted == actual > 0


METHODS = {
    "galore": ("optimizer.name=galore", "optimizer.rank=4", "optimizer.update_proj_gap=5", "optimizer.scale=1.0"),
    "frugal": ("optimizer.name=frugal", "optimizer.update_gap=5", "optimizer.density=0.5"),
    "spam": ("optimizer.name=spam", "optimizer.delta_t=8", "optimizer.warmup_steps=2", "optimizer.grad_accu_steps=2",
             "optimizer.density=0.5"),
}


@pytest.mark.parametrize("adapter", ["lora", "qlora", "none"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_first_order_optimizer_trains_every_adapter(tmp_path, method, adapter):
    lr = "2e-3" if adapter == "none" else "2e-2"
    result = run(tmp_path, *METHODS[method], f"adapter.type={adapter}", "training.max_steps=16",
                 f"training.learning_rate={lr}")
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"] - 0.1, (method, adapter)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_per_layer_equals_grouped_for_each_method(tmp_path, method):
    args = (*METHODS[method], "training.max_steps=8", "training.per_device_train_batch_size=2")
    grouped = run(tmp_path / "g", *args)
    fused = run(tmp_path / "p", *args, "optimizer.per_layer=true")
    assert fused.losses == pytest.approx(grouped.losses, rel=1e-4)


@pytest.mark.parametrize("method", ["frugal", "spam"])
def test_per_layer_with_accumulation_equals_grouped(tmp_path, method):
    args = (*METHODS[method], "training.max_steps=6", "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=2")
    grouped = run(tmp_path / "g", *args)
    fused = run(tmp_path / "p", *args, "optimizer.per_layer=true")
    assert fused.losses == pytest.approx(grouped.losses, rel=1e-4)


def test_galore_per_layer_accumulates_in_low_rank_and_trains(tmp_path):
    # The projector of a refresh step comes from the first micro-batch's gradient (full gradients are never
    # stored), so this is close to, not equal to, grouped accumulation; it must still train.
    args = (*METHODS["galore"], "training.max_steps=12", "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=2", "training.learning_rate=2e-2")
    fused = run(tmp_path, *args, "optimizer.per_layer=true")
    assert fused.eval_after["eval_loss"] < fused.eval_before["eval_loss"] - 0.1


@pytest.mark.parametrize("method", ["galore", "spam", "frugal", "galore-per-layer"])
def test_resume_across_refresh_or_reset_equals_uninterrupted(tmp_path, monkeypatch, method):
    # galore/frugal refresh every 5 steps, spam resets at step 8: checkpoint at 4, die at 6, resume to 10. Per-layer:
    # the updates inside backward must follow the restored LR schedule (restoring replaces the param-group dicts)
    name, _, per_layer = method.partition("-")
    args = (*METHODS[name], "training.max_steps=10", "output.save_steps=4", "adapter.dropout=0.1",
            f"optimizer.per_layer={'true' if per_layer else 'false'}")
    run(tmp_path / "full", *args)
    run_killed_at(monkeypatch, 7, lambda: run(tmp_path / "cut", *args))
    run(tmp_path / "cut", *args, "training.resume_from_checkpoint=true")
    assert losses(tmp_path / "cut" / "run") == losses(tmp_path / "full" / "run")


@pytest.fixture
def count_backward(monkeypatch):
    calls = {"n": 0}
    real_backward = torch.Tensor.backward

    def counting_backward(self, *a, **k):
        calls["n"] += 1
        return real_backward(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    return calls


def test_mezo_full_parameter_learns_without_backward(tmp_path, count_backward):
    result = run(tmp_path, "optimizer.name=mezo", "adapter.type=none", "training.max_steps=200",
                 "training.learning_rate=1e-3", "training.lr_scheduler_type=constant", "output.logging_steps=50")
    assert count_backward["n"] == 0
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"] - 0.3  # measured: 5.88 -> 5.27


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_mezo_on_adapters_moves_only_the_adapter(tmp_path, count_backward, adapter):
    recipe = recipe_from_dict(tiny(tmp_path, *NO_CLIP, "optimizer.name=mezo", "training.max_steps=5",
                                   "training.learning_rate=1e-2", f"adapter.type={adapter}"))
    trainer = Trainer(recipe, prepare(recipe), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    micro = trainer.micro_batches()
    for _ in range(5):
        loss, grad_norm, _ = trainer.optimizer_step(micro)
        assert torch.isfinite(torch.tensor(loss)) and grad_norm is None
    assert count_backward["n"] == 0
    for name, p in trainer.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == ("lora_" in name), name  # trainable LoRA weights move; the frozen base is untouched
        assert p.grad is None


def test_optimizer_state_bytes_are_reported_and_exact(tmp_path):
    for method, args in METHODS.items():
        recipe = recipe_from_dict(tiny(tmp_path / method, *NO_CLIP, *args, "training.max_steps=1"))
        trainer = Trainer(recipe, prepare(recipe), progress=False)
        predicted = optimizer_state_bytes(trainer.optimizer)
        trainer.optimizer_step(trainer.micro_batches())
        actual = sum(allocated_state_bytes(trainer.optimizer, p) for _, p in trainer.params)
        assert predicted == actual, method


@pytest.mark.parametrize("method", ["galore", "frugal"])
def test_per_layer_update_runs_when_the_last_micro_batch_has_no_supervised_tokens(tmp_path, method):
    # A micro-batch whose labels are all -100 runs no backward; the step's update must still happen (in per-layer
    # mode it belongs to the last micro-batch that does), identical to grouped mode.
    args = (*METHODS[method], "training.max_steps=1", "training.warmup_steps=0",
            "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=2")
    results = []
    for per_layer in (False, True):
        recipe = recipe_from_dict(tiny(tmp_path / str(per_layer), *NO_CLIP, *args,
                                       "adapter.type=none", f"optimizer.per_layer={str(per_layer).lower()}"))
        trainer = Trainer(recipe, prepare(recipe), progress=False)
        micro = trainer.micro_batches()
        first = next(micro)
        empty = dict(next(micro))
        empty["labels"] = torch.full_like(empty["labels"], -100)
        before = {n: p.detach().clone() for n, p in trainer.params}
        trainer.optimizer_step(iter([first, empty]))
        moved = {n for n, p in trainer.params if not torch.equal(before[n], p.detach())}
        assert moved == set(before), (per_layer, sorted(set(before) - moved)[:3])
        results.append({n: p.detach().clone() for n, p in trainer.params})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-7)
