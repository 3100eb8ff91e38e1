"""SPAM: Spike-Aware Adam with Momentum reset (Huang et al., arXiv 2501.06842).

Reproduces the official ``galore_torch/SPAM.py`` of TianjinYellow/SPAM-Optimizer (HEAD e8185fbe, class ``AdamW``
exported as ``SPAM``) step for step. For optimizer step k = 1, 2, ... (the optimizer-wide ``total_step`` is k - 1
while step k runs) and each parameter with gradient g::

    reset:   if k % delta_t == 0:  m = v = 0        (per-param bias-correction step s is NOT reset)     (1)
    s = s + 1
    clip:    if threshold > 0 and k % delta_t >= grad_accu_steps:                                       (2)
                 g_i = sign(g_i) * sqrt(threshold * v_i)   where g_i^2 > threshold * v_i   (v: previous, raw)
    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2                                                    (3)
    u = m / (sqrt(v) + eps) ;  step_size = lr sqrt(1 - b2^s) / (1 - b1^s)   (eps-hat form, adamw.py)     (4)
    p = p - step_size * sf(c) * u ;  then  p = p - lr * wd * p   (decay after the update)                (5)
    sf(c) = 1 - 0.99 (1 + cos(pi c / (W + 1))) / 2  for c < W,  else 1                                   (6)

(6) is the official ``1 - CosineDecay(0.99, W).get_dr(c)`` in closed form (W = ``warmup_steps``); ``c`` is
``current_step``, which starts at W + 1 (sf = 1) and is set to 0 at the end of step k - 1 whenever k is a reset
step, so the reset step itself runs with sf = 0.01, then 0.076, 0.258, 0.505, 0.752, 1.0 for W = 5. Because s is
never reset, the first update after a reset is ~3.16 sign(g) before scaling: the warm-up is what tames it.
With ``delta_t = 0`` there is no reset and (2) applies from step ``grad_accu_steps`` on.

Sparse momentum: a param group with a ``density`` key keeps m, v only on a boolean mask (exact-count random
subset at construction; at each reset a Bernoulli(density) re-draw whose m, v are kept on the overlap with the old
mask). (1)-(5) then run on ``g[mask]`` and only masked coordinates move. Masks come from a ``torch.Generator``
seeded with ``(seed, parameter index, draw index)``, so resume reproduces them without generator state.

Optimizer state, bytes per parameter of n elements and b bytes per element (moments follow the gradient dtype):
dense ``2 n b + 8`` (exp_avg, exp_avg_sq, int64 step); density d ``2 k b + n + 16`` with k ~ d n kept coordinates
(exact ``int(d n)`` until the first reset), the bool mask and int64 step and mask seed. The optimizer-wide counters
``total_step`` and ``current_step`` are int64 tensors in ``param_groups[0]``; they advance only in ``finish_step``.

Deliberate differences from the official code:

* Weight decay on ``density`` groups: the official ``p.data[mask].add_(...)`` decays a copy (a no-op, L276-279);
  here masked coordinates are decayed after the update, as the dense path does.
* The official launcher passes the LR warm-up as ``warmup_steps`` (S#6); here ``warmup_steps`` is only the
  momentum-reset warm-up (recipe authors: distinct from ``training.warmup_steps``).
* ``DeltaT`` is spelled ``delta_t``; ``delta_t = 0`` means "never reset" (the official code has that branch in its
  clipping but divides by zero at the reset check). Masks work for any tensor shape, not only 2-D.
* Counters and masks are tensors in state (official: string keys in ``self.state``), masks are seeded, and
  ``load_state_dict`` (``PerTensorOptimizer``'s) keeps masks bool and seeds int64 (torch casts other state to the
  param dtype; the official code re-casts ``mask.bool()`` every step).

As in the official code, dense groups clip ``p.grad`` in place: do not reuse gradients after ``step()``. In
``density`` groups the official code overwrites ``p.grad`` with the scaled update (scratch space); here ``p.grad``
keeps the raw gradient.
"""

from __future__ import annotations

import math

import torch

from .adamw import adam_direction_eps_hat, adam_moments_
from .base import PerTensorOptimizer, check_adam_hparams, check_state_bits
from .blockwise8 import (
    SLICE,
    is_quantized,
    load_moments,
    moments_bytes,
    quantizes,
    sliced_moments,
    store_moments,
    zero_moments,
)

_MASK64 = 2**64 - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: spreads every input bit over all 64 output bits (torch's CPU generator keeps only the
    low 32 bits of a seed, so seeds built as ``a * 2**32 + b`` would ignore ``a``)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def warmup_scale(current_step: int, warmup_steps: int) -> float:
    """Eq. (6): ``1 - CosineDecay(0.99, warmup_steps).get_dr(current_step)`` of the official code, closed form.

    The official ``CosineDecay`` steps ``CosineAnnealingLR(SGD(lr=0.99), T_max=warmup_steps + 1)`` to an explicit
    epoch and returns 0 once ``current_step >= warmup_steps``.
    """
    if current_step >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * current_step / (warmup_steps + 1))) / 2.0


