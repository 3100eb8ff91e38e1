"""The offloaded optimizer's bookkeeping: gradient blocks (device params, the CPU gradient buffer) and the staging
units their masters and optimizer state are updated and staged in.

Two levels (docs/offload-design.md rule 25):

* a **gradient block** (:class:`GradBlock`) is what the caller passes: whole parameters, in model order. Its
  gradients accumulate into one contiguous buffer (one ``zero_()`` after the update, one norm per whole parameter
  for clipping, so global-norm clipping sees exactly the tensors ``clip_grad_norm_`` sees), taken from a pool when
  its first gradient of the step arrives and given back after its update (:class:`GradPool`).
* a **staging unit** (:class:`OffloadBlock`) is what one update stages: masters + optimizer state of some of a
  gradient block's tensors, or of a slice of whole rows of one tensor (:func:`staging_units`: element-wise
  optimizers only). On the CPU tier its masters are one contiguous buffer whose views the optimizer updates. On the
  NVMe tier the masters are tensors with the right shape and dtype "parked" on a one-element storage (stride 0,
  4 bytes) between updates, and point into a staging buffer during one (``master.data = view``): the optimizer keys
  its state and param groups by these objects, so they must outlive every swap.

Without a chunk size every gradient block is one unit (the layout before chunking, and the one for optimizers that
need whole tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimtune.optimizers import PerTensorOptimizer

DEFAULT_STAGING_CHUNK = 64 * 2**20  # bytes of fp32 masters per staging unit (recipe offload.staging_chunk)


@dataclass
class GradBlock:
    """What the caller calls a block: whole parameters, their CPU gradient buffer and this step's arrivals."""
    names: list[str]
    params: list[nn.Parameter]  # the model's (device) parameters
    shapes: list[torch.Size]
    offsets: list[int]  # element offset of each parameter in the gradient buffer
    numel: int
    units: list[int] = field(default_factory=list)  # its staging units, in order
    grad_flat: torch.Tensor | None = None  # from the GradPool while the block has gradients this step
    grads: list[torch.Tensor] = field(default_factory=list)  # views of grad_flat, one per whole parameter
    param_dtype: torch.dtype | None = None  # the params' dtype when they all share one
    got: list[bool] = field(default_factory=list)  # a gradient arrived this step
    final: set[int] = field(default_factory=set)  # indices whose final-micro-batch gradient arrived
    submitted: bool = False
    moving: list = field(default_factory=list)  # futures of gradients still on their way into grad_flat (CUDA)

    def landed(self) -> None:
        """Wait until every gradient moved into this block's buffer has arrived."""
        for f in self.moving:
            f.result()
        self.moving.clear()


@dataclass
class OffloadBlock:
    """One staging unit: masters of some of a gradient block's tensors (or rows of one), updated and staged as one.

    Entry ``i`` is rows ``rows[i]`` (``None``: all of it) of parameter ``members[i]`` of gradient block
    ``grad_block``; ``shapes[i]`` is the entry's shape, ``offsets[i]`` its element offset in the unit's flat order.
    """
    names: list[str]
    params: list[nn.Parameter]  # the model's (device) parameters the entries are (rows of)
    shapes: list[torch.Size]
    offsets: list[int]
    masters: list[torch.Tensor]  # what the optimizer sees (views of master_flat, or parked on NVMe)
    master_views: list[torch.Tensor]  # cpu tier: views of master_flat; nvme: empty
    master_flat: torch.Tensor | None
    numel: int
    grad_block: int = 0
    members: list[int] = field(default_factory=list)
    rows: list[slice | None] = field(default_factory=list)
    parked: list[torch.Tensor] = field(default_factory=list)
    master_bytes: int = 0


def row_slice(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """``t`` itself, or the view of its rows ``rows`` (dim-0 slice)."""
    return t if rows is None else t[rows]


def _empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, pin_memory=pin)


