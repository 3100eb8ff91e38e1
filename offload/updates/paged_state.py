"""``optimizer.state`` during ``finish_step`` on the NVMe tier: per-parameter state paged in block by block.

Most optimizers' ``finish_step`` touches only optimizer-wide counters (SPAM keeps them in ``param_groups[0]``), and
then nothing is read. SPAM with sparse momentum (``density``) re-draws every mask at a reset boundary and moves the
moments onto the new mask (``optimizers/spam.py`` ``_redraw_masks``), so it reads and replaces per-parameter state
of every projected parameter. With state on NVMe that state is not in RAM; this mapping stands in for
``optimizer.state`` while ``finish_step`` runs and loads a block's state on first access, writing the previous
block back (re-laid out if the shapes changed) when another block is touched. RAM stays one staging buffer, and
optimizers whose ``finish_step`` reads no per-parameter state cost nothing.

``finish_step`` may read and replace state but must not change parameter values (none of the project's do): the
masters are visible during paging, but updated device weights are published only by block updates.
"""

from __future__ import annotations

import torch


class PagedState(dict):
    """A dict keyed by master tensors whose values are loaded on demand from the engine's NVMe regions."""

    def __init__(self, engine):
        super().__init__()
        self._engine = engine
        self._block: int | None = None
        self._slot = None

    def _state(self, p: torch.Tensor) -> dict:
        where = self._engine._master_at.get(id(p))
        if where is None:
            raise KeyError("not a parameter of this optimizer")
        b, _ = where
        if b != self._block:
            self.flush()
            engine = self._engine
            self._slot, self._block = engine.swapper.acquire(b), b
            engine._stage(b, self._slot)  # puts the block's state into this dict (engine.optimizer.state is self)
        return dict.__getitem__(self, p)

    def __getitem__(self, p):
        return self._state(p)

    def get(self, p, default=None):
        return self._state(p) if id(p) in self._engine._master_at else default

    def __contains__(self, p) -> bool:
        return id(p) in self._engine._master_at

    def setdefault(self, p, default=None):
        return self._state(p)

    def __setitem__(self, p, value) -> None:
        if self._block is not None and self._engine._master_at.get(id(p), (None,))[0] == self._block:
            dict.__setitem__(self, p, value)
        elif id(p) in self._engine._master_at:
            self._state(p)  # page its block in, then replace the whole entry
            dict.__setitem__(self, p, value)
        else:
            raise KeyError("not a parameter of this optimizer")

    def flush(self) -> None:
        """Write the paged-in block back (async; the engine drains after finish_step) and park its masters."""
        if self._block is None:
            return
        engine, b, slot = self._engine, self._block, self._slot
        states = [dict.get(self, m, {}) for m in engine.blocks[b].masters]
        engine.pack(b, slot, states)
        for m, parked in zip(engine.blocks[b].masters, engine.blocks[b].parked):
            dict.pop(self, m, None)
            m.data = parked
        engine.swapper.release(slot, b, engine.layouts[b].nbytes)
        self._block = self._slot = None
