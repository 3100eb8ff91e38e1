"""The loop's one view of where tensors live and how a step ends: an engine object with a small, named interface.

:class:`InMemoryEngine` is the null engine (everything on the device: the optimizer steps after the last backward,
or inside it in per-layer mode); :class:`~.offloading.OffloadEngine` is the same interface over the offload engine
(streamed layers, CPU/NVMe optimizer state, zeroth-order streaming). The trainer calls only these methods, so it has
one step path and one restore path whatever the recipe places where:

* ``begin_micro_batch(final)``: before each backward (``final``: the step's last one, where updates happen);
* ``step(max_grad_norm) -> grad norm or None``: after the step's last backward;
* ``zeroth_order_step(group, closure) -> loss``: a MeZO step over the step's micro-batches;
* ``sync()``: make the model's weights current (before eval, saving, export);
* ``save(...)`` / ``restore(path, checkpoint)``: trainable weights and optimizer state in a checkpoint;
* ``metrics(steps)`` / ``tier_bytes()``: what the engine holds and moves, for ``metrics.jsonl``;
* ``save_model(directory)``: write the full model as a Hugging Face checkpoint (full fine-tuning's result);
* ``close()``: stop.

:func:`build_engine` builds the engine and its optimizer from a recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimtune.offload.store.memory import RESIDENT_MMAP_THRESHOLD_BYTES, fix_mmap_threshold
from slimtune.optimizers import SEEDED, ZEROTH_ORDER, build_optimizer

from .adapters import load_trainable_state_dict, trainable_state_dict
from .checkpoint import save_checkpoint
from .errors import RecipeError
from .per_layer import PerLayerUpdates
from .recipe import ZO_STREAM_MIXLORA, Recipe


class InMemoryEngine:
    """Nothing offloaded: the null engine (see the module docstring for the interface)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.optimizer: torch.optim.Optimizer | None = None
        self.per_layer: PerLayerUpdates | None = None
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # what global-norm clipping sees
        # tensors reused from the heap, not mapped and faulted in every step (an offload engine's parts ask for a
        # smaller threshold, which wins)
        fix_mmap_threshold(RESIDENT_MMAP_THRESHOLD_BYTES)

    def set_optimizer(self, optimizer: torch.optim.Optimizer, per_layer: bool = False, is_final=None) -> None:
        """Use ``optimizer`` (per-layer mode: its updates run inside backward, through gradient hooks; ``is_final``:
        see :class:`PerLayerUpdates`)."""
        if self.per_layer is not None:
            self.per_layer.remove()
        self.optimizer = optimizer
        self.per_layer = PerLayerUpdates(optimizer, is_final) if per_layer else None


    # ------------------------------------------------------------------ one step
    def begin_micro_batch(self, final: bool) -> None:
        """Before a backward; ``final``: the step's last one (per-layer updates run in it)."""
        if self.per_layer is not None:
            self.per_layer.final = final

    def before_backward(self) -> None:
        """Between a micro-batch's forward and its backward (nothing to do in memory)."""

    def step(self, max_grad_norm: float) -> float | None:
        """Clip (unless per-layer: every gradient is already used and freed), step, zero; the pre-clip norm."""
        norm = None
        if self.per_layer is None and max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm))
        # per-layer mode: step() finds no gradient left and only advances optimizer-wide counters (finish_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def zeroth_order_step(self, group: list[dict[str, torch.Tensor]], closure) -> float:
        """MeZO: the optimizer perturbs, calls ``closure`` (the loss over ``group``) twice and updates. Dropout is off
        in the perturbed forwards (the official ``zo_forward`` runs ``model.eval()``)."""
        self.model.eval()
        try:
            return float(self.optimizer.step(closure))
        finally:
            self.model.train()

    def sync(self) -> None:
        """Make the model's weights current (nothing is deferred in memory)."""

    # ------------------------------------------------------------------ checkpoints
    def save(self, run_dir: Path, state, scheduler, recipe: dict, limit: int | None) -> Path:
        """Write a checkpoint of the trainable weights and optimizer state (atomic); its path."""
        return save_checkpoint(run_dir, state, trainable_state_dict(self.model), self.optimizer.state_dict(),
                               scheduler, recipe, limit)

    def restore(self, path: Path, checkpoint) -> None:
        """Load the trainable weights and optimizer state of ``checkpoint`` (read from ``path``)."""
        load_trainable_state_dict(self.model, checkpoint.trainable)
        self.optimizer.load_state_dict(checkpoint.optimizer)

    # ------------------------------------------------------------------ accounting
    def tier_bytes(self) -> dict[str, int]:
        """Bytes held per tier: every parameter on the device."""
        return {"gpu_tier_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
                "cpu_tier_bytes": 0, "nvme_tier_bytes": 0}

    def metrics(self, steps: int) -> dict[str, float]:
        """Per-tier bytes and bytes moved per step for ``metrics.jsonl`` (none: nothing moves)."""
        return {}

    def save_model(self, directory: Path) -> None:
        """Write the whole model to ``directory`` (``save_pretrained``: safetensors + config)."""
        self.model.save_pretrained(directory, safe_serialization=True)

    def close(self) -> None:
        """Stop (nothing to stop in memory)."""


def build_engine(recipe: Recipe, model: torch.nn.Module, device: torch.device, plan=None,
                 streamer=None) -> InMemoryEngine:
    """The engine the recipe's plan asks for, with its optimizer built (by the offload engine over fp32 masters when
    the optimizer state is off the device). ``plan``/``streamer``: made at load time by a streamed load
    (:func:`~.build.prepare`). Raises PlanError / RecipeError before anything trains."""
    from .offloading import build_offload, offload_requested

    t, o = recipe.training, recipe.optimizer
    hparams: dict[str, Any] = o.model_dump(exclude={"name"})
    if o.name in SEEDED:
        hparams["seed"] = t.seed

    def build(named, **override):
        return build_optimizer(o.name, named, lr=t.learning_rate, weight_decay=t.weight_decay,
                               **{**hparams, **override})

    engine = (build_offload(recipe, model, device, build, plan, streamer) if offload_requested(recipe) else None) \
        or InMemoryEngine(model, device)
    streams_zo = o.name in ZEROTH_ORDER and getattr(engine, "streamer", None) is not None
    if streams_zo and recipe.adapter.type == "mixlora" and recipe.adapter.router_aux_loss_coef > 0:
        engine.close()  # the plan chose to stream (offload.params auto); the recipe check covers explicit ones
        raise RecipeError([ZO_STREAM_MIXLORA.format(params="the plan streams them to fit the budgets",
                                                    coef=recipe.adapter.router_aux_loss_coef)])
    updates = getattr(engine, "updates", None)
    if updates is not None:  # the offloaded optimizer owns it, built over its fp32 masters
        optimizer = updates.optimizer
    else:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # streamed blocks regenerate each tensor's noise on their own: settled here, before the optimizer exists
        optimizer = build(named, noise="per_tensor") if streams_zo else build(named)
    engine.set_optimizer(optimizer, per_layer=getattr(o, "per_layer", False))
    if streams_zo:
        engine.attach_zeroth_order(optimizer)
    return engine