class SPAM(PerTensorOptimizer):
    """SPAM (arXiv 2501.06842) with the official defaults; see the module docstring for the update rule.

    Args:
        params: parameters or param groups; a group with ``density`` in (0, 1] gets sparse momentum.
        lr, betas, eps, weight_decay, correct_bias: as in the official code (eps-hat Adam, post-update decay).
        warmup_steps: length W of the cosine warm-up of the update scale after each momentum reset (official
            ``warmup_steps``; the launcher's ``--warmup_epoch``), not the LR warm-up.
        threshold: spike threshold theta; ``g^2 > theta v`` is clipped to ``sign(g) sqrt(theta v)``; 0 disables.
        delta_t: momentum-reset interval (official ``DeltaT``); 0 never resets.
        grad_accu_steps: clipping is off for the first ``grad_accu_steps`` steps of each ``delta_t`` window.
        seed: seeds the ``density`` masks (official: the global RNG).
        state_bits: 32, or 8: the moments of every matrix (dense, or its ``density`` coordinates) as bitsandbytes'
            blockwise 8-bit codes (``blockwise8``), dequantized around (1)-(4), which run in fp32; a dense update
            goes a slice of whole quantization blocks at a time (elementwise: slicing changes nothing).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, warmup_steps: int = 150,
                 threshold: float = 5000, delta_t: int = 500, grad_accu_steps: int = 20, seed: int = 0,
                 state_bits: int = 32):
        check_adam_hparams(lr, betas, eps)
        self.state_bits = check_state_bits(state_bits)
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 disables spike clipping), got {threshold}")
        for name, value in (("warmup_steps", warmup_steps), ("delta_t", delta_t),
                            ("grad_accu_steps", grad_accu_steps), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        # Optimizer-wide hyperparameters (attributes in the official code too); set before super().__init__,
        # which calls add_param_group, where masks are drawn.
        self.warmup_steps = warmup_steps
        self.threshold = float(threshold)
        self.delta_t = delta_t
        self.grad_accu_steps = grad_accu_steps
        self.seed = seed
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults)
        # Official: state["total_step"] = 0, state["current_step"] = warmup_steps + 1 (sf = 1 until a reset).
        self.param_groups[0]["total_step"] = torch.tensor(0, dtype=torch.int64)
        self.param_groups[0]["current_step"] = torch.tensor(warmup_steps + 1, dtype=torch.int64)

    # ---------------------------------------------------------------- masks (sparse momentum)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "density" not in group:
            return
        density = group["density"]
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"param group 'density' must be a number in (0, 1], got {density!r}")
        offset = sum(len(g["params"]) for g in self.param_groups[:-1])
        for i, p in enumerate(group["params"]):
            state = self.state[p]
            state["mask_seed"] = torch.tensor((self.seed * 2**32 + offset + i) % 2**63, dtype=torch.int64)
            # Official: exact count, torch.randperm(numel)[:int(density * numel)] (even for density = 1.0).
            flat = torch.zeros(p.numel(), dtype=torch.bool)
            flat[torch.randperm(p.numel(), generator=self._mask_generator(state, 0))[:int(density * p.numel())]] = True
            state["mask"] = flat.view(p.shape).to(p.device)

    @staticmethod
    def _mask_generator(state: dict, draw: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix64(_mix64(int(state["mask_seed"])) ^ draw))

    def _redraw_masks(self, draw: int) -> None:
        """Official ``update_mask_random``: Bernoulli(density) mask, m and v kept where old and new masks overlap."""
        for group in self.param_groups:
            if "density" not in group:
                continue
            for p in group["params"]:
                state = self.state[p]
                old = state["mask"]
                new = (torch.rand(p.shape, generator=self._mask_generator(state, draw)) < group["density"])
                new = new.to(old.device)
                if "exp_avg" in state:
                    overlap = new & old
                    quantized = is_quantized(state)
                    moved = []
                    for value in load_moments(state) if quantized else (state["exp_avg"], state["exp_avg_sq"]):
                        kept = value.new_zeros(int(new.sum()))
                        kept[overlap[new]] = value.reshape(-1)[overlap[old]]
                        moved.append(kept)
                    if quantized:
                        state.update(zero_moments(moved[0].shape, moved[0].device))
                        store_moments(state, *moved)
                    else:
                        state["exp_avg"], state["exp_avg_sq"] = moved
                state["mask"] = new

    # ---------------------------------------------------------------- the update

    def _clipping_on(self, k: int) -> bool:
        """Eq. (2) gate: official ``threshold != 0 and k >= grad_accu_steps and k % DeltaT >= grad_accu_steps``."""
        if self.threshold == 0 or k < self.grad_accu_steps:
            return False
        return self.delta_t == 0 or k % self.delta_t >= self.grad_accu_steps

    @torch.no_grad()
    def update_param(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError("SPAM does not support sparse gradients")
        counters = self.param_groups[0]
        k = int(counters["total_step"]) + 1  # 1-based index of the step being taken
        sf = warmup_scale(int(counters["current_step"]), self.warmup_steps)
        state = self.state[p]
        mask = state["mask"] if "density" in group else None
        if mask is not None:
            grad = grad[mask]  # a copy: p.grad is not clipped in density groups (as official)
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0, dtype=torch.int64)
            if quantizes(self.state_bits, p):
                state.update(zero_moments(grad.shape, grad.device))
            else:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
        reset = bool(self.delta_t) and k % self.delta_t == 0  # eq. (1)
        state["step"] += 1
        clip, step = self._clipping_on(k), int(state["step"])
        if is_quantized(state) and mask is None:  # dense 8-bit: slice by slice, moments dequantized per slice
            work = p if p.is_contiguous() else p.contiguous()
            flat_p, flat_g = work.view(-1), grad.view(-1) if grad.is_contiguous() else grad.reshape(-1)
            for start, stop, exp_avg, exp_avg_sq in sliced_moments(state, p.numel()):
                u, step_size = self._direction(flat_g[start:stop], exp_avg, exp_avg_sq, reset, clip, step, group)
                self._apply_dense(flat_p[start:stop], u, step_size, sf, group)
            if work is not p:
                p.copy_(work)
            return
        if is_quantized(state):
            exp_avg, exp_avg_sq = load_moments(state)
            u, step_size = self._direction(grad, exp_avg, exp_avg_sq, reset, clip, step, group)
            store_moments(state, exp_avg, exp_avg_sq)
        else:
            u, step_size = self._direction(grad, state["exp_avg"], state["exp_avg_sq"], reset, clip, step, group)
        if mask is None:  # eq. (5), official dense path
            self._apply_dense(p, u, step_size, sf, group)
        else:  # official: p.grad[mask] = u; p.grad[~mask] = 0; p.grad *= sf; p += -step_size p.grad
            kept = p[mask]
            kept.add_(u.mul_(sf), alpha=-step_size)
            if group["weight_decay"] > 0:  # the fix: the official decays a copy
                kept.add_(kept, alpha=-group["lr"] * group["weight_decay"])
            p.masked_scatter_(mask, kept)

    def _direction(self, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, reset: bool,
                   clip: bool, step: int, group: dict) -> tuple[torch.Tensor, float]:
        """Eqs. (1)-(4) on these moments (updated in place): (u, step_size)."""
        if reset:  # eq. (1)
            exp_avg.zero_()
            exp_avg_sq.zero_()
        if clip:  # eq. (2), against the previous raw v; edits the gradient in place (p.grad in dense groups)
            spike = grad * grad > self.threshold * exp_avg_sq
            grad.copy_(torch.where(spike, grad.sign() * (exp_avg_sq * self.threshold).sqrt(), grad))
        beta1, beta2 = group["betas"]
        adam_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)  # eq. (3)
        return adam_direction_eps_hat(exp_avg, exp_avg_sq, step, group["lr"], beta1, beta2, group["eps"],
                                      group["correct_bias"])  # eq. (4)

    @staticmethod
    def _apply_dense(p: torch.Tensor, u: torch.Tensor, step_size: float, sf: float, group: dict) -> None:
        """Eq. (5): the scaled update, then decay on the new weights."""
        p.add_(u, alpha=-step_size * sf)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    @torch.no_grad()
    def finish_step(self) -> None:
        """Advance the counters; at the end of step k - 1 before a reset step k: re-draw masks, restart warm-up."""
        counters = self.param_groups[0]
        total = int(counters["total_step"]) + 1
        current = int(counters["current_step"]) + 1
        if self.delta_t and (total + 1) % self.delta_t == 0:
            self._redraw_masks(draw=(total + 1) // self.delta_t)
            current = 0
        # New tensors rather than in-place: a state_dict() taken earlier keeps its values.
        counters["total_step"] = torch.tensor(total, dtype=torch.int64)
        counters["current_step"] = torch.tensor(current, dtype=torch.int64)
    # ---------------------------------------------------------------- memory

    def state_bytes(self, p: torch.Tensor, group: dict) -> int:
        """Exact bytes of ``self.state[p]`` once stepped: moments, int64 step, and for density groups mask + seed."""
        step_bytes = 8
        if "density" not in group:
            kept, extra = p.numel(), 0
        else:
            mask = self.state.get(p, {}).get("mask")
            kept = int(mask.sum()) if mask is not None else int(group["density"] * p.numel())
            extra = p.numel() + 8
        moments = moments_bytes(kept) if quantizes(self.state_bits, p) else 2 * kept * p.element_size()
        return moments + extra + step_bytes

    def scratch_bytes(self, p: torch.Tensor, group: dict) -> int:
        """Temporaries of one update beyond the state: 8-bit moments dequantized (a slice at a time when dense:
        m, v, the update and the clipping's temporaries in fp32), else none counted."""
        if not quantizes(self.state_bits, p):
            return 0
        kept = p.numel() if "density" not in group else int(group["density"] * p.numel()) + 1
        return 6 * 4 * (min(kept, SLICE) if "density" not in group else kept)
