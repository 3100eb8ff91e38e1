"""slimtune optimizers: a registry of builders, selected by ``optimizer.name`` in a recipe.

Each builder takes named parameters plus plain hyperparameters (this package imports nothing from
``slimtune.finetune``), forms the method's parameter groups the way its official scripts do, and returns a
``torch.optim.Optimizer``. The classes are usable on their own::

    from slimtune.optimizers import GaLoreAdamW, FRUGAL, SPAM, MeZO
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .adamw import AdamW
from .base import PerTensorOptimizer, allocated_state_bytes
from .blockwise8 import BLOCKSIZE
from .param_groups import decay_groups, decays, split_targets

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]


def build_adamw(named_params: NamedParams, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                state_bits: int = 32, per_layer: bool = False) -> torch.optim.Optimizer:
    """torch.optim.AdamW with decay/no-decay groups; per-layer mode and 8-bit moments need the per-tensor twin
    (same numerics in 32 bits; ``state_bits=8``: bitsandbytes' blockwise 8-bit Adam on the matrices)."""
    groups = decay_groups(named_params, weight_decay)
    if state_bits != 32:
        return AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, state_bits=state_bits)
    cls = AdamW if per_layer else torch.optim.AdamW
    return cls(groups, lr=lr, betas=tuple(betas), eps=eps)


def build_galore(named_params: NamedParams, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-6,
                 rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 state_bits: int = 32, svd_method: str = "full", seed: int = 0, target_modules=("attn", "mlp"),
                 per_layer: bool = False):
    """GaLore groups as in the official torchrun_main.py: target 2-D weights projected, the rest plain AdamW.
    ``svd_method`` 'randomized' (opt-in) refreshes the projectors by a randomized SVD drawn from ``seed``."""
    from .galore import GaLoreAdamW

    targets, rest = split_targets(named_params, target_modules)
    groups = decay_groups(rest, weight_decay)
    if targets:
        groups.append({"params": [p for _, p in targets], "rank": rank, "update_proj_gap": update_proj_gap,
                       "scale": scale, "proj_type": proj_type, "weight_decay": weight_decay,
                       "svd_method": svd_method, "seed": seed})
    return GaLoreAdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_bits=state_bits)


def build_frugal(named_params: NamedParams, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 proj_type: str = "columns", density: float = 0.25, update_gap: int = 200,
                 reset_statistics: bool = True, inactive_update_rule: str = "sign_sgd", inactive_lr_scale: float = 1.0,
                 proj_params_lr_scale: float = 1.0, block_order: str = "random", seed: int = 0,
                 svd_method: str = "full", state_bits: int = 32, target_modules=("attn", "mlp"),
                 per_layer: bool = False):
    """FRUGAL groups as in the author code's prepare_proj_params: targets marked ``is_proj_params``. ``proj_type``
    defaults to the fine-tuning scripts' ``columns`` (the class keeps the author code's ``svd``)."""
    from .frugal import FRUGAL

    targets, rest = split_targets(named_params, target_modules)
    groups = decay_groups(rest, weight_decay)
    if targets:
        groups.append({"params": [p for _, p in targets], "is_proj_params": True, "weight_decay": weight_decay})
    return FRUGAL(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, proj_type=proj_type,
                  density=density, update_gap=update_gap, reset_statistics=reset_statistics,
                  inactive_update_rule=inactive_update_rule, inactive_lr_scale=inactive_lr_scale,
                  proj_params_lr_scale=proj_params_lr_scale, block_order=block_order, seed=seed,
                  svd_method=svd_method, state_bits=state_bits)


def build_spam(named_params: NamedParams, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-6,
               threshold: float = 5000.0, delta_t: int = 500, warmup_steps: int = 150, grad_accu_steps: int = 20,
               seed: int = 0, density: float | None = None, state_bits: int = 32, target_modules=("attn", "mlp"),
               per_layer: bool = False):
    """SPAM groups as in the official launcher: target weights get sparse momentum when ``density`` is set."""
    from .spam import SPAM

    if density is None:
        groups = decay_groups(named_params, weight_decay)
    else:
        targets, rest = split_targets(named_params, target_modules)
        groups = decay_groups(rest, weight_decay)
        if targets:
            groups.append({"params": [p for _, p in targets], "density": density, "weight_decay": weight_decay})
    return SPAM(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, threshold=threshold,
                delta_t=delta_t, warmup_steps=warmup_steps, grad_accu_steps=grad_accu_steps, seed=seed,
                state_bits=state_bits)


