"""For a stock ``transformers.Trainer``: slimtune's optimizers (per-layer too) and logs."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from slimtune.offload import memory_snapshot
from slimtune.optimizers import SEEDED, ZEROTH_ORDER, build_optimizer, optimizer_state_bytes

from ..adapters import router_load
from ..engine import InMemoryEngine
from ..errors import RecipeError
from .engine_optimizer import EngineOptimizer, is_zeroth_order
from .process_group import destroy_process_group_at_exit


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


def memory_check(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 free_bytes: int | None = None) -> dict[str, int]:
    """The step-0 check of a stock Trainer run: what training adds to the loaded model (the trainable parameters'
    gradients, all at once or, per-layer, the largest one; the optimizer's state, ``optimizer_state_bytes``)
    against the device's free memory now (``free_bytes``: a budget instead; CPU: psutil's available, CUDA:
    ``mem_get_info``). Activations come on top, so this is a floor: a run it refuses would fail at its first step.
    Raises PlanError with the numbers and the ways out; returns the figures otherwise."""
    import psutil

    from slimtune.offload import PlanError, format_bytes

    engine = getattr(optimizer, "engine", None)
    inner = getattr(optimizer, "inner", optimizer)
    trainable = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    per_layer = getattr(engine, "per_layer", None) is not None
    grads = max(trainable, default=0) if per_layer else sum(trainable)
    state = optimizer_state_bytes(inner)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if grads + state > free_bytes:
        raise PlanError(
            f"training needs at least {format_bytes(grads + state)} beyond the loaded model on {device} "
            f"(gradients {format_bytes(grads)}{', per-layer: the largest tensor' if per_layer else ''}, optimizer "
            f"state {format_bytes(state)}) and {format_bytes(free_bytes)} is free. Smaller state: "
            "slimtune_optimizer(..., 'galore' or state_bits=8); no full gradients: per_layer=True; past the "
            "device: a recipe with offload (slimtune train, or slimtune.finetune.hf.from_recipe)")
    return {"plan_gradient_bytes": grads, "plan_optimizer_state_bytes": state, "plan_free_bytes": free_bytes}


class SlimtuneCallback(transformers.TrainerCallback):
    """For a stock ``transformers.Trainer``: at ``on_train_begin`` the memory check (:func:`memory_check`: refuses,
    with the numbers, a run whose gradients and optimizer state cannot fit beside the model; ``free_bytes``: a
    budget instead of what is free) and the refusal of a zeroth-order optimizer (the stock step always runs
    backward: use :class:`SlimtuneTrainer`); then :func:`memory_logs` and the check's figures in every training log
    (``state.log_history`` and the reporters after it in the callback list)."""

    def __init__(self, free_bytes: int | None = None):  # noqa: D107
        self.free_bytes = free_bytes
        self.plan: dict[str, int] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: D102
        if args.world_size > 1:
            destroy_process_group_at_exit()
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is not None and is_zeroth_order(getattr(inner, "inner", inner)):
            raise RecipeError([f"{type(inner).__name__} is a zeroth-order optimizer: a stock Trainer's step runs "
                               "backward; train with slimtune.finetune.hf.SlimtuneTrainer"])
        if model is not None and inner is not None:
            self.plan = memory_check(model, inner, args.device, self.free_bytes)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):  # noqa: D102
        if logs is None or "loss" not in logs or model is None:
            return
        extra = {**memory_logs(args.device, model, steps=args.logging_steps), **self.plan}
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
