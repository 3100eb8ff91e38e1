"""The offloaded optimizer's per-block bookkeeping: device params, fp32 masters, the CPU gradient buffer.

One flat buffer per block and tier (docs/offload-design.md rule 2): the block's gradients accumulate into one
contiguous fp32 buffer (one ``zero_()`` after the update, one norm per view for clipping), taken from a pool when its
first gradient of the step arrives and given back after its update (:class:`GradPool`), and on the CPU tier its
masters are one contiguous fp32 buffer whose views the optimizer updates. On the NVMe tier the masters are tensors
with the right shape and dtype "parked" on a one-element storage (stride 0, 4 bytes) between updates, and point into a
staging buffer during one (``master.data = view``): the optimizer keys its state and param groups by these objects, so
they must outlive every swap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimtune.optimizers import PerTensorOptimizer


@dataclass
class OffloadBlock:
    """One update unit of the offloaded optimizer: its parameters, masters and where they sit in the flat order."""
    names: list[str]
    params: list[nn.Parameter]  # the model's (device) parameters
    shapes: list[torch.Size]
    offsets: list[int]  # element offset of each parameter in the block's flat order
    masters: list[torch.Tensor]  # what the optimizer sees (views of master_flat, or parked on NVMe)
    master_views: list[torch.Tensor]  # cpu tier: views of master_flat; nvme: empty
    master_flat: torch.Tensor | None
    numel: int
    parked: list[torch.Tensor] = field(default_factory=list)
    grad_flat: torch.Tensor | None = None  # from the GradPool while the block has gradients this step
    grads: list[torch.Tensor] = field(default_factory=list)  # views of grad_flat
    master_bytes: int = 0
    param_dtype: torch.dtype | None = None  # the params' dtype when they all share one
    got: list[bool] = field(default_factory=list)  # a gradient arrived this step
    final: set[int] = field(default_factory=set)  # indices whose final-micro-batch gradient arrived
    submitted: bool = False


def _empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, pin_memory=pin)


class GradPool:
    """Zeroed flat gradient buffers, reused by size and dtype (decoder layers are all the same size).

    A block holds one from its first gradient of a step until its update has run. With gradient accumulation, or
    with every update deferred to ``step()`` (clipping), that is every block at once; with ``overlap`` and one
    micro-batch it is only the blocks whose gradients are complete but not yet applied, so gradient RAM follows
    how far the updates trail backward instead of the model size. A buffer that receives exactly one gradient per
    value (one micro-batch) can hold it in the parameters' own dtype (bf16: half of fp32, and exact, since the
    update widens it to the master's dtype); sums of micro-batches take the master dtype. Buffers stay in the pool
    (pinned buffers are slow to allocate on CUDA), so the pool's size is the peak.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self.nbytes = 0  # held: in use + free

    def take(self, blk: OffloadBlock, dtype: torch.dtype) -> None:  # caller holds the engine's lock
        free = self._free.get((blk.numel, dtype))
        if free:
            flat = free.pop()
        else:
            flat = _empty(blk.numel, dtype, self.pin)
            self.nbytes += flat.nbytes
        blk.grad_flat = flat
        blk.grads = [flat[o: o + math.prod(s)].view(s) for o, s in zip(blk.offsets, blk.shapes)]

    def give(self, blk: OffloadBlock) -> None:  # caller holds the engine's lock; the buffer is zero again
        self._free.setdefault((blk.numel, blk.grad_flat.dtype), []).append(blk.grad_flat)
        blk.grad_flat, blk.grads = None, []