def build_mezo(named_params: NamedParams, *, lr: float, weight_decay: float, eps: float = 1e-3, n_samples: int = 1,
               seed: int = 0, noise: str = "sequential"):
    """MeZO with the official decay rule (no decay on biases and norms)."""
    from .zeroth_order import MeZO, mezo_param_groups

    return MeZO(mezo_param_groups(named_params, weight_decay), lr=lr, eps=eps, weight_decay=weight_decay,
                n_samples=n_samples, seed=seed, noise=noise)


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: its builder and the traits the trainer and planner act on.

    ``build(named_params, *, lr, weight_decay, **hyperparameters)``: keyword defaults are the recipe's defaults
    (``tests/test_optimizer_registry.py`` checks that the recipe's ``optimizer`` section agrees). ``seeded``: its
    randomness (masks, subspaces, perturbations) takes ``seed=training.seed``. ``zeroth_order``: it takes a closure
    and runs no backward (no gradients, clipping or saved activations). ``per_layer``: it can update parameter by
    parameter inside backward (a :class:`PerTensorOptimizer` with ``per_layer=True``).

    ``elementwise(named_params, hparams) -> names``: the parameters whose update is element by element given their
    state (AdamW: moments, decay and bias correction per value, one step counter per tensor), so the update of a
    slice of rows with that slice's state is exactly that slice of the whole update. The offloaded optimizer then
    stages such a tensor as row chunks with their own masters and state (``offload.staging_chunk``), and its
    staging RAM follows the chunk size instead of the largest tensor. Not for a tensor whose update needs all of
    it: GaLore projects the gradient through an SVD of the whole matrix (its non-projected parameters -- the
    embedding and LM head, the largest tensors -- run plain AdamW and are element-wise with 32-bit moments; 8-bit
    moments are quantized in blocks that run across rows), FRUGAL picks its subspace per tensor and seeds it by
    the parameter's index, and SPAM draws its ``density`` masks seeded by the parameter's index (so splitting any
    of their parameters would change the draws of the others). Those keep whole-tensor units, whose floor is the
    largest tensor. None: no parameter is element-wise.
    """

    build: Callable[..., torch.optim.Optimizer]
    seeded: bool = False
    zeroth_order: bool = False
    per_layer: bool = True
    elementwise: Callable[[list, dict], set[str]] | None = None


def _all_params(named_params: list, hparams: dict) -> set[str]:
    return {n for n, _ in named_params}


def _adamw_chunkable(named_params: list, hparams: dict) -> set[str]:
    """All of AdamW's parameters with 32-bit moments; with 8-bit ones, those whose rows are whole 256-value
    quantization blocks (a row chunk then holds exactly the whole tensor's blocks for those rows) and vectors."""
    if hparams.get("state_bits", 32) == 32:
        return _all_params(named_params, hparams)
    return {n for n, p in named_params if p.dim() < 2 or (p.numel() // p.shape[0]) % BLOCKSIZE == 0}


def _galore_unprojected(named_params: list, hparams: dict) -> set[str]:
    """GaLore's plain-AdamW parameters (not projected), when its moments are 32-bit."""
    if hparams.get("state_bits", 32) != 32:
        return set()
    _, rest = split_targets(named_params, hparams.get("target_modules", ("attn", "mlp")))
    return {n for n, _ in rest}


# Adding an optimizer: its file, an entry here, and its section in finetune/recipe_optimizers.py.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(build_adamw, elementwise=_adamw_chunkable),
    "galore": OptimizerSpec(build_galore, seeded=True, elementwise=_galore_unprojected),  # seed: randomized SVD
    "frugal": OptimizerSpec(build_frugal, seeded=True),
    "spam": OptimizerSpec(build_spam, seeded=True),
    "mezo": OptimizerSpec(build_mezo, seeded=True, zeroth_order=True, per_layer=False),
}
ZEROTH_ORDER = frozenset(name for name, spec in OPTIMIZERS.items() if spec.zeroth_order)
SEEDED = frozenset(name for name, spec in OPTIMIZERS.items() if spec.seeded)
ELEMENTWISE = frozenset(name for name, spec in OPTIMIZERS.items() if spec.elementwise is not None)


def elementwise_params(name: str, named_params: NamedParams, hparams: dict) -> set[str]:
    """Names among ``named_params`` whose update under optimizer ``name`` (with ``hparams``, the recipe's section)
    is element-wise: the offloaded optimizer may stage them in row chunks (see :class:`OptimizerSpec`)."""
    spec = OPTIMIZERS[name]
    return set() if spec.elementwise is None else spec.elementwise(list(named_params), dict(hparams))


def build_optimizer(name: str, named_params: NamedParams, **hparams) -> torch.optim.Optimizer:
    """Build the optimizer registered under ``name``; an unknown name lists the registered ones."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name].build(list(named_params), **hparams)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Predicted optimizer-state bytes of every parameter (``state_bytes``; 8 bytes/element for torch AdamW)."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if hasattr(optimizer, "state_bytes"):  # every slimtune optimizer
                total += optimizer.state_bytes(p, group)
            else:  # torch.optim.AdamW: exp_avg + exp_avg_sq in the param dtype, step as a 0-d fp32 tensor
                total += 2 * p.numel() * p.element_size() + 4
    return total


def __getattr__(name: str):
    """Lazy access to the optimizer classes (``from slimtune.optimizers import GaLoreAdamW``)."""
    modules = {"GaLoreAdamW": "galore", "FRUGAL": "frugal", "SPAM": "spam", "MeZO": "zeroth_order"}
    if name in modules:
        import importlib

        return getattr(importlib.import_module(f".{modules[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["ELEMENTWISE", "OPTIMIZERS", "SEEDED", "ZEROTH_ORDER", "AdamW", "FRUGAL", "GaLoreAdamW", "MeZO",
           "OptimizerSpec", "PerTensorOptimizer", "SPAM", "allocated_state_bytes", "build_optimizer", "decay_groups",
           "decays", "elementwise_params", "optimizer_state_bytes", "split_targets"]
