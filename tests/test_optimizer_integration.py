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
from test_train import losses, tiny  # noqa: E402

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
