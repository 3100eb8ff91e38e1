"""Memory probes for the tiers slimtune manages: process RSS (CPU tier) and CUDA allocator peaks (GPU tier).

The offload engine will add NVMe byte counters; the trainer logs whatever :func:`memory_snapshot` returns.
"""

from __future__ import annotations

import ctypes
import resource
import sys

import psutil
import torch


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``). Weights moved to an offload home are freed in
    pieces below glibc's mmap threshold, so without this the process keeps their pages and RSS does not drop."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to do
            pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # the offloaded optimizer's: its freed gradients and staged units go back at once
STREAM_MMAP_THRESHOLD_BYTES = 8 << 20  # streamed layers alone: activations up to 8 MiB are reused from the heap
RESIDENT_MMAP_THRESHOLD_BYTES = 256 << 20  # nothing offloaded: every activation and gradient reused from the heap
_smallest_threshold: int | None = None  # the smallest threshold asked for in this process (it wins)


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> None:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own ``mmap``, so freeing it gives
    the pages back. Process-wide; the smallest threshold any engine of the process asked for wins. No-op off glibc.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after which tensors below it
    come from the heap and arenas, which keep freed pages: an offloaded run that frees a gradient, a staged block or a
    recomputed activation every few milliseconds then holds hundreds of MiB it does not use (measured on the offload
    bench (bench/offload.py), slimtune row, before the staging units: 1450 MiB steady RSS with glibc's default, 1130
    MiB with a fixed 1 MiB threshold). Setting the threshold fixes it (and turns off the adjustment).

    The price is a fresh mapping, page faults and zeroing for every allocation above the threshold: on a step whose
    activations are a few MiB each that dominates (bench/peers.py's 220M model, QLoRA with the base streamed from
    CPU, batch 4 x 256: 4.5 s per step at 1 MiB, 2.0 s at 8 MiB, peak RSS 879 vs 1218 MiB). So the streamer alone
    (adapters: nothing large is freed per step but activations) asks for :data:`STREAM_MMAP_THRESHOLD_BYTES`, and
    the offloaded optimizer for 1 MiB.

    Training with nothing offloaded asks for :data:`RESIDENT_MMAP_THRESHOLD_BYTES`: glibc's default is no better
    for it. Its adjusted threshold still maps every tensor above the largest one freed so far, and its trim
    threshold (twice that) hands the top of the heap back between steps, so each step faults its activations in
    again. Measured on bench/mixlora.py's quickstart model (2 cores, fp32, 60 steps, 3 runs each): LoRA 42.3 ->
    37.1 ms per step, MixLoRA 64.9 -> 55.2 ms. There is no budget to keep in memory, and the heap never holds more
    than the step's own peak."""
    global _smallest_threshold
    threshold = _smallest_threshold = min(threshold, _smallest_threshold or threshold)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(M_MMAP_THRESHOLD, threshold)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)
        except (OSError, AttributeError):
            pass


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for two contiguous CPU tensors of the same bytes, as one ``memmove`` outside the GIL and
    outside torch's intra-op thread pool: for the offload engine's I/O threads. A ``Tensor.copy_`` there opens an
    OpenMP parallel region from a second thread, whose team then competes with the training thread's own: measured
    on a QLoRA step streamed from CPU homes (2 cores, 16 layers of 6 MB), 1.43x the time of the same step with the
    copies made inline; with ``memmove`` the two are equal."""
    if not (dst.is_contiguous() and src.is_contiguous() and dst.device.type == src.device.type == "cpu"):
        raise ValueError("host_copy takes contiguous CPU tensors")
    n = dst.numel() * dst.element_size()
    if n != src.numel() * src.element_size():
        raise ValueError(f"host_copy: {n} bytes into {src.numel() * src.element_size()}")
    if n:
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), n)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started: Linux's ``VmHWM`` (/proc/self/status), else
    getrusage's ``ru_maxrss`` (KiB on Linux, bytes on macOS).

    ``ru_maxrss`` of a process started by ``fork`` + ``exec`` keeps the forked copy's resident size (Linux records
    the old address space's high-water mark into it at exec), so a training run launched from a large parent (a
    bench that just wrote a checkpoint, a notebook) would report the parent's memory as its own peak. ``VmHWM`` is
    the high-water mark of this process's own address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_gpu_bytes(device: torch.device | None = None) -> int | None:
    """Peak bytes allocated by the CUDA caching allocator on ``device`` (None when not on CUDA)."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device)


def memory_snapshot(device: torch.device) -> dict[str, int]:
    """Memory fields for metrics.jsonl: rss_bytes, peak_rss_bytes and, on CUDA, gpu/peak_gpu bytes."""
    snap = {"rss_bytes": current_rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    gpu_peak = peak_gpu_bytes(device)
    if gpu_peak is not None:
        snap["gpu_bytes"] = torch.cuda.memory_allocated(device)
        snap["peak_gpu_bytes"] = gpu_peak
    return snap
