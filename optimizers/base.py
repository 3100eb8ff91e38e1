"""The protocol every slimtune first-order optimizer follows, so one update function serves three callers.

``step()`` is a loop over :meth:`PerTensorOptimizer.update_param`. The same method is called

(a) by ``step()`` (grouped mode),
(b) from a ``register_post_accumulate_grad_hook`` in per-layer mode (the trainer frees each gradient right after
    its update, so full gradients never coexist; see ``slimtune.finetune.per_layer``), and
(c) by the offload engine, on whichever device holds the parameter's state.

Rules for subclasses:

* ``update_param(p, group)`` reads ``p.grad``, updates ``p`` in place and ``self.state[p]``; it must not depend on
  the order in which parameters are visited, nor on other parameters' state.
* Optimizer-wide counters (SPAM's reset schedule, ...) live in ``self.state`` under a tensor-valued entry of the
  first parameter or in a group key, and advance only in :meth:`finish_step`, which ``step()`` calls after the loop
  and per-layer mode calls once per optimizer step after backward.
* State holds tensors and plain numbers only (``torch.load(weights_only=True)`` must read ``state_dict()``).
* ``state_bytes(p, group)`` returns the bytes of optimizer state ``p`` will hold once stepped (the planner uses it;
  tests compare it with what is actually allocated).
* ``scratch_bytes(p, group)`` (optional, default 0) bounds the temporary bytes one update of ``p`` allocates beyond
  its state, when that is more than a few gradient-sized tensors (GaLore's and FRUGAL's SVD refresh); the planner
  adds the largest to the update's buffers; ``refreshes(step, group)`` (optional) says whether update number ``step``
  of a parameter in ``group`` allocates it (the offloaded engine then runs that step's updates one at a time).
* ``accumulate_param(p, group)`` (optional) is called in per-layer mode on micro-batches that do *not* end an
  optimizer step; the default keeps the full gradient in ``p.grad`` (accumulated by autograd). GaLore overrides it to
  accumulate in the low-rank space and free the full gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_adam_hparams(lr: float, betas: tuple[float, float], eps: float) -> None:
    """The constructor checks every Adam-family optimizer shares (a ValueError that says what is allowed)."""
    if lr < 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def check_state_bits(state_bits: int) -> int:
    """``state_bits`` if it is 32 or 8 (blockwise 8-bit Adam moments, ``blockwise8``), else a ValueError."""
    if state_bits not in (8, 32):
        raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
    return state_bits


class PerTensorOptimizer(torch.optim.Optimizer):
    """Base class: ``step()`` = ``update_param`` for each parameter with a gradient, then ``finish_step``."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update_param(p, group)
        self.finish_step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state tensors keep their saved dtypes.

        ``torch.optim.Optimizer.load_state_dict`` casts every non-``step`` state tensor to its parameter's dtype,
        which turns int64 indices and seeds into floats (seeds lose bits), bool masks and uint8 8-bit codes into
        floats, and fp32 scales of bf16 weights into bf16: each would silently break an exact resume.
        """
        saved = state_dict["state"]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in saved.get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def update_param(self, p: torch.Tensor, group: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish_step(self) -> None:
        """Advance optimizer-wide counters once per optimizer step (no-op by default)."""

    def accumulate_param(self, p: torch.Tensor, group: dict) -> None:
        """Per-layer mode, mid-accumulation: keep ``p.grad`` as autograd accumulates it (default)."""

    def state_bytes(self, p: torch.Tensor, group: dict) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def param_index(self, p: torch.Tensor) -> int:
        """``p``'s position among all parameters, group after group: the stream id its seeded draws use (stable across
        a resume, and the same for the offloaded engine's masters, built in the model's order)."""
        return next(i for i, q in enumerate(q for group in self.param_groups for q in group["params"]) if q is p)

    def group_of(self, p: torch.Tensor) -> dict:
        """The param group holding ``p``."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")


def allocated_state_bytes(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Bytes actually held in ``optimizer.state[p]`` (tensors only): what ``state_bytes`` must predict."""
    return sum(v.numel() * v.element_size() for v in optimizer.state.get(p, {}).values()
               if isinstance(v, torch.Tensor))
