"""The optimizer registry (slimtune.optimizers.OPTIMIZERS) and the recipe's optimizer section agree: the same
names, every recipe field is a hyperparameter the builder takes, with the same default, and the traits the trainer
acts on (seeded, zeroth-order, per-layer) match what the builder and the recipe accept. ``slimtune validate`` must
not import torch, so the recipe cannot read the registry; this test is what keeps the two one fact."""

from __future__ import annotations

import inspect
import typing

import pytest

from slimtune.finetune.recipe_optimizers import OptimizerConfig
from slimtune.optimizers import FRUGAL, OPTIMIZERS, SEEDED, SPAM, ZEROTH_ORDER, GaLoreAdamW, MeZO

CLASSES = {"frugal": FRUGAL, "spam": SPAM, "galore": GaLoreAdamW, "mezo": MeZO}


def _configs() -> dict[str, type]:
    union = typing.get_args(OptimizerConfig)[0]
    members = [typing.get_args(m)[0] for m in typing.get_args(union)]
    return {m.model_fields["name"].default: m for m in members}


def _builder_default(name: str, key: str):
    """The default the builder gives ``key`` (through ``**kwargs`` to the optimizer class when it forwards them)."""
    params = inspect.signature(OPTIMIZERS[name].build).parameters
    if key in params and params[key].kind is not inspect.Parameter.VAR_KEYWORD:
        return params[key].default
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and name in CLASSES:
        init = inspect.signature(CLASSES[name].__init__).parameters
        if key in init:
            return init[key].default
    raise AssertionError(f"optimizer.{key} ({name}) is not a hyperparameter of the {name} builder")


def test_the_registry_and_the_recipe_name_the_same_optimizers():
    assert set(_configs()) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_recipe_field_is_a_builder_hyperparameter_with_the_same_default(name):
    config = _configs()[name]()
    for key, value in config.model_dump(exclude={"name"}).items():
        default = _builder_default(name, key)
        if isinstance(value, (list, tuple)):
            value, default = list(value), list(default)
        assert value == default, f"optimizer.{key} ({name}): recipe default {value!r}, builder default {default!r}"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_traits_match_what_the_builder_and_the_recipe_accept(name):
    spec, config = OPTIMIZERS[name], _configs()[name]
    params = inspect.signature(spec.build).parameters
    assert ("seed" in params) == (name in SEEDED), "a seeded optimizer takes seed=training.seed; others do not"
    assert ("per_layer" in config.model_fields) == spec.per_layer
    assert (name in ZEROTH_ORDER) == spec.zeroth_order
    if spec.zeroth_order:
        assert not spec.per_layer  # no backward to fuse an update into
