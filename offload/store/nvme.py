"""NVMe block store: one swap file per store, aligned O_DIRECT reads/writes from a small thread pool.

The offload engine keeps each transformer block's tensors in one flat buffer per tier; this store is the NVMe tier.
Design, and the ZeRO-Infinity lessons it applies (docs/offload-design.md, "rule N" below):

- **One file, fixed regions.** A store owns one swap file (``slimtune-<pid>-<random>.swap`` in ``offload.nvme_dir``);
  ``reserve(key, nbytes)`` hands out an aligned region (size rounded up to ``alignment``). No per-parameter files
  and no minimum-size special cases (rules 2, 22); a write larger than its region fails at once naming both sizes
  (rule 4, cf. DeepSpeed "More elements ... than buffer size", #3506).
- **O_DIRECT, so the memory savings are real.** Buffered I/O double-buffers through the page cache (rule 13), so
  the file is opened with ``O_DIRECT`` (and probed with one aligned write, since some filesystems accept the flag
  and refuse the I/O). When the filesystem refuses it (tmpfs, some FUSE), ``direct=None`` falls back to buffered
  I/O + ``posix_fadvise(DONTNEED)`` with a warning and ``store.direct`` False; ``direct=True`` raises instead.
- **Pure Python, no native build.** ``os.pwrite``/``os.preadv`` release the GIL, so a ``ThreadPoolExecutor`` gives
  real queue depth without libaio (whose build is DeepSpeed's most common failure, rule 21, #6972/#7346). Each
  transfer is split into ``chunk_bytes`` (8 MiB) requests spread over the threads (>= 1 MiB requests, rule 13).
- **Bounded staging.** O_DIRECT needs aligned address, offset and length. Aligned caller buffers (see
  :func:`aligned_empty`; the engine's pinned ring, rules 3 and 5) are read/written in place; unaligned ones, and the
  unaligned tail, go through one ``chunk_bytes`` staging buffer per I/O thread, so staging memory is ``threads *
  chunk_bytes`` whatever the tensor size (DeepSpeed's pools cost GBs of RAM here: bench/offload_deepspeed.py).
- **Fail loudly, up front.** Missing/unwritable directory, and ``capacity_bytes`` above the free space, fail in the
  constructor naming the directory and the recipe key; the capacity is preallocated (``posix_fallocate``) so a run
  does not die half way. A write that still hits ENOSPC raises :class:`NvmeStoreError` naming directory and bytes,
  and the region is marked unwritten so a later read fails instead of returning torn data.
- **No leaked swap files.** ``close()``, the context manager, garbage collection and interpreter exit all remove
  the file (``weakref.finalize``) unless ``keep=True``.

Counters for metrics.jsonl: ``bytes_read`` / ``bytes_written`` (caller bytes, not padding) and ``io_seconds``
(seconds the I/O threads spent transferring, summed over threads, so it can exceed wall time).
Ordering is the caller's job: wait on a write's future before reading that key (a read of a key whose last write
has not completed is refused), and keep a tensor unchanged until its future is done.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_MIB = 1 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_KEY = "offload.nvme_dir"


class NvmeStoreError(OSError):
    """A misconfigured or failing NVMe store; the message names the directory and what would be valid."""


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def aligned_empty(nbytes: int, alignment: int = 4096, pin: bool = False) -> torch.Tensor:
    """A flat uint8 CPU tensor of ``nbytes`` whose address is a multiple of ``alignment`` (zero-copy O_DIRECT)."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % alignment
    return raw[start : start + nbytes]


