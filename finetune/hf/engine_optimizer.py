"""The Trainer's handle on a slimtune engine's optimizer."""

from __future__ import annotations

from typing import Any

import torch


class EngineOptimizer(torch.optim.Optimizer):
    """The Trainer's handle on an engine's optimizer. ``param_groups`` and ``state`` are the optimizer's own objects
    (the Trainer's LR scheduler sets their ``lr``; ``state_dict`` is the optimizer's, so ``optimizer.pt`` resumes
    it), and ``step()`` ends the step the engine's way: clip to ``max_grad_norm``, step, zero (in memory), wait for
    the updates that ran during backward (per-layer, offloaded state), or nothing after a zeroth-order step, which
    :class:`SlimtuneTrainer` ran in its ``training_step``. ``grad_norm``: the last step's norm before clipping."""

    def __init__(self, engine, max_grad_norm: float):  # noqa: D107 - the class says it
        # torch.optim.Optimizer.__init__ is not called: it would copy the param groups this object must share
        self.engine, self.max_grad_norm = engine, max_grad_norm
        self.inner: torch.optim.Optimizer = engine.optimizer
        self.zeroth_order = is_zeroth_order(self.inner)
        self.grad_norm: float | None = None

    # the optimizer's own objects, looked up each time: its load_state_dict replaces them
    param_groups = property(lambda self: self.inner.param_groups)
    state = property(lambda self: self.inner.state)
    defaults = property(lambda self: self.inner.defaults)

    def step(self, closure=None):  # noqa: D102 - the class says it
        if self.zeroth_order:
            return None
        self.grad_norm = self.engine.step(self.max_grad_norm)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        self.engine.sync()
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self.inner.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"EngineOptimizer({self.inner!r})"



def is_zeroth_order(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` steps from forward passes alone (MeZO), so the Trainer's backward must not run."""
    from slimtune.optimizers import MeZO

    return isinstance(optimizer, MeZO)
