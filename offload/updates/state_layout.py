"""One block's fp32 master weights and optimizer state, packed into one flat byte buffer (the NVMe tier's unit).

The offloaded optimizer (:mod:`.offloaded_updates`) keeps a block's masters and every tensor-valued optimizer-state
entry in one contiguous, aligned region: one big read before the block's update and one big write after it
(ZeRO-Infinity swaps whole sub-groups; docs/offload-design.md rules 2, 13 and 22: per-tensor
swapping pays per-request overhead and hits minimum-size edge cases). The layout::

    [ masters (fp32, the block's flat order) | pad to 64 B | state tensors, largest element size first ]

Sorting the state entries by element size (int64 / fp32 / bf16 / uint8 and bool) makes every entry naturally
aligned with no padding between entries, so the region's size is exactly ``align64(master bytes) + sum of the
optimizer's state_bytes(p, group)`` (:func:`planned_block_bytes`): the planner and the NVMe reservation use the same
number. Non-tensor state values (plain numbers, allowed by ``optimizers/base.py``) stay in the small in-RAM
:class:`BlockLayout`, as do the keys' order and each tensor's dtype, shape and strides.

Pure functions over a ``uint8`` buffer; nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGN = 64  # start of the state part: cache-line aligned, and a multiple of every element size


def align_up(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class Entry:
    """One tensor-valued state entry: ``state[param][key]`` lives at ``buffer[offset : offset + nbytes]``."""

    param: int
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


@dataclass(frozen=True)
class BlockLayout:
    """Where each state tensor of a block lives in its buffer, plus what does not go to disk (keys, scalars)."""

    master_bytes: int
    entries: tuple[Entry, ...]
    keys: tuple[tuple[str, ...], ...]  # per parameter, the state dict's key order (tensors and scalars)
    scalars: tuple[dict, ...]  # per parameter, its non-tensor state values
    nbytes: int  # bytes of the buffer in use (masters + state)

    def signature(self) -> tuple:
        return tuple((e.param, e.key, e.dtype, e.shape, e.stride) for e in self.entries) + (self.keys,)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dense_stride(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides if it is a permutation of a contiguous tensor (e.g. a transpose), else contiguous strides.

    Keeping a transposed state tensor transposed keeps the BLAS transpose flags of the optimizer's matmuls, so the
    offloaded update rounds exactly like the in-memory one.
    """
    dims = sorted((i for i in range(t.dim()) if t.shape[i] != 1), key=lambda i: -t.stride(i))
    expected = 1
    for i in reversed(dims):
        if t.stride(i) != expected:
            return tuple(torch.empty(t.shape).stride()) if t.dim() else ()
        expected *= t.shape[i]
    return tuple(t.stride())


def planned_block_bytes(master_bytes: int, state_bytes: list[int]) -> int:
    """Buffer bytes of a block once every parameter has the state its optimizer's ``state_bytes`` predicts."""
    return align_up(master_bytes, ALIGN) + sum(state_bytes)


def signature_of(states: list[dict]) -> tuple:
    """What :meth:`BlockLayout.signature` would be for ``states`` (a re-layout is needed when they differ)."""
    entries = []
    for i, state in enumerate(states):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                entries.append((i, key, value.dtype, tuple(value.shape), _dense_stride(value)))
    entries.sort(key=lambda e: -_itemsize(e[2]))  # stable: same order as plan_layout
    return tuple(entries) + (tuple(tuple(s) for s in states),)


def plan_layout(master_bytes: int, states: list[dict]) -> BlockLayout:
    """Lay out ``states`` (one optimizer-state dict per parameter of the block) after ``master_bytes`` of masters."""
    tensors = [(i, key, value) for i, state in enumerate(states) for key, value in state.items()
               if isinstance(value, torch.Tensor)]
    tensors.sort(key=lambda item: -item[2].element_size())  # stable sort: parameter, then key order, within a size
    offset, entries = align_up(master_bytes, ALIGN), []
    for i, key, value in tensors:
        if value.is_sparse or value.layout != torch.strided:
            raise ValueError(f"optimizer state {key!r} is a {value.layout} tensor; only strided tensors can be "
                             "offloaded")
        entries.append(Entry(i, key, value.dtype, tuple(value.shape), _dense_stride(value), offset))
        offset += entries[-1].nbytes
    scalars = tuple({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)} for state in states)
    return BlockLayout(master_bytes, tuple(entries), tuple(tuple(state) for state in states), scalars,
                       max(offset, master_bytes))


def entry_view(buf: torch.Tensor, entry: Entry) -> torch.Tensor:
    """The tensor of ``entry`` as a view into the uint8 buffer ``buf`` (writes go straight to the buffer)."""
    flat = buf[entry.offset: entry.offset + entry.nbytes].view(entry.dtype)
    return flat.as_strided(entry.shape, entry.stride) if entry.shape else flat.view(())


def master_views(buf: torch.Tensor, shapes: list[torch.Size], offsets: list[int], dtype: torch.dtype
                 ) -> list[torch.Tensor]:
    """Views of the masters (element offsets into the block's flat order) at the start of ``buf``."""
    total = (offsets[-1] + math.prod(shapes[-1])) if shapes else 0
    flat = buf[: total * _itemsize(dtype)].view(dtype)
    return [flat[o: o + math.prod(s)].view(s) for s, o in zip(shapes, offsets)]


def state_views(buf: torch.Tensor, layout: BlockLayout) -> list[dict]:
    """Rebuild each parameter's state dict (original key order) from views into ``buf`` and the kept scalars."""
    by_key = {(e.param, e.key): entry_view(buf, e) for e in layout.entries}
    return [{key: by_key[(i, key)] if (i, key) in by_key else layout.scalars[i][key] for key in keys}
            for i, keys in enumerate(layout.keys)]


def pack_state(buf: torch.Tensor, layout: BlockLayout, states: list[dict]) -> None:
    """Copy each state tensor into its place in ``buf``, unless it already is that place (updated in place)."""
    for e in layout.entries:
        src, dst = states[e.param][e.key], entry_view(buf, e)
        if src.data_ptr() != dst.data_ptr() or src.stride() != dst.stride():
            dst.copy_(src)


def aliases(t: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``t``'s memory lies inside ``buf`` (a state tensor that is still a view into the staging buffer)."""
    start, end = buf.data_ptr(), buf.data_ptr() + buf.nbytes
    return t.numel() > 0 and start <= t.data_ptr() < end