def _byte_view(t: torch.Tensor):
    """Writable memoryview over a contiguous CPU tensor's bytes (no copy)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _cleanup(fd: int, path: str, pool: ThreadPoolExecutor, keep: bool) -> None:
    pool.shutdown(wait=True)
    os.close(fd)
    if not keep:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class NvmeStore:
    """Aligned regions of one swap file in ``directory``; async ``write``/``read`` of contiguous CPU tensors."""

    def __init__(self, directory, capacity_bytes: int | None = None, direct: bool | None = True, threads: int = 2,
                 alignment: int = 4096, chunk_bytes: int = 8 * _MIB, keep: bool = False):
        self.directory = d = os.path.abspath(os.fspath(directory))
        if alignment < 512 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= 512, got {alignment}")
        if chunk_bytes <= 0 or chunk_bytes % alignment:
            raise ValueError(f"chunk_bytes must be a positive multiple of alignment ({alignment}), got {chunk_bytes}")
        if not os.path.isdir(d):
            what = "is not a directory" if os.path.exists(d) else "does not exist (or a parent is not a directory)"
            raise NvmeStoreError(errno.ENOENT, f"{_KEY}: {d} {what}; set {_KEY} to an existing writable directory "
                                 "on a local NVMe/SSD disk")
        if not os.access(d, os.W_OK | os.X_OK):
            raise NvmeStoreError(errno.EACCES, f"{_KEY}: directory {d} is not writable by this user; set {_KEY} "
                                 "to a directory you can write to")
        if capacity_bytes is not None:
            free = _free_bytes(d)
            if capacity_bytes > free:
                raise NvmeStoreError(errno.ENOSPC, f"{_KEY}: {d} has {free} bytes free but the store needs "
                                     f"capacity_bytes={capacity_bytes} ({capacity_bytes - free} more); free space or "
                                     f"point {_KEY} at a larger disk")
        self.alignment, self.chunk_bytes, self.capacity_bytes = alignment, chunk_bytes, capacity_bytes
        self.path = os.path.join(d, f"slimtune-{os.getpid()}-{secrets.token_hex(4)}.swap")
        self.fd, self.direct = self._open(direct)
        self._lock = threading.Lock()
        self._regions: dict[object, tuple[int, int]] = {}  # key -> (offset, reserved bytes)
        self._valid: dict[object, int] = {}  # key -> bytes of the last completed write
        self._end = 0
        self._local = threading.local()
        self.bytes_read = self.bytes_written = 0
        self.io_seconds = 0.0
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="slimtune-nvme")
        self._finalizer = weakref.finalize(self, _cleanup, self.fd, self.path, self._pool, keep)
        if capacity_bytes:
            try:
                self._preallocate(0, capacity_bytes)
            except NvmeStoreError:
                self.close()
                raise

    def _preallocate(self, offset: int, nbytes: int) -> None:
        """Hold ``nbytes`` of disk from ``offset`` (``posix_fallocate``), so a full disk fails now, not mid-write."""
        try:
            os.posix_fallocate(self.fd, offset, nbytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NvmeStoreError(e.errno, f"{_KEY}: could not preallocate {nbytes} bytes in {self.directory}: "
                                     f"{e.strerror}") from e  # EOPNOTSUPP etc.: the space is just not held

    def grow(self, extra_bytes: int, why: str) -> None:
        """Raise ``capacity_bytes`` by ``extra_bytes``, preallocated like the first capacity (a region that outgrew
        its prediction, say). ``why`` names what needs the space in the error when the disk has no room for it."""
        if self.capacity_bytes is None or extra_bytes <= 0:
            return
        free = _free_bytes(self.directory)
        if extra_bytes > free:
            raise NvmeStoreError(errno.ENOSPC, f"{_KEY}: {why} needs {extra_bytes} more bytes in {self.directory}, "
                                 f"which has {free} free; free space or point {_KEY} at a larger disk")
        self._preallocate(self.capacity_bytes, extra_bytes)
        with self._lock:
            self.capacity_bytes += extra_bytes

    def _open(self, direct: bool | None) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise NvmeStoreError(e.errno, f"{_KEY}: cannot create a swap file in {self.directory}: {e.strerror}; "
                                 f"set {_KEY} to a writable directory") from e
        if direct is False:
            return fd, False
        reason = "this platform has no O_DIRECT"
        if _O_DIRECT:
            try:  # reopen with O_DIRECT and probe one aligned write: some filesystems accept the flag, refuse the I/O
                dfd = os.open(self.path, os.O_RDWR | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                try:
                    os.pwrite(dfd, _byte_view(aligned_empty(self.alignment, self.alignment).zero_()), 0)
                    os.ftruncate(dfd, 0)
                except OSError:
                    os.close(dfd)
                    raise
                os.close(fd)
                return dfd, True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    os.close(fd)
                    os.unlink(self.path)
                    raise
                reason = f"the filesystem refuses O_DIRECT ({e.strerror})"
        if direct:
            os.close(fd)
            os.unlink(self.path)
            raise NvmeStoreError(errno.EINVAL, f"{_KEY}: {self.directory}: {reason}; use a directory on a local "
                                 "disk (not tmpfs) or pass direct=None to fall back to buffered I/O")
        warnings.warn(f"NvmeStore: {reason} in {self.directory}; using buffered I/O + posix_fadvise(DONTNEED) "
                      "(on tmpfs the data stays in RAM)", RuntimeWarning, stacklevel=3)
        return fd, False

    # ---- regions -------------------------------------------------------------------------------------------------
    def reserve(self, key, nbytes: int) -> int:
        """Allocate (once) an aligned region of at least ``nbytes`` for ``key``; returns its file offset."""
        with self._lock:
            if key in self._regions:
                off, size = self._regions[key]
                if nbytes > size:
                    raise ValueError(f"key {key!r} already has a {size}-byte region; cannot grow it to {nbytes}")
                return off
            size = -(-max(nbytes, 1) // self.alignment) * self.alignment
            if self.capacity_bytes is not None and self._end + size > self.capacity_bytes:
                raise NvmeStoreError(errno.ENOSPC, f"NvmeStore in {self.directory}: capacity_bytes="
                                     f"{self.capacity_bytes} exceeded: {self._end} used + {size} for key {key!r}")
            self._regions[key], self._end = (self._end, size), self._end + size
            return self._regions[key][0]

    @property
    def reserved_bytes(self) -> int:
        return self._end

    # ---- I/O -----------------------------------------------------------------------------------------------------
    def write(self, key, tensor: torch.Tensor) -> Future:
        """Write a contiguous CPU tensor's bytes to ``key``'s region (reserved on first use)."""
        self._check(tensor, "write source")
        off = self.reserve(key, tensor.nbytes)  # raises if the key's region is smaller than the tensor
        with self._lock:
            self._valid.pop(key, None)
        return self._submit(key, tensor, off, write=True)

    def read(self, key, out: torch.Tensor) -> Future:
        """Read ``out.nbytes`` bytes of ``key`` into the contiguous CPU tensor ``out``; the future returns ``out``."""
        self._check(out, "read target")
        with self._lock:
            valid = self._valid.get(key)
        if valid is None:
            raise KeyError(f"NvmeStore: key {key!r} has no completed write (wait on the write's future first)")
        if out.nbytes > valid:
            raise ValueError(f"read of {out.nbytes} bytes from key {key!r}, but only {valid} bytes were written")
        return self._submit(key, out, self._regions[key][0], write=False)

    def _check(self, t: torch.Tensor, what: str) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"NvmeStore in {self.directory} is closed")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{what} must be a contiguous CPU tensor (got device={t.device}, shape="
                             f"{tuple(t.shape)}, stride={t.stride()}); use a flat buffer and copy with .copy_()")

    def _submit(self, key, t: torch.Tensor, offset: int, write: bool) -> Future:
        n, done = t.nbytes, Future()
        done.set_running_or_notify_cancel()
        if n == 0:
            done.set_result(t)
            return done
        view, addr = _byte_view(t), t.data_ptr()
        starts = range(0, n, self.chunk_bytes)
        state = {"left": len(starts), "error": None}

        def finish(f: Future) -> None:
            with self._lock:
                state["error"] = state["error"] or f.exception()
                state["left"] -= 1
                if state["left"]:
                    return
                if state["error"] is None and write:
                    self._valid[key] = n
            if state["error"] is not None:
                done.set_exception(state["error"])
            else:
                done.set_result(t)

        for s in starts:
            m = min(self.chunk_bytes, n - s)
            fut = self._pool.submit(self._chunk, view[s : s + m], addr + s, offset + s, write, key, n)
            fut.add_done_callback(finish)
        return done

    def _chunk(self, buf: memoryview, addr: int, offset: int, write: bool, key, total: int) -> None:
        t0, m, a = time.perf_counter(), len(buf), self.alignment
        staged = self.direct and (addr % a or m % a)
        size = -(-m // a) * a if staged else m
        if staged:
            stage = getattr(self._local, "stage", None)
            if stage is None:
                stage = self._local.stage = _byte_view(aligned_empty(self.chunk_bytes, a))
            io = stage[:size]
        else:
            io = buf
        try:
            if write:
                if staged:
                    io[:m] = buf
                    io[m:] = bytes(size - m)
                pos = 0
                while pos < size:
                    pos += os.pwrite(self.fd, io[pos:], offset + pos)
            else:
                pos = 0
                while pos < size:
                    got = os.preadv(self.fd, [io[pos:]], offset + pos)
                    if got == 0:
                        raise NvmeStoreError(errno.EIO, f"NvmeStore: short read of key {key!r} from {self.path} "
                                             f"({pos} of {size} bytes at offset {offset})")
                    pos += got
                if staged:
                    buf[:] = io[:m]
            if not self.direct:  # drop clean pages now; dirty ones go once written back
                os.posix_fadvise(self.fd, offset, size, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                st = os.statvfs(self.directory)
                raise NvmeStoreError(e.errno, f"NvmeStore: out of space in {self.directory} writing {total} bytes "
                                     f"of key {key!r} (chunk at offset {offset}; {st.f_bavail * st.f_frsize} bytes "
                                     f"free); pass capacity_bytes to reserve space up front or point {_KEY} at a "
                                     "larger disk") from e
            raise
        with self._lock:
            self.io_seconds += time.perf_counter() - t0
            if write:
                self.bytes_written += m
            else:
                self.bytes_read += m

    # ---- lifetime ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for pending I/O, close the file and remove it (unless ``keep=True``). Idempotent."""
        self._finalizer()

    def __enter__(self) -> NvmeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_bandwidth(directory, nbytes: int = 256 * _MIB, threads: int = 2) -> tuple[float, float]:
    """(read GB/s, write GB/s) of an ``NvmeStore`` in ``directory`` for one ``nbytes`` transfer (1 GB = 1e9 B).

    The write includes ``fdatasync`` so it is not just a page-cache copy; O_DIRECT reads bypass the cache (the
    buffered fallback drops it with ``posix_fadvise`` first). Used by the planner's step-time lower bound.
    """
    buf = aligned_empty(nbytes)
    buf.fill_(0xA5)
    with NvmeStore(directory, capacity_bytes=nbytes, direct=None, threads=threads) as store:
        t0 = time.perf_counter()
        store.write("bw", buf).result()
        os.fdatasync(store.fd)
        t_write = time.perf_counter() - t0
        if not store.direct:
            os.posix_fadvise(store.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        store.read("bw", buf).result()
        t_read = time.perf_counter() - t0
    return nbytes / t_read / 1e9, nbytes / t_write / 1e9
