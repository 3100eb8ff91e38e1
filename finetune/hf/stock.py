"""For a stock ``transformers.Trainer``: slimtune's optimizers (per-layer too) and logs."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from slimtune.offload import memory_snapshot
from slimtune.optimizers import SEEDED, ZEROTH_ORDER, build_optimizer

from ..adapters import router_load
from ..engine import InMemoryEngine
from ..errors import RecipeError
from .engine_optimizer import EngineOptimizer, is_zeroth_order


def memory_logs(device: torch.device, model: torch.nn.Module, engine=None, steps: int = 1) -> dict[str, Any]:
    """Resident and peak memory per tier (``memory_snapshot``), what ``engine`` holds per tier and moves per step
    (over the last ``steps`` steps), and MixLoRA's router load (share of routed tokens per expert, layers averaged)."""
    logs: dict[str, Any] = dict(memory_snapshot(device))
    if engine is not None:
        logs.update(engine.tier_bytes())
        logs.update(engine.metrics(steps))
    load = router_load(model)
    if load:
        logs["router_load"] = load["router_load"]
    return logs


class SlimtuneCallback(transformers.TrainerCallback):
    """For a stock ``transformers.Trainer``: adds :func:`memory_logs` to every training log (``state.log_history``
    and the reporters after it in the callback list), and refuses a zeroth-order optimizer at ``on_train_begin``
    (the stock step always runs backward: use :class:`SlimtuneTrainer`, which logs these itself)."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: D102
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is not None and is_zeroth_order(inner):
            raise RecipeError([f"{type(inner).__name__} is a zeroth-order optimizer: a stock Trainer's step runs "
                               "backward; train with slimtune.finetune.hf.SlimtuneTrainer"])

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):  # noqa: D102
        if logs is None or "loss" not in logs or model is None:
            return
        extra = memory_logs(args.device, model, steps=args.logging_steps)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer appended a copy of logs before calling us


def slimtune_optimizer(model: torch.nn.Module, name: str, args: transformers.TrainingArguments,
                       per_layer: bool = False, **hparams) -> torch.optim.Optimizer:
    """One of slimtune's optimizers over ``model``'s trainable parameters, for a stock Trainer:
    ``Trainer(..., optimizers=(slimtune_optimizer(model, "galore", args, rank=8), None))`` (the Trainer builds the
    scheduler from ``args``). lr and weight decay come from ``args``; ``hparams`` are the optimizer's own.

    ``per_layer=True``: each parameter is updated inside backward by a gradient hook and its gradient freed at once
    (full gradients never coexist), on the micro-batch that ends the accumulation (accelerate's
    ``GradientState.sync_gradients``, which the Trainer sets before each micro-batch), so gradient accumulation
    works, unlike transformers' layer-wise GaLore. The returned object is what the Trainer steps (its ``step``
    only closes the step); ``args.max_grad_norm`` must be 0 (a global norm needs every gradient at once)."""
    if name in ZEROTH_ORDER:
        raise RecipeError([f"optimizer {name!r} is zeroth-order: a stock Trainer's step runs backward; use "
                           "slimtune.finetune.hf.SlimtuneTrainer(optimizer=...)"])
    if per_layer and args.max_grad_norm > 0:
        raise RecipeError([f"per_layer: global-norm clipping needs every gradient at once; set "
                           f"TrainingArguments(max_grad_norm=0) (now {args.max_grad_norm:g})"])
    if name in SEEDED:
        hparams.setdefault("seed", args.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if per_layer:
        hparams["per_layer"] = True  # the per-tensor twin of an optimizer (torch's AdamW has no per-tensor update)
    optimizer = build_optimizer(name, named, lr=args.learning_rate, weight_decay=args.weight_decay, **hparams)
    if not per_layer:
        return optimizer
    engine = InMemoryEngine(model, args.device)
    engine.set_optimizer(optimizer, per_layer=True, is_final=accumulation_boundary)
    return EngineOptimizer(engine, 0.0)


def accumulation_boundary() -> bool:
    """Whether the micro-batch in backward ends an optimizer step (accelerate's gradient state, set by the
    Trainer before each micro-batch)."""
    from accelerate.state import GradientState

    return GradientState().sync_gradients
