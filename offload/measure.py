"""Quick measurements the planner's step-time bound rests on: matmul FLOP/s, host<->device copy and memcpy bandwidth.

Each takes well under a second (a few repetitions of one fixed-size operation, best time kept), so ``slimtune plan``
stays fast. NVMe bandwidth is :func:`.nvme.measure_bandwidth`. All figures are per second: bytes/s and FLOP/s.
"""

from __future__ import annotations

import time

import torch

_MIB = 1 << 20


def _best_time(fn, repeat: int, sync) -> float:
    fn()  # warm-up (allocations, lazy init, CPU frequency)
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeat: int = 3) -> float:
    """FLOP/s of one ``n x n`` matmul in ``dtype`` on ``device`` (2 n^3 FLOPs); n = 4096 on CUDA, 512 on CPU."""
    n = n or (4096 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best_time(lambda: a @ b, repeat, _sync(device))


def copy_bandwidth(device: torch.device, nbytes: int = 64 * _MIB, repeat: int = 3) -> dict[str, float]:
    """Bytes/s of the links between host and compute device: ``cpu->gpu`` and ``gpu->cpu`` (pinned host buffer on
    CUDA, as the engine's staging is), and ``memcpy`` (host to host, the CPU update's memory bandwidth). On a CPU
    compute device the "gpu" tier is host memory, so both links are a memcpy."""
    host = torch.empty(nbytes, dtype=torch.uint8)
    other = torch.empty(nbytes, dtype=torch.uint8)
    memcpy = nbytes / _best_time(lambda: other.copy_(host), repeat, lambda: None)
    if device.type != "cuda":
        return {"cpu->gpu": memcpy, "gpu->cpu": memcpy, "memcpy": memcpy}
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    sync = _sync(device)
    h2d = nbytes / _best_time(lambda: dev.copy_(pinned, non_blocking=True), repeat, sync)
    d2h = nbytes / _best_time(lambda: pinned.copy_(dev, non_blocking=True), repeat, sync)
    return {"cpu->gpu": h2d, "gpu->cpu": d2h, "memcpy": memcpy}
