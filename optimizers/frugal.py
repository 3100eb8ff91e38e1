"""FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training
(Zmushko et al., arXiv 2411.07837, ICML 2025).

Reproduces the author code (``frugal/proj_optimizer_templates.py``, ``adamw.py``, ``galore_projector.py``,
``coordinate_projector.py`` at commit c7ebe4c2) in one class: ``proj_type`` picks GaloreAdamW ('svd', 'random'),
CoordAdamW ('columns', 'rows', 'randk') or BlockAdamW ('blockwise'). Groups with ``is_proj_params=True`` (the author
key) are split into a state-full subspace (AdamW) and a state-free residual (signSGD); other groups get AdamW.
For a projected W with gradient G at optimizer call t (k = this tensor's step before the increment)::

    if k % update_gap == 0:  refresh P (SVD / random / coordinates / active tensors);                  (1)
                             if reset_statistics: M = V = 0, k = 0 (bias correction restarts)
    W *= 1 - lr * weight_decay                        (decoupled decay BEFORE the update, every group)   (2)
    k += 1 ; R = down(G, P) ; M = b1 M + (1-b1) R ; V = b2 V + (1-b2) R*R                                 (3)
    U = up( -(lr_a / (1-b1^k)) * M / (sqrt(V)/sqrt(1-b2^k) + eps) )  lr_a = lr*proj_params_lr_scale     (4)
    W += U - lr_a * inactive_lr_scale * sign(G - up(down(G)))    ('sgd': no sign; 'none'/'no': no term)  (5)

Blockwise: at each refresh all tensors of the group are deactivated (state dropped, k = 0) and
round(len(params)*density) tensors are activated in ``block_order``; active tensors take full AdamW (4) with lr_a,
inactive ones the state-free rule (5) on the whole gradient. Regular groups: (2)-(4) with lr and up = down = id.
The side rule is 'std': m >= n -> right, r = round(density*n); else left, r = round(density*m).

State per parameter (tensors only; weights_only checkpoints; exact resume). b = parameter dtype size:
    regular:        step(8) + 2*m*n*b
    svd:            step(8) + 2*m*r*b + r*n*b (projector)           for m >= n (transpose otherwise)
    random:         svd + seed(8) + refresh(8)
    columns / rows: step(8) + 2*m*k*b (k*n for rows) + k*8 (int64 indices) + 16, k = int(density*n) (rows: m)
    randk:          step(8) + 2*k*b + 8*k + 16, k = int(density*m*n)
    blockwise:      step(8) + seed(8) + refresh(8) + active(1) [+ 2*m*n*b when active]
``seed`` is a per-tensor (coordinates, random) or per-group (blockwise) stream id; the generator of refresh i is
``projection.generator(seed, i)``, so resuming reproduces the same draws.

Deviations from the author code (each deliberate):
* Refresh is decided per tensor from its own step, not from the first tensor of the group: the per-tensor protocol
  (gradient hooks, offload) forbids reading another tensor's state. Identical whenever every tensor of the group gets
  a gradient at every step (the author scripts); differs only when tensors skip steps.
* Randomness uses seeded CPU generators stored in state (author: global RNG, projector objects in state that break
  ``weights_only`` loading). 'random' builds each matrix like ``torch.nn.init.orthogonal_``: N(0,1) draws of the
  tall orientation, QR, columns sign-fixed by diag(R); transposed to r x n (right) or kept m x r (left).
* Blockwise 'random' draws ``randperm(len(params))`` from the group stream, identical for all tensors of the group.
* Per-group overrides: every FRUGAL key may be set per group (author: ctor values forced on the proj group).
* 'none' is accepted for the author's 'no'; ``correct_bias`` is always on (author default); proj_side is 'std' only;
  'randperm' projections are not offered. No ``_dispatch_sqrt`` (a torch private removed in recent torch).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .adamw import adam_moments_, adam_update_torch
from .base import PerTensorOptimizer, check_adam_hparams, check_state_bits
from .blockwise8 import SLICE, is_quantized, moments_bytes, quantizes, sliced_moments, zero_moments
from .projection import (
    BLOCK_ORDERS,
    SVD_METHODS,
    active_blocks,
    coord_count,
    coord_down,
    coord_indices,
    coord_up,
    frugal_side_rank,
    generator,
    mix_seed,
    project,
    project_up,
    random_orthogonal,
    randomized_scratch_bytes,
    svd_projector,
    svd_scratch_bytes,
)

PROJ_TYPES = ("svd", "random", "columns", "rows", "randk", "blockwise")
INACTIVE_RULES = ("sign_sgd", "sgd", "none", "no")
_COORDS = ("columns", "rows", "randk")


class FRUGAL(PerTensorOptimizer):
    """FRUGAL with an AdamW state-full part; see the module docstring for equations (1)-(5), state and deviations.

    Projected groups carry ``is_proj_params=True`` and may override any of: density, update_gap, proj_type,
    reset_statistics, inactive_update_rule, inactive_lr_scale, proj_params_lr_scale, block_order, svd_method
    ('full', the author code's SVD, default | 'randomized': ``projection.randomized_left_vectors`` for 'svd').

    ``state_bits=8``: the AdamW moments of every matrix parameter (its state-full subspace, or the whole matrix in a
    regular group or an active block) as bitsandbytes' blockwise 8-bit codes (``blockwise8``); eqs. (3)-(4) run in
    fp32 a slice of whole quantization blocks at a time (element-wise: slicing changes nothing).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, proj_type: str = "svd", density: float = 0.25,
                 update_gap: int = 200, reset_statistics: bool = True, inactive_update_rule: str = "sign_sgd",
                 inactive_lr_scale: float = 1.0, proj_params_lr_scale: float = 1.0, block_order: str = "random",
                 seed: int = 0, svd_method: str = "full", state_bits: int = 32):
        check_adam_hparams(lr, betas, eps)
        self.state_bits = check_state_bits(state_bits)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "proj_type": proj_type,
                        "density": density, "update_gap": update_gap, "reset_statistics": reset_statistics,
                        "inactive_update_rule": inactive_update_rule, "inactive_lr_scale": inactive_lr_scale,
                        "proj_params_lr_scale": proj_params_lr_scale, "block_order": block_order, "seed": seed,
                        "svd_method": svd_method}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("is_proj_params", False)
        if not group["is_proj_params"]:
            return
        checks = [
            (group["proj_type"] in PROJ_TYPES, f"proj_type must be one of {PROJ_TYPES}"),
            (0.0 <= group["density"] <= 1.0, "density must lie in [0, 1]"),
            (isinstance(group["update_gap"], int) and group["update_gap"] > 0, "update_gap must be a positive int"),
            (group["inactive_update_rule"] in INACTIVE_RULES, f"inactive_update_rule must be one of {INACTIVE_RULES}"),
            (group["inactive_lr_scale"] >= 0, "inactive_lr_scale must be >= 0"),
            (group["proj_params_lr_scale"] >= 0, "proj_params_lr_scale must be >= 0"),
            (group["block_order"] in BLOCK_ORDERS, f"block_order must be one of {BLOCK_ORDERS}"),
            (group["svd_method"] in SVD_METHODS, f"svd_method must be one of {SVD_METHODS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got group values {({k: v for k, v in group.items() if k != 'params'})}")
        if group["proj_type"] == "blockwise":
            active = round(len(group["params"]) * group["density"])
            if group["block_order"] == "mirror" and active % 2:
                raise ValueError(f"block_order='mirror' needs an even number of active tensors, got {active} "
                                 f"(round({len(group['params'])} * {group['density']}))")
        elif any(p.dim() != 2 for p in group["params"]):
            raise ValueError(f"proj_type={group['proj_type']!r} projects 2-D weights only; put biases and norms in a "
                             "regular group or use proj_type='blockwise'")

    # -- refresh (eq. 1) ----------------------------------------------------------------------------------------
    def _stream_seed(self, p: torch.Tensor, group: dict) -> int:
        """Per-tensor stream id (global parameter index), or per-group for blockwise (group index)."""
        if group["proj_type"] == "blockwise":
            return mix_seed(group["seed"], next(i for i, g in enumerate(self.param_groups) if g is group))
        return mix_seed(group["seed"], self.param_index(p))

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        kind = group["proj_type"]
        first = "step" not in state
        if first:
            state["step"] = torch.zeros((), dtype=torch.int64)
            if kind != "svd":
                state["seed"] = torch.tensor(self._stream_seed(p, group), dtype=torch.int64)
                state["refresh"] = torch.zeros((), dtype=torch.int64)
        gen = generator(int(state["seed"]), int(state["refresh"])) if kind != "svd" else None
        if kind == "blockwise":
            self._refresh_block(p, state, group, gen)
        else:
            if kind in ("svd", "random"):
                side, rank = frugal_side_rank(grad.shape, group["density"])
                if kind == "svd":  # svd_method 'randomized' (an option): drawn per tensor and step, from state
                    randomized = group.get("svd_method", "full") == "randomized"
                    draw = generator(self._stream_seed(p, group), int(state["step"])) if randomized else None
                    state["ortho"] = svd_projector(grad, rank, side, draw)[0]
                else:
                    m, n = grad.shape
                    state["ortho"] = random_orthogonal((rank, n) if side == "right" else (m, rank), gen,
                                                       grad.dtype, grad.device)
            else:
                state["indices"] = coord_indices(grad.shape, group["density"], kind, gen, grad.device)
            if first or group["reset_statistics"]:
                self._zero_moments(p, state, self._down(grad, state, group))
                state["step"].zero_()
        if "refresh" in state:
            state["refresh"] += 1

    def _refresh_block(self, p: torch.Tensor, state: dict, group: dict, gen: torch.Generator) -> None:
        """Deactivate (drop moments, step 0), then activate if p is among the tensors chosen for this refresh."""
        params = group["params"]
        chosen = active_blocks(group["block_order"], len(params), round(len(params) * group["density"]),
                               int(state["refresh"]), gen)
        index = next(i for i, q in enumerate(params) if q is p)
        for key in [k for k in state if k.startswith("exp_avg")]:  # the moments (and 8-bit scales)
            del state[key]
        state["step"].zero_()
        state["active"] = torch.tensor(index in chosen)
        if index in chosen:
            self._zero_moments(p, state, p)

    # -- projections ----------------------------------------------------------------------------------------------
    def _down(self, g: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        kind = group["proj_type"]
        if kind in _COORDS:
            return coord_down(g, state["indices"], kind)
        return project(g, state["ortho"], frugal_side_rank(g.shape, group["density"])[0])

    def _up(self, low: torch.Tensor, state: dict, group: dict, shape: torch.Size) -> torch.Tensor:
        kind = group["proj_type"]
        if kind in _COORDS:
            return coord_up(low, state["indices"], kind, shape)
        return project_up(low, state["ortho"], frugal_side_rank(shape, group["density"])[0])

    # -- the update ---------------------------------------------------------------------------------------------
    def _zero_moments(self, p: torch.Tensor, state: dict, like: torch.Tensor) -> None:
        """Fresh zero moments shaped like ``like`` (8-bit codes and scales when ``p``'s are quantized)."""
        if quantizes(self.state_bits, p):
            state.update(zero_moments(like.shape, like.device))
        else:
            state["exp_avg"] = torch.zeros_like(like)
            state["exp_avg_sq"] = torch.zeros_like(like)

    @staticmethod
    def _adam(grad: torch.Tensor, state: dict, group: dict, lr: float) -> torch.Tensor:
        """Eqs. (3)-(4): torch-AdamW eps placement, returns the additive update (8-bit moments: fp32, computed a
        slice at a time between dequantizing and requantizing the slice's moments)."""
        beta1, beta2 = group["betas"]
        step = int(state["step"])
        if not is_quantized(state):
            adam_moments_(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2)
            return adam_update_torch(state["exp_avg"], state["exp_avg_sq"], step, lr, beta1, beta2, group["eps"])
        flat = grad.reshape(-1)
        update = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
        for start, stop, exp_avg, exp_avg_sq in sliced_moments(state, flat.numel()):
            adam_moments_(exp_avg, exp_avg_sq, flat[start:stop], beta1, beta2)
            update.view(-1)[start:stop] = adam_update_torch(exp_avg, exp_avg_sq, step, lr, beta1, beta2, group["eps"])
        return update

    @staticmethod
    def _state_free(residual: torch.Tensor, group: dict) -> torch.Tensor | None:
        """Eq. (5): the update of the state-free part, or None for 'none'."""
        rule = group["inactive_update_rule"]
        if rule in ("none", "no"):
            return None
        lr = group["lr"] * group["proj_params_lr_scale"] * group["inactive_lr_scale"]
        return -lr * (residual.sign() if rule == "sign_sgd" else residual)

    @torch.no_grad()
    def update_param(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("FRUGAL does not support sparse gradients")
        state = self.state[p]
        projected = group["is_proj_params"]
        if projected and ("step" not in state or self.refreshes(int(state["step"]), group)):
            self._refresh(p, grad, state, group)
        elif not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            self._zero_moments(p, state, p)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["step"] += 1
        if not projected:
            p.add_(self._adam(grad, state, group, group["lr"]))
            return
        active_lr = group["lr"] * group["proj_params_lr_scale"]
        if group["proj_type"] == "blockwise":
            update = (self._adam(grad, state, group, active_lr) if bool(state["active"])
                      else self._state_free(grad, group))
            if update is not None:
                p.add_(update)
            return
        low = self._down(grad, state, group)
        update = self._up(self._adam(low, state, group, active_lr), state, group, grad.shape)
        free = self._state_free(grad - self._up(low, state, group, grad.shape), group)
        if free is not None:
            update.add_(free)
        p.add_(update)

    # -- memory ---------------------------------------------------------------------------------------------------
    def refreshes(self, step: int, group: dict) -> bool:
        """Whether update number ``step`` (0-based) of a parameter in ``group`` refreshes its subspace (eq. (1))."""
        return bool(group["is_proj_params"]) and step % group["update_gap"] == 0

    def scratch_bytes(self, p: torch.Tensor, group: dict) -> int:
        """Peak temporary bytes of one update of ``p`` beyond its state: the SVD of an 'svd' refresh (eq. (1)),
        else 0 (the planner counts it: it is allocated while backward still runs)."""
        # a dequantized slice's fp32 math
        moments = 5 * 4 * min(p.numel(), SLICE) if quantizes(self.state_bits, p) else 0
        if not (group["is_proj_params"] and group["proj_type"] == "svd" and p.dim() == 2):
            return moments
        if group.get("svd_method", "full") == "randomized":
            svd = randomized_scratch_bytes(tuple(p.shape), frugal_side_rank(p.shape, group["density"])[1], p.dtype)
        else:
            svd = svd_scratch_bytes(tuple(p.shape), p.dtype)
        return max(svd, moments)  # the refresh's SVD comes before the moments' update

    def state_bytes(self, p: torch.Tensor, group: dict) -> int:
        """Exact bytes of ``self.state[p]`` after the next step (blockwise: as activated at the next refresh if p
        has no state yet, else as currently activated)."""
        size = p.element_size()

        def moments(count: int) -> int:
            return moments_bytes(count) if quantizes(self.state_bits, p) else 2 * count * size

        if not group["is_proj_params"]:
            return 8 + moments(p.numel())
        kind = group["proj_type"]
        if kind == "blockwise":
            state = self.state.get(p, {})
            if "active" in state:
                active = bool(state["active"])
            else:
                params = group["params"]
                chosen = active_blocks(group["block_order"], len(params), round(len(params) * group["density"]), 0,
                                       generator(self._stream_seed(p, group), 0))
                active = next(i for i, q in enumerate(params) if q is p) in chosen
            return 25 + (moments(p.numel()) if active else 0)
        m, n = p.shape
        if kind in ("svd", "random"):
            side, r = frugal_side_rank(p.shape, group["density"])
            low = m * r if side == "right" else r * n
            return 8 + moments(low) + r * (n if side == "right" else m) * size + (16 if kind == "random" else 0)
        k = coord_count(p.shape, group["density"], kind)
        low = {"columns": m * k, "rows": k * n, "randk": k}[kind]
        return 8 + moments(low) + 8 * k + 16

