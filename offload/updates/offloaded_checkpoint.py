"""Checkpoints of the offloaded optimizer, streamed block by block (docs/offload-design.md rule 19: resume must cover
offloaded state explicitly, without a whole-model ``state_dict()`` in RAM).

Layout of the directory :meth:`OffloadedUpdates.save` writes (the same for both tiers, so a run can resume on the
other tier)::

    offload.json               format, step count, update order, per staging unit: names, shapes, rows (null:
                               the whole parameter, else [start, stop) of a row chunk), state keys and non-tensor
                               state values; every param group's non-tensor values (lr, betas, ...)
    groups.safetensors         tensor-valued param-group entries (SPAM's total_step / current_step counters)
    block-00000.safetensors    "master/<i>" and "state/<i>/<key>" of unit 0's entry i, ...

One file per staging unit (a row chunk has its own masters and state), so resuming needs the same units: the same
model, trainable parameters, blocks and ``chunk_bytes`` (``offload.staging_chunk``). RAM while saving or loading:
one unit (its staging buffer on NVMe). The directory is written to a temporary
sibling and renamed into place (:func:`.atomic_io.atomic_dir`, the trainer's checkpoints use the same), so a kill
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..store.atomic_io import atomic_dir
from .state_layout import master_views, state_views

FORMAT = 1
META = "offload.json"
GROUPS = "groups.safetensors"


def _block_file(b: int) -> str:
    return f"block-{b:05d}.safetensors"


def _plain(value, what: str):
    """A non-tensor state or group value as JSON (tuples tagged so they come back as tuples)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_plain(v, what) for v in value]}
    if isinstance(value, list):
        return [_plain(v, what) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{what}: {type(value).__name__} values cannot be checkpointed; optimizer state must be tensors "
                     "and plain numbers (optimizers/base.py)")


def _rows_json(rows: slice | None) -> list[int] | None:
    return None if rows is None else [rows.start, rows.stop]


def _units(engine) -> list[tuple[list[str], list[list[int]], list]]:
    """Each staging unit's (names, shapes, rows as JSON): what a checkpoint must match to be loaded."""
    return [(blk.names, [list(s) for s in blk.shapes], [_rows_json(r) for r in blk.rows]) for blk in engine.blocks]


