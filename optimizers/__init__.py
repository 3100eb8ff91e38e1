"""slimtune optimizers: a registry of builders, selected by ``optimizer.name`` in a recipe.

Each builder takes named parameters and plain hyperparameters (this package imports nothing from
``slimtune.finetune``) and returns a ``torch.optim.Optimizer``. GaLore, FRUGAL, SPAM and MeZO join this dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .param_groups import decay_groups, decays


def build_adamw(named_params: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """torch.optim.AdamW (Loshchilov & Hutter, arXiv 1711.05101, Alg. 2) with decay/no-decay groups.

    State: two fp32 moments per trainable element (8 bytes per parameter in fp32).
    ``foreach`` is left to torch's default; ``fused`` is not forced, so CPU and CUDA give the same numerics.
    """
    return torch.optim.AdamW(decay_groups(named_params, weight_decay), lr=lr, betas=betas, eps=eps)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": build_adamw,
}


def build_optimizer(name: str, named_params: Iterable[tuple[str, torch.nn.Parameter]], **hparams
                    ) -> torch.optim.Optimizer:
    """Build the optimizer registered under ``name``; an unknown name lists the registered ones."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name](named_params, **hparams)


__all__ = ["OPTIMIZERS", "build_optimizer", "build_adamw", "decay_groups", "decays"]