class GradPool:
    """Zeroed flat gradient buffers, reused by size and dtype (decoder layers are all the same size).

    A block holds one from its first gradient of a step until its update has run. With gradient accumulation, or
    with every update deferred to ``step()`` (clipping), that is every block at once; with ``overlap`` and one
    micro-batch it is only the blocks whose gradients are complete but not yet applied, so gradient RAM follows
    how far the updates trail backward instead of the model size. A buffer that receives exactly one gradient per
    value (one micro-batch) can hold it in the parameters' own dtype (bf16: half of fp32, and exact, since the
    update widens it to the master's dtype); sums of micro-batches take the master dtype. Pinned buffers (CUDA)
    stay in the pool, since pinning is slow, so the pool's size is the peak of each size; plain CPU buffers are
    freed when given back (zeroed pages are cheap to get again), so a model whose embedding and layers differ in size
    does not keep a buffer of each size between steps.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self.nbytes = 0  # held: in use + free

    def take(self, blk: GradBlock, dtype: torch.dtype) -> None:  # caller holds the engine's lock
        free = self._free.get((blk.numel, dtype))
        if free:
            flat = free.pop()
        else:
            flat = _empty(blk.numel, dtype, self.pin)
            self.nbytes += flat.nbytes
        blk.grad_flat = flat
        blk.grads = [flat[o: o + math.prod(s)].view(s) for o, s in zip(blk.offsets, blk.shapes)]

    def give(self, blk: GradBlock) -> None:  # caller holds the engine's lock; the buffer is zero again
        if self.pin:
            self._free.setdefault((blk.numel, blk.grad_flat.dtype), []).append(blk.grad_flat)
        else:
            self.nbytes -= blk.grad_flat.nbytes
        blk.grad_flat, blk.grads = None, []


def _checked_params(named_params: list[tuple[str, nn.Parameter]], blocks: list[list[str]]
                    ) -> dict[str, nn.Parameter]:
    """The trainable params by name, once each, every one in exactly one non-empty block (else a ValueError)."""
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
    return params


def build_blocks(named_params: list[tuple[str, nn.Parameter]], blocks: list[list[str]], dtype: torch.dtype,
                 initial_values: Callable[[list[nn.Parameter]], list[torch.Tensor]], keep_masters: bool, pin: bool,
                 chunk_bytes: int | None = None, chunk_names: set[str] | None = None
                 ) -> tuple[list[GradBlock], list[OffloadBlock]]:
    """Check ``blocks`` against ``named_params`` (each trainable param in exactly one block) and build the gradient
    blocks and their staging units (:func:`staging_units` with ``chunk_bytes`` of ``dtype`` masters per unit; only
    the tensors in ``chunk_names`` are split in rows, all when None).

    ``keep_masters`` (the cpu tier) fills the masters here from ``initial_values(params)`` (the device params, or
    the streamed layers' homes); the NVMe tier writes them straight to disk unit by unit instead.
    """
    params = _checked_params(list(named_params), blocks)
    chunk = None if chunk_bytes is None else max(1, chunk_bytes // torch.empty((), dtype=dtype).element_size())
    grad_blocks, units = [], []
    for g, block in enumerate(blocks):
        ps = [params[n] for n in block]
        shapes = [p.shape for p in ps]
        sizes = [math.prod(s) for s in shapes]
        dtypes = {p.dtype for p in ps}
        gb = GradBlock(list(block), ps, shapes, [sum(sizes[:i]) for i in range(len(sizes))], sum(sizes),
                       param_dtype=dtypes.pop() if len(dtypes) == 1 else None, got=[False] * len(ps))
        splittable = None if chunk_names is None else [n in chunk_names for n in block]
        for entries in staging_units(shapes, chunk, splittable):
            gb.units.append(len(units))
            units.append(_unit(gb, g, entries, dtype, initial_values if keep_masters else None, pin))
        grad_blocks.append(gb)
    return grad_blocks, units


def _unit(gb: GradBlock, g: int, entries: list[tuple[int, slice | None]], dtype: torch.dtype,
          initial_values: Callable[[list[nn.Parameter]], list[torch.Tensor]] | None, pin: bool) -> OffloadBlock:
    """The staging unit of gradient block ``gb`` (index ``g``) holding ``entries`` (param index, rows); its masters
    filled from ``initial_values`` when given (the cpu tier), else parked (the NVMe tier writes them)."""
    members = [j for j, _ in entries]
    rows = [r for _, r in entries]
    shapes = [row_slice(torch.empty(gb.shapes[j], device="meta"), r).shape for j, r in entries]
    sizes = [math.prod(s) for s in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    numel = sum(sizes)
    park = torch.zeros(1, dtype=dtype)
    parked = [park.expand(s) for s in shapes]
    if initial_values is not None:
        master_flat = _empty(numel, dtype, pin)
        views = [master_flat[o: o + n].view(s) for o, n, s in zip(offsets, sizes, shapes)]
        with torch.no_grad():
            for view, value, r in zip(views, initial_values([gb.params[j] for j in members]), rows):
                view.copy_(row_slice(value, r))
        masters = [v.detach().requires_grad_(True) for v in views]
    else:
        master_flat, views, masters = None, [], []
        for s in parked:
            m = torch.empty(0, dtype=dtype).requires_grad_(True)
            m.data = s
            masters.append(m)
    return OffloadBlock([gb.names[j] for j in members], [gb.params[j] for j in members], shapes, offsets, masters,
                        views, master_flat, numel, g, members, rows, parked, numel * park.element_size())


def row_chunks(shape: torch.Size | tuple[int, ...], chunk: int | None) -> list[slice | None]:
    """A tensor of ``shape`` as staging entries of at most ``chunk`` values: ``[None]`` (whole) when it fits, has no
    rows to split (0-d or one row), or ``chunk`` is None; else consecutive dim-0 slices of whole rows, the same
    number of rows each but the last. A single row larger than ``chunk`` makes one-row chunks (the floor)."""
    numel = math.prod(shape)
    if chunk is None or numel <= chunk or len(shape) == 0 or shape[0] < 2:
        return [None]
    per = max(1, chunk // (numel // shape[0]))
    return [slice(start, min(start + per, shape[0])) for start in range(0, shape[0], per)]


def staging_units(shapes: list[torch.Size | tuple[int, ...]], chunk: int | None,
                  splittable: list[bool] | None = None) -> list[list[tuple[int, slice | None]]]:
    """One gradient block's tensors (``shapes``, in order) as staging units of ``(tensor index, rows)`` entries.

    ``chunk`` None: the block is one unit of whole tensors. Else runs of whole tensors of at most ``chunk`` values
    (small tensors share one I/O), and each tensor larger than that split into row chunks (:func:`row_chunks`),
    one unit each: a row slice of an element-wise update (AdamW) is exactly the update of the slice, with its own
    state (the per-tensor step counter advances the same in every chunk). Only the tensors ``splittable`` marks
    (all when None): the registry's ``elementwise`` parameters; a projected or masked tensor (GaLore's targets,
    FRUGAL, SPAM's density) needs all of it at once and is a unit of its own when larger than ``chunk``.
    """
    if chunk is None:
        return [[(j, None) for j in range(len(shapes))]]
    out: list[list[tuple[int, slice | None]]] = []
    run: list[tuple[int, slice | None]] = []
    size = 0
    for j, shape in enumerate(shapes):
        n = math.prod(shape)
        pieces = row_chunks(shape, chunk) if splittable is None or splittable[j] else [None]
        if run and (pieces != [None] or size + n > chunk):
            out.append(run)
            run, size = [], 0
        if pieces != [None]:
            out += [[(j, rows)] for rows in pieces]
            continue
        run.append((j, None))
        size += n
    if run:
        out.append(run)
    return out


def staging_groups(blocks: list[list[tuple[str, int]]]) -> list[tuple[int, list[str]]]:
    """Split each block's trainable tensors ``(name, numel)``, in order, into runs of at most as many values as the
    model's largest tensor: ``[(block index, names)]``, the gradient blocks :class:`OffloadedUpdates` is given.

    The NVMe tier stages a unit's masters + state in each of its ``threads + 2`` buffers, so RAM follows the largest
    unit. A whole decoder layer (the streaming unit) would need three layers' masters + state (AdamW: 3 x 12 bytes x
    the layer's values); runs go up to the largest tensor so small tensors (norms, biases) share one I/O. With a
    chunk size (element-wise optimizers, :func:`staging_units`) each run is staged in units of at most that size;
    without one a tensor cannot be split (GaLore projects, SPAM and FRUGAL draw masks over whole tensors), so the
    largest tensor is the floor.
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


def check_int(what: str, value, low: int) -> None:
    """A ValueError naming ``what`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}")


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