def _unplain(value):
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_unplain(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def save_engine(engine, directory) -> None:
    """Write the engine's masters and optimizer state to ``directory``, block by block (see the module docstring)."""
    if engine.futures:
        raise RuntimeError("save() between optimizer steps: call step() first")
    groups = engine.optimizer.param_groups
    group_tensors = {f"{g}/{k}": v.detach().clone() for g, group in enumerate(groups) for k, v in group.items()
                     if k != "params" and isinstance(v, torch.Tensor)}
    meta = {"format": FORMAT, "steps": engine.steps, "order": list(engine.order),
            "master_dtype": str(engine.master_dtype), "blocks": [],
            "param_groups": [{k: _plain(v, f"param group {g} key {k!r}") for k, v in group.items()
                              if k != "params" and not isinstance(v, torch.Tensor)} for g, group in enumerate(groups)]}
    with atomic_dir(Path(directory)) as tmp:
        for b, blk in enumerate(engine.blocks):
            with block_state(engine, b) as (masters, states):
                tensors = {f"master/{i}": m.contiguous() for i, m in enumerate(masters)}
                tensors.update({f"state/{i}/{k}": v.contiguous() for i, s in enumerate(states) for k, v in s.items()
                                if isinstance(v, torch.Tensor)})
                save_file(tensors, tmp / _block_file(b))
                meta["blocks"].append({
                    "names": blk.names, "shapes": [list(s) for s in blk.shapes],
                    "rows": [_rows_json(r) for r in blk.rows],
                    "state": [{"keys": list(s), "scalars": {k: _plain(v, f"state of {blk.names[i]!r} key {k!r}")
                                                            for k, v in s.items() if not isinstance(v, torch.Tensor)}}
                              for i, s in enumerate(states)]})
        save_file(group_tensors, tmp / GROUPS)
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    _after_io(engine)


def load_engine(engine, directory) -> None:
    """Read what :func:`save_engine` wrote back into the engine and the model's weights."""
    directory = Path(directory)
    if engine.futures:
        raise RuntimeError("load() between optimizer steps: call step() first")
    if not (directory / META).is_file():
        raise ValueError(f"{directory} is not an offloaded-optimizer checkpoint (no {META})")
    meta = json.loads((directory / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / META}: format {meta.get('format')!r}, this version reads {FORMAT}")
    ours = _units(engine)
    theirs = [(blk["names"], blk["shapes"], blk.get("rows", [None] * len(blk["names"]))) for blk in meta["blocks"]]
    for b, (a, c) in enumerate(zip_longest(ours, theirs)):
        if a != c:
            raise ValueError(f"{directory}: staging unit {b} holds {c} (names, shapes, rows) but this engine's unit "
                             f"{b} is {a}; resume with the same model, trainable parameters, blocks and staging "
                             "chunk size (offload.staging_chunk)")
    groups = engine.optimizer.param_groups
    if len(meta["param_groups"]) != len(groups):
        raise ValueError(f"{directory}: {len(meta['param_groups'])} param groups saved, the optimizer has "
                         f"{len(groups)}; resume with the same optimizer settings")
    _before_io(engine)
    for b, blk_meta in enumerate(meta["blocks"]):
        tensors = load_file(directory / _block_file(b))
        masters = [tensors[f"master/{i}"] for i in range(len(blk_meta["names"]))]
        states = [{k: tensors[f"state/{i}/{k}"] if k not in s["scalars"] else _unplain(s["scalars"][k])
                   for k in s["keys"]} for i, s in enumerate(blk_meta["state"])]
        restore_block(engine, b, masters, states)
        del tensors
    group_tensors = load_file(directory / GROUPS)
    for g, (group, values) in enumerate(zip(groups, meta["param_groups"])):
        group.update({k: _unplain(v) for k, v in values.items()})
        group.update({k.split("/", 1)[1]: v for k, v in group_tensors.items() if k.split("/", 1)[0] == str(g)})
    engine.steps, engine.order = int(meta["steps"]), [int(b) for b in meta["order"]]
    _after_io(engine)


@contextlib.contextmanager
def block_state(engine, b: int) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
    """Block ``b``'s masters and per-parameter optimizer state, readable in RAM for the duration (read-only)."""
    blk = engine.blocks[b]
    if engine.swapper is None:
        yield blk.master_views, [engine.optimizer.state.get(m, {}) for m in blk.masters]
        return
    slot = engine.swapper.acquire(b)
    try:
        yield (master_views(slot.buf, blk.shapes, blk.offsets, engine.master_dtype),
               state_views(slot.buf, engine.layouts[b]))
    finally:
        engine.swapper.unclaim(slot)


@torch.no_grad()
def restore_block(engine, b: int, masters: list[torch.Tensor], states: list[dict]) -> None:
    """Put saved masters and state into block ``b``'s tier, and the masters into the device params."""
    blk = engine.blocks[b]
    everything = list(range(len(blk.params)))
    if engine.swapper is None:
        for view, m in zip(blk.master_views, masters):
            view.copy_(m)
        for m, state in zip(blk.masters, states):
            engine.optimizer.state.pop(m, None)
            if state:
                engine.optimizer.state[m] = state
        engine.state_held[b] = engine.block_state_bytes(b)
        engine.publish(b, blk.master_views, everything)
        return
    slot = engine.swapper.acquire(b, read=False)
    for view, m in zip(master_views(slot.buf, blk.shapes, blk.offsets, engine.master_dtype), masters):
        view.copy_(m)
    engine.publish(b, engine.pack(b, slot, states), everything)
    engine.swapper.release(slot, b, engine.layouts[b].nbytes)


def _before_io(engine) -> None:
    if engine.swapper is not None:
        engine.swapper.forget()  # prefetched regions are about to be rewritten


def _after_io(engine) -> None:
    """Writes landed; the next step's clock and (NVMe) prefetch start afresh."""
    if engine.swapper is not None:
        engine.swapper.forget()
    with engine.lock:
        engine.note_peak(0)
    engine.begin_step()
