"""bitsandbytes-style blockwise 8-bit storage (Dettmers et al. 2022, arXiv 2110.02861): values in blocks of 256,
each block scaled by its absmax and rounded to the nearest of 256 codes of bitsandbytes' dynamic map.

GaLore's ``state_bits=8`` stores its low-rank moments with :func:`quantize_blockwise` / :func:`dequantize_blockwise`
(bitsandbytes' functional API where its kernels run, a torch transcription otherwise); AdamW's ``state_bits=8``
runs bitsandbytes' fused 8-bit Adam kernel on the same codes (:func:`dynamic_code`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

BLOCKSIZE = 256


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' 256-entry dynamic code (``create_dynamic_map``, 7 exponent bits): for each decade
    10^-6 .. 10^0 the midpoints of an evenly split [0.1, 1] (2^i parts signed, 2^(i+1) unsigned), plus 0 and 1."""
    data: list[float] = []
    for i in range(7):
        items = (2 ** i if signed else 2 ** (i + 1)) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0)
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_CODES = {True: dynamic_map(True), False: dynamic_map(False)}
_BNB_WORKS: dict[str, bool] = {}


def _bnb_functional(device: torch.device):
    """bitsandbytes.functional if its blockwise kernels run on ``device`` (probed once per device type), else None."""
    kind = device.type
    if kind not in _BNB_WORKS:
        try:
            import bitsandbytes.functional as bnbf

            probe = torch.linspace(-1, 1, 300, device=device)
            q, s = bnbf.quantize_blockwise(probe, code=_CODES[True].to(device), blocksize=BLOCKSIZE)
            _BNB_WORKS[kind] = bool(torch.allclose(bnbf.dequantize_blockwise(q, s), probe, atol=2e-2))
        except Exception:  # noqa: BLE001 - any failure (import, missing kernel) means: use the torch path
            _BNB_WORKS[kind] = False
    if not _BNB_WORKS[kind]:
        return None
    import bitsandbytes.functional as bnbf

    return bnbf


