"""GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (Zhao et al., arXiv 2403.03507).

Reproduces the official ``galore_torch.GaLoreAdamW`` (jiaweizzhao/GaLore, ``adamw.py`` + ``galore_projector.py``)
step for step; a user's galore-torch code runs by changing the import. For a parameter W (m x n) with gradient G in a
param group carrying ``rank, update_proj_gap, scale, proj_type``, at optimizer call t = 1, 2, ... (k = t - 1)::

    if k % update_proj_gap == 0:  P <- top-r singular vectors of G (side rule in projection.py)  (1)
    R  = proj(G, P)                          (m x r for the right side, r x n for the left side)    (2)
    M  = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R*R       (moments NOT reset at a refresh)       (3)
    N  = M / (sqrt(V) + eps)                                ("eps-hat" placement)                   (4)
    W -= lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * back(N, P)                                      (5)
    W -= lr * weight_decay * W                              (decay AFTER the update, on the new W)  (6)

Groups without ``rank`` get (3)-(6) on the full gradient (no projection, no scale): the official AdamW.

State per parameter (tensors only, so ``torch.load(weights_only=True)`` restores it and resume is exact):
``step`` (int64), ``exp_avg``/``exp_avg_sq`` (low-rank shape), ``ortho`` (the projection matrix; plus ``ortho_right``
for ``proj_type='full'``). Bytes for an m x n weight, m >= n, rank r, dtype size b:
    32-bit: 8 + 2*m*r*b (moments) + r*n*b (projector)           -- the paper's "mr + 2nr" up to orientation
    8-bit:  8 + 2*m*r + 2*4*ceil(m*r/256) (absmax) + r*n*b      -- when m*r >= min_8bit_size, else fp32 moments
Plain-group params hold 8 + 2*m*n*b (8-bit: 8 + 2*m*n + 8*ceil(m*n/256)).

Deviations from the official code (each deliberate):
* ``state_bits=8`` replaces the separate ``GaLoreAdamW8bit``: the moments are stored as bitsandbytes-style blockwise
  8-bit codes (block 256, signed dynamic map for M, unsigned for V, fp32 absmax per block; bnb's functional API where
  it runs, a torch implementation otherwise) but the update math is (3)-(6) above, in fp32. The official class runs
  bnb's fused kernel (its own eps placement, decay before the update for plain groups) and calls
  ``torch.cuda.synchronize()`` unconditionally (fails on CPU); its defaults (eps 1e-8, wd 1e-2) are not copied here.
* ``reverse_std`` with m < n and rank >= m raises a shape error in the official ``project_back``; fixed (projection.py).
* Tensor GaLore (``dim > 2``) is not implemented: such groups are rejected with ``ValueError``.
* Missing ``update_proj_gap``/``scale``/``proj_type`` default to 200 / 1.0 / 'std' (official: KeyError).
* ``svd_method='randomized'`` (opt-in; default 'full', the official SVD) computes (1) by a randomized SVD
  (projection.randomized_left_vectors): O(mn(r + 10)) instead of O(mn min(m, n)), seeded from state, not the global RNG.
* ``accumulate_param`` (per-layer mode with gradient accumulation) accumulates in the low-rank space. On a step
  where the projector refreshes, the new projector comes from the *first micro-batch's* gradient (the only one
  alive then) instead of the accumulated gradient; on every other step the result equals grouped accumulation
  (projection is linear). The official per-layer script instead steps on every micro-batch (jiaweizzhao/GaLore#78).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .adamw import adam_direction_eps_hat, adam_moments_
from .base import PerTensorOptimizer, check_adam_hparams, check_state_bits
from .blockwise8 import is_quantized, load_moments, moments_bytes, store_moments, zero_moments
from .projection import (
    GALORE_PROJ_TYPES,
    SVD_METHODS,
    galore_side,
    generator,
    mix_seed,
    project,
    project_back,
    randomized_scratch_bytes,
    svd_projector,
    svd_scratch_bytes,
)


# ------------------------------------------------------------------------------------------------------ optimizer
class GaLoreAdamW(PerTensorOptimizer):
    """GaLore AdamW; see the module docstring for equations (1)-(6), state and deviations.

    Args:
        params: parameters or param groups; groups with ``rank`` (int) are projected and may carry
            ``update_proj_gap`` (int, default 200), ``scale`` (float, default 1.0), ``proj_type``
            ('std' | 'reverse_std' | 'right' | 'left' | 'full', default 'std'), ``svd_method`` ('full', the
            official SVD, default | 'randomized', see ``projection.randomized_left_vectors``) and ``seed``
            (int, default 0: the randomized SVD's draws).
        lr, betas, eps, weight_decay, correct_bias: as ``galore_torch.GaLoreAdamW`` (eps 1e-6, wd 0).
        state_bits: 32 (moments in the gradient's dtype) or 8 (blockwise 8-bit moments).
        min_8bit_size: with ``state_bits=8``, moments with fewer elements stay fp32 (bitsandbytes' default 4096).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, state_bits: int = 32,
                 min_8bit_size: int = 4096):
        check_adam_hparams(lr, betas, eps)
        check_state_bits(state_bits)
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
        self.state_bits = state_bits
        self.min_8bit_size = min_8bit_size
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            param_group.setdefault("update_proj_gap", 200)
            param_group.setdefault("scale", 1.0)
            param_group.setdefault("proj_type", "std")
            param_group.setdefault("svd_method", "full")
            param_group.setdefault("seed", 0)
            if param_group.get("proj_quant", False):
                raise ValueError("proj_quant (Q-GaLore's 4-bit projector) is not supported; drop the key")
            if param_group.get("dim", 2) > 2:
                raise ValueError("tensor GaLore (dim > 2) is not supported; use dim=2 (matrices)")
            if not (isinstance(param_group["rank"], int) and param_group["rank"] > 0):
                raise ValueError(f"rank must be a positive int, got {param_group['rank']!r}")
            if not (isinstance(param_group["update_proj_gap"], int) and param_group["update_proj_gap"] > 0):
                raise ValueError(f"update_proj_gap must be a positive int, got {param_group['update_proj_gap']!r}")
            if param_group["svd_method"] not in SVD_METHODS:
                raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {param_group['svd_method']!r}")
            if param_group["proj_type"] not in GALORE_PROJ_TYPES:
                raise ValueError(f"proj_type must be one of {GALORE_PROJ_TYPES}, got {param_group['proj_type']!r}")
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            if any(p.dim() != 2 for p in params):
                raise ValueError("GaLore groups (with 'rank') take 2-D weights only; put biases/norms in a plain group")
        super().add_param_group(param_group)

    # -- projection ---------------------------------------------------------------------------------------------
    def _refresh(self, p: torch.Tensor, state: dict, g: torch.Tensor, group: dict) -> None:
        """Eq. (1): new projector from the SVD of ``g`` (fp32 SVD, cast back to g's dtype). ``svd_method``
        'randomized' (an option): the randomized SVD, its test matrix drawn from a generator seeded by the
        parameter's position and the step, so a resumed run redraws the same one."""
        side = galore_side(g.shape, group["proj_type"])
        gen = None
        if group.get("svd_method", "full") == "randomized":  # (a checkpoint from before the option has none)
            gen = generator(mix_seed(group.get("seed", 0), self.param_index(p)), int(state["step"]))
        ortho, ortho_right = svd_projector(g, group["rank"], side, gen)
        state["ortho"] = ortho
        if ortho_right is not None:
            state["ortho_right"] = ortho_right

    def _project(self, state: dict, g: torch.Tensor, group: dict) -> torch.Tensor:
        return project(g, state["ortho"], galore_side(g.shape, group["proj_type"]), state.get("ortho_right"))

    def _needs_refresh(self, state: dict, group: dict) -> bool:
        # official: `ortho_matrix is None or iter % update_proj_gap == 0` with iter = step BEFORE the increment
        return "ortho" not in state or self.refreshes(int(state["step"]), group)

    def accumulate_param(self, p: torch.Tensor, group: dict) -> None:
        """Per-layer mode, a micro-batch that does not end the step: add proj(p.grad) to a low-rank accumulator and
        free the full gradient. The first micro-batch of a refresh step refreshes the projector from its own grad."""
        if "rank" not in group or p.grad is None:
            return
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64)
        if "grad_acc" not in state:
            if self._needs_refresh(state, group):
                self._refresh(p, state, p.grad, group)
            state["grad_acc"] = self._project(state, p.grad, group)
        else:
            state["grad_acc"].add_(self._project(state, p.grad, group))
        p.grad = None

    # -- moments ------------------------------------------------------------------------------------------------
    def _quantized(self, numel: int) -> bool:
        return self.state_bits == 8 and numel >= self.min_8bit_size

    def _load_moments(self, state: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" not in state:
            if self._quantized(like.numel()):
                zeros = torch.zeros_like(like, dtype=torch.float32)
                return zeros, zeros.clone()
            dtype = torch.float32 if self.state_bits == 8 else like.dtype  # official: zeros_like(grad)
            return torch.zeros_like(like, dtype=dtype), torch.zeros_like(like, dtype=dtype)
        if is_quantized(state):
            exp_avg, exp_avg_sq = load_moments(state)
            return exp_avg.view(like.shape), exp_avg_sq.view(like.shape)
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        if self._quantized(exp_avg.numel()):
            if not is_quantized(state):
                state.update(zero_moments(exp_avg.shape, exp_avg.device))
            store_moments(state, exp_avg, exp_avg_sq)
        else:
            state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq

    # -- the update ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_param(self, p: torch.Tensor, group: dict) -> None:
        """Eqs. (1)-(6) for one parameter, reading ``p.grad`` (plus a low-rank accumulator, if any)."""
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64)
        if "rank" in group:
            if "grad_acc" in state:  # per-layer accumulation: the projector was fixed on the first micro-batch
                grad = self._project(state, grad, group).add_(state.pop("grad_acc"))
            else:
                if self._needs_refresh(state, group):
                    self._refresh(p, state, grad, group)
                grad = self._project(state, grad, group)
        exp_avg, exp_avg_sq = self._load_moments(state, grad)
        state["step"] += 1
        step = int(state["step"])
        beta1, beta2 = group["betas"]
        adam_moments_(exp_avg, exp_avg_sq, grad.to(exp_avg.dtype), beta1, beta2)
        norm_grad, step_size = adam_direction_eps_hat(exp_avg, exp_avg_sq, step, group["lr"], beta1, beta2,
                                                      group["eps"], group["correct_bias"])
        self._store_moments(state, exp_avg, exp_avg_sq)
        if "rank" in group:
            norm_grad = project_back(norm_grad.to(p.dtype), state["ortho"], group["proj_type"], group["scale"],
                                     state.get("ortho_right"))
        p.add_(norm_grad.to(p.dtype), alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    # -- memory and checkpoints -----------------------------------------------------------------------------------
    def refreshes(self, step: int, group: dict) -> bool:
        """Whether update number ``step`` (0-based) of a parameter in ``group`` recomputes its projector (eq. (1))."""
        return "rank" in group and step % group["update_proj_gap"] == 0

    def scratch_bytes(self, p: torch.Tensor, group: dict) -> int:
        """Peak temporary bytes of one update of ``p`` beyond its state: the SVD of a refresh step (eq. (1)) for a
        projected weight (the planner counts it: it is allocated while backward still runs), else 0."""
        if "rank" not in group:
            return 0
        if group.get("svd_method", "full") == "randomized":  # (a checkpoint from before the option has none)
            return randomized_scratch_bytes(tuple(p.shape), group["rank"], p.dtype)
        return svd_scratch_bytes(tuple(p.shape), p.dtype)

    def state_bytes(self, p: torch.Tensor, group: dict) -> int:
        """Exact bytes ``self.state[p]`` holds after a step (the transient ``grad_acc`` excluded)."""
        size = p.element_size()
        total = 8  # int64 step
        shape = tuple(p.shape)
        if "rank" in group:
            m, n = shape
            r = min(group["rank"], m, n)
            side = galore_side(p.shape, group["proj_type"])
            shape = {"right": (m, r), "left": (r, n), "full": (r, r)}[side]
            total += {"right": r * n, "left": m * r, "full": m * r + r * n}[side] * size
        numel = math.prod(shape)
        if self._quantized(numel):
            return total + moments_bytes(numel)
        return total + 2 * numel * (4 if self.state_bits == 8 else size)

