"""AdamW math shared by the optimizers, as pure per-tensor functions (no optimizer object, no hidden state).

Two epsilon placements exist in the official codes (GaLore, SPAM: sqrt(v) + eps; torch, FRUGAL: sqrt(v_hat) + eps), so
both are here:

* ``adam_direction_eps_hat`` — GaLore and SPAM (and HF's old ``transformers.AdamW``): bias correction folded into the
  step size, eps added to the raw ``sqrt(v)`` ("eps-hat" form, Kingma & Ba 2015, end of §2)::

      step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)          (1)
      u         = m / (sqrt(v) + eps)                            (2)   update: p -= step_size * u

* ``adam_update_torch`` — torch.optim.AdamW and FRUGAL::

      u = -(lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)      (3)

Both first update the moments in place (``adam_moments_``)::

      m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g*g             (4)
"""

from __future__ import annotations

import math

import torch


def adam_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float,
                  beta2: float) -> None:
    """Eq. (4), in place."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_direction_eps_hat(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, lr: float, beta1: float,
                           beta2: float, eps: float, correct_bias: bool = True) -> tuple[torch.Tensor, float]:
    """Eqs. (1)-(2): returns (u, step_size); the caller applies ``p -= step_size * u`` (possibly after projecting u)."""
    step_size = lr
    if correct_bias:
        step_size = lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
    return exp_avg / (exp_avg_sq.sqrt() + eps), step_size


def adam_update_torch(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, lr: float, beta1: float,
                      beta2: float, eps: float) -> torch.Tensor:
    """Eq. (3): the full additive update (already scaled by -lr), torch.optim.AdamW's eps placement."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    # the same operations in the same order as ``exp_avg / (sqrt(v) / bc2 + eps) * c``, in one temporary (bitwise
    # equal; the offload engine updates tensors of hundreds of MiB, where each extra temporary is RAM)
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    return torch.div(exp_avg, denom, out=denom).mul_(-lr / bias_correction1)


def _fusable(p: torch.Tensor, state: dict) -> bool:
    """fp32/fp64 params on CPU or CUDA, dense, everything alike: torch's fused AdamW kernel computes eqs. (3)-(4)
    in one pass over the tensors instead of about ten (5x faster on 12.8 M values on this CPU; the offload engine
    runs it on every master of the model each step). It matches torch.optim.AdamW's for-loop to float rounding
    (torch tests them against each other). bf16/fp16 params keep the op-by-op path: the kernel would compute them in
    fp32 and round once, which is different numerics, not just rounding order."""
    grad, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
    return (p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda") and not p.is_sparse
            and grad.dtype == p.dtype and grad.device == p.device and not grad.is_sparse
            and m.dtype == v.dtype == p.dtype and state["step"].device == p.device and state["step"].dtype == p.dtype)


# Imported late: base.py has no dependency on this module's functions, and this class is the only consumer here.
from .base import PerTensorOptimizer, check_state_bits  # noqa: E402
from .blockwise8 import SLICE, block_range, dynamic_code, moments_bytes, quantizes, slices, zero_moments  # noqa: E402


class AdamW(PerTensorOptimizer):
    """torch.optim.AdamW's numerics (eq. (3), decoupled decay ``p *= 1 - lr*wd`` before the update) as a
    :class:`PerTensorOptimizer`, so the update can be fused into backward (per-layer mode) or run by the offload
    engine. State per parameter: ``step`` (0-d fp32 tensor), ``exp_avg`` and ``exp_avg_sq`` (param dtype):
    8 bytes per fp32 element + 4.

    ``state_bits=8`` (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861): the
    moments of every matrix (dim >= 2) are kept as bitsandbytes' blockwise 8-bit codes (dynamic map, signed for m,
    unsigned for v, one fp32 absmax per 256 values: ``exp_avg_absmax``, ``exp_avg_sq_absmax``), 2 bytes per value
    + 8 per 256 instead of 8, and updated by bitsandbytes' own kernel (``optimizer_update_8bit_blockwise``, "adam":
    dequantize, eqs. (3)-(4) with the decay, requantize; on CPU the same torch math as above). Vectors (norms,
    biases) keep 32-bit moments. The kernel runs over slices of ``blockwise8.SLICE`` values, whole quantization
    blocks, so an update allocates at most a few slices of fp32 temporaries whatever the tensor's size (the update
    is element-wise: slicing changes nothing), which also makes a row chunk of a matrix whose rows are whole blocks
    update exactly like the same rows of the whole matrix (the offload engine's staging units).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, state_bits: int = 32):
        if lr < 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(f"AdamW: need lr >= 0, eps > 0, betas in [0, 1), weight_decay >= 0; got lr={lr}, "
                             f"eps={eps}, betas={betas}, weight_decay={weight_decay}")
        self.state_bits = check_state_bits(state_bits)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def update_param(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            if quantizes(self.state_bits, p):
                state.update(zero_moments(p.shape, p.device))
            else:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        state["step"] += 1
        if state["exp_avg"].dtype == torch.uint8:
            adamw_8bit_(p, p.grad, state, int(state["step"]), lr, beta1, beta2, group["eps"], group["weight_decay"])
            return
        if _fusable(p, state):  # eqs. (3)-(4) and the decay in one pass (torch.optim.AdamW(fused=True)'s kernel)
            torch._fused_adamw_([p], [p.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
                                amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                eps=group["eps"], maximize=False)
            return
        if group["weight_decay"]:
            p.mul_(1.0 - lr * group["weight_decay"])
        adam_moments_(state["exp_avg"], state["exp_avg_sq"], p.grad, beta1, beta2)
        p.add_(adam_update_torch(state["exp_avg"], state["exp_avg_sq"], int(state["step"]), lr, beta1, beta2,
                                 group["eps"]))

    def state_bytes(self, p: torch.Tensor, group: dict) -> int:
        if quantizes(self.state_bits, p):
            return 4 + moments_bytes(p.numel())
        return 2 * p.numel() * p.element_size() + 4

    def scratch_bytes(self, p: torch.Tensor, group: dict) -> int:
        """Temporaries of one update beyond the state: 8-bit moments dequantized a slice at a time (bitsandbytes'
        CPU kernel: m, v, the gradient and the param in fp32, plus the requantized codes), else none."""
        return 6 * 4 * min(p.numel(), SLICE) if quantizes(self.state_bits, p) else 0


def adamw_8bit_(p: torch.Tensor, grad: torch.Tensor, state: dict, step: int, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float) -> None:
    """Eqs. (3)-(4) with decoupled decay on ``p`` in place, its moments in blockwise 8 bits (``state``'s codes and
    absmax, updated in place), by bitsandbytes' ``optimizer_update_8bit_blockwise`` one slice
    (:data:`.blockwise8.SLICE` values, whole blocks) at a time."""
    import bitsandbytes.functional as bnbf

    work = p if p.is_contiguous() else p.contiguous()
    flat_p, flat_g = work.view(-1), grad.reshape(-1)
    m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
    m_absmax, v_absmax = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
    signed, unsigned = dynamic_code(True, p.device), dynamic_code(False, p.device)
    for start, stop in slices(flat_p.numel()):
        blocks = block_range(start, stop)
        bnbf.optimizer_update_8bit_blockwise(
            "adam", flat_g[start:stop], flat_p[start:stop], m[start:stop], v[start:stop], beta1, beta2, 0.0, 0.0,
            eps, step, lr, signed, unsigned, m_absmax[blocks], v_absmax[blocks], weight_decay=weight_decay)
    if work is not p:
        p.copy_(work)