def build_blocks(named_params: list[tuple[str, nn.Parameter]], blocks: list[list[str]], dtype: torch.dtype,
                 keep_masters: bool, pin: bool) -> list[OffloadBlock]:
    """Check ``blocks`` against ``named_params`` (each trainable param in exactly one block) and build the buffers.

    ``keep_masters`` (the cpu tier) fills the masters from the device params here; the NVMe tier writes them
    straight to disk block by block instead.
    """
    named_params = list(named_params)
    params: dict[str, nn.Parameter] = {}
    seen: dict[int, str] = {}
    for name, p in named_params:
        if name in params:
            raise ValueError(f"parameter name {name!r} is given twice")
        if id(p) in seen:
            raise ValueError(f"parameters {seen[id(p)]!r} and {name!r} are the same tensor (tied); pass it once, as "
                             "model.named_parameters() does")
        if not p.requires_grad:
            raise ValueError(f"parameter {name!r} is frozen (requires_grad=False); pass trainable parameters only")
        if p.device.type == "meta":
            raise ValueError(f"parameter {name!r} is on the meta device; materialize the model first")
        params[name], seen[id(p)] = p, name
    listed = [n for block in blocks for n in block]
    unknown = sorted(set(listed) - set(params))
    missing = [n for n in params if n not in set(listed)]
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if unknown or missing or twice or any(not block for block in blocks):
        raise ValueError("blocks must list every trainable parameter exactly once, in non-empty blocks: "
                         f"unknown {unknown[:5]}, missing {missing[:5]}, listed twice {twice[:5]}, "
                         f"empty blocks {[i for i, block in enumerate(blocks) if not block]}")
    park = torch.zeros(1, dtype=dtype)
    out = []
    for block in blocks:
        ps = [params[n] for n in block]
        shapes = [p.shape for p in ps]
        sizes = [math.prod(s) for s in shapes]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        numel = sum(sizes)
        parked = [park.expand(s) for s in shapes]
        if keep_masters:
            master_flat = _empty(numel, dtype, pin)
            views = [master_flat[o: o + n].view(s) for o, n, s in zip(offsets, sizes, shapes)]
            with torch.no_grad():
                for view, p in zip(views, ps):
                    view.copy_(p.detach())
            masters = [v.detach().requires_grad_(True) for v in views]
        else:
            master_flat, views = None, []
            masters = []
            for s in parked:
                m = torch.empty(0, dtype=dtype).requires_grad_(True)
                m.data = s
                masters.append(m)
        dtypes = {p.dtype for p in ps}
        out.append(OffloadBlock(list(block), ps, shapes, offsets, masters, views, master_flat, numel, parked,
                                master_bytes=numel * park.element_size(), got=[False] * len(ps),
                                param_dtype=dtypes.pop() if len(dtypes) == 1 else None))
    return out


def staging_groups(blocks: list[list[tuple[str, int]]]) -> list[tuple[int, list[str]]]:
    """Split each block's trainable tensors ``(name, numel)``, in order, into runs of at most as many values as the
    model's largest tensor: ``[(block index, names)]``, the units :class:`OffloadedUpdates` updates and stages.

    The NVMe tier stages a unit's masters + state in each of its ``threads + 2`` buffers, so RAM follows the largest
    unit. A whole decoder layer (the streaming unit) would need three layers' masters + state (AdamW: 3 x 12 bytes x
    the layer's values); a tensor cannot be split (GaLore projects, SPAM and FRUGAL draw masks over whole tensors),
    so the largest tensor is the floor, and the runs go up to it so small tensors (norms, biases) share one I/O.
    """
    cap = max((n for block in blocks for _, n in block), default=0)
    out: list[tuple[int, list[str]]] = []
    for b, block in enumerate(blocks):
        run, size = [], 0
        for name, n in block:
            if run and size + n > cap:
                out.append((b, run))
                run, size = [], 0
            run.append(name)
            size += n
        if run:
            out.append((b, run))
    return out


def checked_optimizer(optimizer, blocks: list[OffloadBlock]) -> PerTensorOptimizer:
    """The optimizer must be first-order per-tensor and own exactly the masters it was given."""
    if not isinstance(optimizer, PerTensorOptimizer):
        name = type(optimizer).__name__
        hint = ("MeZO is zeroth-order (no gradients to offload); use zeroth-order streaming instead"
                if name == "MeZO" else "build AdamW with per_layer=True (slimtune's per-tensor AdamW, same numerics)"
                if name == "AdamW" else "use one of the project's first-order optimizers: adamw, galore, frugal, spam")
        raise ValueError(f"OffloadedUpdates needs a first-order PerTensorOptimizer (update_param), got {name}: {hint}")
    owned = {id(m) for g in optimizer.param_groups for m in g["params"]}
    given = {id(m) for blk in blocks for m in blk.masters}
    if owned != given:
        raise ValueError(f"build_optimizer must put every master it is given in a param group and nothing else: "
                         f"{len(given - owned)} missing, {len(owned - given)} foreign")
    return optimizer
