"""Per-layer mode: the optimizer update fused into backward, so full gradients never coexist.

Each trainable parameter gets a ``register_post_accumulate_grad_hook``. On the micro-batch that ends an optimizer
step the hook runs the optimizer's per-tensor update for that parameter and frees its gradient at once; on the
micro-batches before it, the hook calls ``accumulate_param`` (by default autograd keeps accumulating ``p.grad``;
GaLore accumulates in its low-rank space and frees the full gradient). This is how gradient accumulation stays
correct in per-layer mode: one optimizer step per accumulated batch, not one per micro-batch as in the official
GaLore script (jiaweizzhao/GaLore#78) — which is why HF and LLaMA-Factory refuse the combination.

Global-norm gradient clipping cannot work here (the norm needs every gradient at once); recipes must set
``training.max_grad_norm: 0`` (SPAM's spike clipping is per tensor and still applies).
"""

from __future__ import annotations

import torch

from slimtune.optimizers import PerTensorOptimizer


class PerLayerUpdates:
    """Hooks that step ``optimizer`` parameter by parameter during backward. ``final`` marks the last micro-batch.

    After the last micro-batch's backward the trainer calls ``optimizer.step()``: no gradient is left, so it only
    runs ``finish_step()`` (optimizer-wide counters), and LR schedulers see an ordinary step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, is_final=None):
        """``is_final``: a callable asked at each hook instead of the ``final`` flag (a loop that does not tell:
        transformers' Trainer, whose accelerate GradientState knows)."""
        if not isinstance(optimizer, PerTensorOptimizer):
            raise TypeError(f"per-layer mode needs a PerTensorOptimizer, got {type(optimizer).__name__}")
        self.optimizer, self.final, self.is_final = optimizer, True, is_final
        # the group's index, not the dict: load_state_dict (a resume, accelerate's prepare) replaces the dicts, and
        # the LR scheduler sets lr on the new ones
        self._group = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for group in optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        group = self.optimizer.param_groups[self._group[id(p)]]
        if self.final if self.is_final is None else self.is_final():
            self.optimizer.update_param(p, group)
            p.grad = None  # freed now: the next layer's gradient never meets this one
        else:
            self.optimizer.accumulate_param(p, group)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
