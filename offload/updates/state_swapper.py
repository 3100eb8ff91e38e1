"""NVMe tier of the offloaded optimizer: one region per block, a ring of staging buffers, read-ahead/write-behind.

While block ``b`` is updated in one staging buffer, the next block the engine expects is read into another and the
previous one is written back from a third (DeepSpeed's ``pipeline_read`` / ``pipeline_write``; docs/offload-design.md
rule 3: a fixed ring of at least 3 buffers, sized from the largest block, so the engine never waits on a buffer pool
it does not own). The ring holds ``workers + 2`` buffers. The expected order is the order blocks were updated in the
previous step (the first step: backward order, i.e. the blocks reversed); a wrong guess only costs a wait, never
correctness.

Regions are reserved (and preallocated) up front from the optimizer's ``state_bytes``
(:func:`.state_layout.planned_block_bytes`), so a disk that is too small fails before training starts. State whose
size changes between refreshes (FRUGAL ``blockwise`` activating another tensor, SPAM ``density`` re-drawing a larger
mask) can outgrow that prediction: its block then moves to a region another block left behind, or a new one with 1/8
head room, checked against the disk's free space and preallocated when it happens (``NvmeStoreError`` naming the
directory and the bytes if it does not fit).

All I/O goes through :class:`.nvme.NvmeStore` (aligned ``O_DIRECT``, buffered fallback, swap file removed on close).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from ..store.nvme import NvmeStore, aligned_empty
from .state_layout import align_up


class _Slot:
    """One staging buffer: the region of ``block`` as of ``step`` (read, being read, or written back from here)."""

    def __init__(self, nbytes: int, pin: bool):
        self.buf = aligned_empty(nbytes, pin=pin)
        self.block: int | None = None
        self.step = -1
        self.read: Future | None = None
        self.write: Future | None = None
        self.busy = False  # owned by an update (or a load/save) until release
        self.reserved = False  # holds a prefetch nobody has acquired yet


class StateSwapper:
    """Regions and staging buffers of every block; ``acquire(b)`` gives a buffer holding ``b``'s region."""

    def __init__(self, directory, region_bytes: list[int], initial_bytes: list[int], staging: int, pin: bool,
                 events: list, lock: threading.Lock):
        self.alignment = 4096
        sizes = [align_up(max(n, 1), self.alignment) for n in region_bytes]
        self.store = NvmeStore(directory, capacity_bytes=sum(sizes), direct=None)
        self.regions = {b: (("block", b, 0), size) for b, size in enumerate(sizes)}  # block -> (store key, bytes)
        for key, size in self.regions.values():
            self.store.reserve(key, size)
        self._free: list[tuple[tuple, int]] = []  # regions left behind by a block that moved
        self.moves = 0
        self.valid_bytes = list(initial_bytes)  # bytes of each block's region that hold data (its layout's size)
        self._pin = pin
        self.slots = [_Slot(max(sizes), pin) for _ in range(staging)]
        self._lock = threading.Lock()
        self._events, self._events_lock = events, lock
        self.step = 0
        self.expected: list[int] = []  # blocks in the order the engine expects to update them this step
        self._claimed: set[int] = set()

    # ---- accounting -------------------------------------------------------------------------------------------
    @property
    def staging_bytes(self) -> int:
        return sum(s.buf.nbytes for s in self.slots)

    def io_bytes(self, nbytes: int) -> int:
        return align_up(max(nbytes, 1), self.alignment)

    def _event(self, lane: str, label: str, fut: Future) -> Future:
        """``fut``, completing only once its timeline event is recorded (a waiter then sees the event)."""
        start, out = time.perf_counter(), Future()
        out.set_running_or_notify_cancel()

        def done(f: Future) -> None:
            with self._events_lock:
                self._events.append((lane, start, time.perf_counter(), label))
            if f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(f.result())

        fut.add_done_callback(done)
        return out

    # ---- the step's schedule ----------------------------------------------------------------------------------
    def begin_step(self, step: int, expected: list[int]) -> None:
        with self._lock:
            self.step, self.expected, self._claimed = step, list(expected), set()

    def _idle(self, slot: _Slot) -> bool:
        """Free for a prefetch: not in use, not holding a prefetch, its write-back finished."""
        return not slot.busy and not slot.reserved and (slot.write is None or slot.write.done())

    def _start_read(self, slot: _Slot, b: int) -> None:
        n = self.io_bytes(self.valid_bytes[b])
        if n > slot.buf.nbytes:
            slot.buf = aligned_empty(n, pin=self._pin)
        slot.block, slot.step = b, self.step
        slot.read = self._event("nvme read", f"block {b}", self.store.read(self.regions[b][0], slot.buf[:n]))

    def prefetch(self) -> None:
        """Read the next expected blocks into idle buffers (never waits)."""
        with self._lock:
            staged = {s.block for s in self.slots if s.step == self.step and (s.reserved or s.busy)}
            for b in self.expected:
                if b in self._claimed or b in staged:
                    continue
                slot = next((s for s in self.slots if self._idle(s)), None)
                if slot is None:
                    return
                self._start_read(slot, b)
                slot.reserved = True
                staged.add(b)

    def acquire(self, b: int, read: bool = True) -> _Slot:
        """A staging buffer holding block ``b``'s region (waits for its read); the caller owns it until release.

        ``read=False``: a buffer for ``b`` whose content the caller replaces (construction, checkpoint load).
        """
        with self._lock:
            self._claimed.add(b)
            # b's data is here already: prefetched this step, or written back from here this step and not reused
            slot = next((s for s in self.slots if not s.busy and s.step == self.step and s.block == b), None)
            if slot is None:  # take a buffer no prefetch waits in, else steal the prefetch expected last
                free = [s for s in self.slots if not s.busy]
                unreserved = [s for s in free if not s.reserved]
                if unreserved:
                    slot = min(unreserved, key=lambda s: s.write is not None and not s.write.done())
                else:
                    rank = {blk: i for i, blk in enumerate(self.expected)}
                    slot = max(free, key=lambda s: rank.get(s.block, -1))
                slot.block = None  # its content is not b's
            slot.busy, slot.reserved = True, False
        for fut in (slot.read, slot.write):  # the buffer may still be read into or written from
            if fut is not None:
                fut.result()
        slot.read = slot.write = None
        if slot.block != b:
            if read:
                with self._lock:
                    self._start_read(slot, b)
                slot.read.result()
            slot.block, slot.step = b, self.step
        return slot

    def release(self, slot: _Slot, b: int, nbytes: int) -> None:
        """Write the first ``nbytes`` of the buffer back to ``b``'s region (moved first if it outgrew it); async."""
        n = self.io_bytes(nbytes)
        key = self._region_for(b, n)
        self.valid_bytes[b] = nbytes
        slot.write = self._event("nvme write", f"block {b}", self.store.write(key, slot.buf[:n]))
        slot.read = None
        with self._lock:
            slot.busy = False

    def unclaim(self, slot: _Slot) -> None:
        """Give a buffer back unchanged (no write): its content still equals the block's region."""
        with self._lock:
            slot.busy = False

    def _region_for(self, b: int, n: int) -> tuple:
        key, size = self.regions[b]
        if n <= size:
            return key
        with self._lock:
            fits = [r for r in self._free if r[1] >= n]
            if fits:
                new = min(fits, key=lambda r: r[1])
                self._free.remove(new)
            else:
                self.moves += 1
                new = (("block", b, self.moves), align_up(n + n // 8, self.alignment))  # 1/8 head room
                self._grow_capacity(b, new[1])
                self.store.reserve(*new)
            self._free.append((key, size))
            self.regions[b] = new
        return new[0]

    def _grow_capacity(self, b: int, size: int) -> None:
        """Extend the store's preallocated capacity for a region past the prediction, if the disk has room now."""
        self.store.grow(self.store.reserved_bytes + size - self.store.capacity_bytes,
                        f"block {b}'s optimizer state outgrew its prediction and")

    def ensure_buffer(self, slot: _Slot, nbytes: int, keep: int) -> None:
        """Grow ``slot``'s buffer to ``nbytes`` (keeping its first ``keep`` bytes) when a block's state outgrew it."""
        n = self.io_bytes(nbytes)
        if n > slot.buf.nbytes:
            new = aligned_empty(n, pin=self._pin)
            new[:keep].copy_(slot.buf[:keep])
            slot.buf = new

    def drain(self) -> None:
        """Wait for every read and write in flight; re-raises an I/O error (disk full names the directory)."""
        for slot in self.slots:
            for fut in (slot.read, slot.write):
                if fut is not None:
                    fut.result()

    def forget(self) -> None:
        """Drop prefetched data (after :meth:`drain`), e.g. before a checkpoint load rewrites the regions."""
        self.drain()
        with self._lock:
            for slot in self.slots:
                slot.block, slot.step, slot.read, slot.write, slot.reserved = None, -1, None, None, False

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.store.close()
