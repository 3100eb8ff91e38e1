"""Gradients from the compute device into their CPU buffers without stalling backward.

The offloaded optimizer's gradient hook (:mod:`.offloaded_updates`) runs inside autograd's backward. A plain
``grad.to("cpu")`` there is a synchronizing device-to-host copy on the compute stream: on CUDA backward would stop
for every gradient until its bytes crossed PCIe (docs/offload-design.md rule 10; DeepSpeed#1130's synchronize
lesson). :class:`GradMover` instead:

* **CUDA**: queues the copy on its own copy stream, after the compute stream's work that produced the gradient
  (``wait_stream``), into pinned host memory (``non_blocking``: a DMA that overlaps the rest of backward), and marks
  the gradient's memory as used by that stream (``record_stream``) so the caching allocator does not hand it out
  before the copy is done. A gradient that is the first of its buffer's step and already in the buffer's dtype is
  copied straight into the (pinned) buffer; otherwise into a pinned staging tensor, which a worker thread adds into
  the buffer (widened to fp32 for sums) once the copy's event has fired.
* **CPU device**: the gradient is copied (the step's first) or added into its buffer at once (nothing to
  overlap).

Each :meth:`move` on CUDA returns a future; whoever reads a buffer (a block's update, global-norm clipping) waits
for the futures of its gradients first.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class GradMover:
    """Moves gradients into CPU buffers: asynchronously on CUDA (copy stream, pinned staging, events), inline on
    the CPU. ``device``: the gradients' device."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimtune-grad") if self.cuda else None
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.staging_bytes = 0  # pinned staging allocated (kept for reuse: pinned allocations are slow)

    def move(self, grad: torch.Tensor, dst: torch.Tensor, fresh: bool) -> Future | None:
        """Add ``grad`` into ``dst`` (a CPU view; ``fresh``: it holds zeros, nothing summed yet this step). Returns
        the future of a transfer still under way (CUDA), None when it is done (CPU)."""
        if not self.cuda:  # a fresh buffer is written, not read and summed (as autograd assigns a first gradient)
            dst.copy_(grad) if fresh else dst.add_(grad)
            return None
        direct = fresh and dst.dtype == grad.dtype and dst.is_pinned()  # pragma: no cover - CUDA only
        compute = torch.cuda.current_stream(grad.device)  # pragma: no cover - CUDA only
        with torch.cuda.stream(self.stream):  # pragma: no cover - CUDA only
            self.stream.wait_stream(compute)
            target = dst if direct else self._take(grad.numel(), grad.dtype).view(grad.shape)
            target.copy_(grad, non_blocking=True)
            grad.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        if direct:  # pragma: no cover - CUDA only
            return self._pool.submit(event.synchronize)
        return self._pool.submit(self._land, event, target, dst)  # pragma: no cover - CUDA only

    def _land(self, event, staging: torch.Tensor, dst: torch.Tensor) -> None:  # pragma: no cover - CUDA only
        event.synchronize()
        dst.add_(staging.to(dst.dtype))
        with self._lock:
            self._free.setdefault((staging.numel(), staging.dtype), []).append(staging.view(-1))

    def _take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover - CUDA only
        with self._lock:
            free = self._free.get((numel, dtype))
            if free:
                return free.pop()
            self.staging_bytes += numel * torch.empty((), dtype=dtype).element_size()
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def close(self) -> None:
        """Let every queued transfer land and stop the worker."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