def quantize_blockwise(x: torch.Tensor, signed: bool, use_bnb: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` -> (uint8 codes of x's shape, fp32 absmax per block of 256 flat elements); nearest code value."""
    code = dynamic_code(signed, x.device)
    bnbf = _bnb_functional(x.device) if use_bnb else None
    if bnbf is not None:
        q, s = bnbf.quantize_blockwise(x.float().contiguous(), code=code, blocksize=BLOCKSIZE)
        return q, s.absmax.float()
    flat = x.float().reshape(-1)
    pad = (-flat.numel()) % BLOCKSIZE
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp_(-1, 1).reshape(-1)
    hi = torch.searchsorted(code, scaled).clamp_(1, code.numel() - 1)
    lo = hi - 1
    nearest = torch.where((scaled - code[lo]).abs() <= (code[hi] - scaled).abs(), lo, hi)
    return nearest[: flat.numel()].to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, signed: bool, use_bnb: bool = True) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` (fp32 result): code[q] * absmax[block]."""
    code = dynamic_code(signed, q.device)
    bnbf = _bnb_functional(q.device) if use_bnb else None
    if bnbf is not None:
        return bnbf.dequantize_blockwise(q.contiguous(), absmax=absmax, code=code, blocksize=BLOCKSIZE)
    vals = code[q.reshape(-1).long()]
    pad = (-vals.numel()) % BLOCKSIZE
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, BLOCKSIZE) * absmax.unsqueeze(1)
    return vals.reshape(-1)[: q.numel()].view(q.shape)


_DEVICE_CODES: dict[tuple[bool, str], torch.Tensor] = {}


def dynamic_code(signed: bool, device: torch.device) -> torch.Tensor:
    """:func:`dynamic_map` on ``device`` (one copy per device, as bitsandbytes' optimizers keep their qmaps)."""
    key = (signed, str(device))
    if key not in _DEVICE_CODES:
        _DEVICE_CODES[key] = _CODES[signed].to(device)
    return _DEVICE_CODES[key]


# --------------------------------------------------------------------------------------- 8-bit Adam moments
# An optimizer with ``state_bits=8`` keeps the moments ``exp_avg`` (signed code) and ``exp_avg_sq`` (unsigned) of a
# matrix as uint8 codes of the moment's shape plus ``<key>_absmax`` (fp32, one per block of 256 flat values).
MOMENTS = {"exp_avg": True, "exp_avg_sq": False}  # key -> signed code
SLICE = 1 << 20  # values per slice of a sliced 8-bit update: a multiple of BLOCKSIZE


def quantizes(state_bits: int, p: torch.Tensor) -> bool:
    """Whether AdamW/SPAM/FRUGAL keep ``p``'s moments in 8 bits: ``state_bits=8`` and a matrix (a row chunk of a
    matrix is a matrix, so the answer does not change when the offload engine stages it in chunks). GaLore decides
    by the size of its projected moments instead."""
    return state_bits == 8 and p.dim() >= 2


def moments_bytes(numel: int) -> int:
    """Bytes of the two 8-bit moments of ``numel`` values each: the codes plus one fp32 absmax per block each."""
    return 2 * numel + 2 * 4 * -(-numel // BLOCKSIZE)


def zero_moments(shape: tuple[int, ...] | torch.Size, device: torch.device) -> dict:
    """Zero 8-bit moments of ``shape``: any code times a zero absmax dequantizes to 0 (bitsandbytes starts so)."""
    numel = math.prod(shape)
    state = {}
    for key in MOMENTS:
        state[key] = torch.zeros(tuple(shape), dtype=torch.uint8, device=device)
        state[f"{key}_absmax"] = torch.zeros(-(-numel // BLOCKSIZE), dtype=torch.float32, device=device)
    return state


def slices(numel: int, size: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``numel`` flat values, ``size`` (default :data:`SLICE`) each but the last:
    whole quantization blocks, so each slice's absmax entries are ``[start // 256, ceil(stop / 256))``."""
    size = SLICE if size is None else size
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


def block_range(start: int, stop: int) -> slice:
    """The absmax entries of flat values ``[start, stop)`` (``start`` a multiple of BLOCKSIZE)."""
    return slice(start // BLOCKSIZE, -(-stop // BLOCKSIZE))


def load_moments(state: dict, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 moments of flat values ``[start, stop)`` (all by default), dequantized (1-D)."""
    out = []
    for key, signed in MOMENTS.items():
        codes = state[key].view(-1)
        end = codes.numel() if stop is None else stop
        out.append(dequantize_blockwise(codes[start:end], state[f"{key}_absmax"][block_range(start, end)], signed))
    return out[0], out[1]


def store_moments(state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, start: int = 0) -> None:
    """Quantize fp32 moments back into ``state``'s codes and absmax at flat values ``[start, start + numel)``."""
    for key, value in zip(MOMENTS, (exp_avg, exp_avg_sq)):
        codes, absmax = quantize_blockwise(value.reshape(-1), signed=MOMENTS[key])
        stop = start + value.numel()
        state[key].view(-1)[start:stop].copy_(codes)
        state[f"{key}_absmax"][block_range(start, stop)].copy_(absmax)


def sliced_moments(state: dict, numel: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(start, stop, exp_avg, exp_avg_sq)`` for each :func:`slices` range of ``state``'s 8-bit moments, the
    moments dequantized to fp32 for the caller's element-wise math and stored back once it resumes the loop."""
    for start, stop in slices(numel):
        exp_avg, exp_avg_sq = load_moments(state, start, stop)
        yield start, stop, exp_avg, exp_avg_sq
        store_moments(state, exp_avg, exp_avg_sq, start)


def is_quantized(state: dict) -> bool:
    """Whether ``state`` holds 8-bit moments."""
    return "exp_avg" in state and state["exp_avg"].dtype == torch.uint8
