"""Stream decoder-layer weights from a home tier (CPU RAM or NVMe) through a ring of device slots.

docs/offload-design.md, rules 3, 6, 8, 9, 13, 14, 18 and 20. How it works:

* **Flat homes.** Each decoder layer's streamed tensors (its frozen weights, including bitsandbytes 4-bit codes;
  with ``stream_trainable`` all of its parameters) are packed into one contiguous, 4 KiB-aligned byte region: a
  (pinned, on CUDA) CPU buffer, or a region of one :class:`~slimtune.offload.store.nvme.NvmeStore` swap file. One big
  copy or one big aligned read per layer, never a per-tensor swap. Small non-parameter state (bnb quant states,
  norms of other modules, LoRA weights) stays resident.
* **A fixed ring of ``prefetch + 1`` device slots** (+1 with write-back), each the size of the largest layer,
  allocated once: at most ``prefetch + 1`` layers are bound (computing + prefetched), one more slot absorbs a
  write-back (zeroth-order). No buffer is ever
  held by a cache policy it does not own (DeepSpeed's "Not enough buffers", #3062). While a layer is not bound its
  parameters point at an empty placeholder, so nothing can silently use a stale copy (and a use fails loudly).
* **A static schedule.** Decoder layers run 0..L-1 forward, then L-1..0 in backward, each recomputed under
  activation checkpointing (mandatory: without it autograd would keep every fetched weight alive until backward,
  rule 8). So each layer is fetched twice per training step (once for forward, once for recompute + backward,
  rule 9), and once per step in forward-only use. The window is the next ``prefetch`` distinct layers of that
  schedule; evaluation and generation loop 0..L-1 repeatedly.
* **Hooks, no model changes.** Each layer's ``forward`` is wrapped (instance attribute; HF's own per-layer
  checkpointing is switched off for the streamed layers and restored on :meth:`detach`): bind the layer, run it
  inside ``torch.utils.checkpoint`` (non-reentrant, RNG preserved, so dropout recomputes identically) when autograd
  records, release it after its forward. In backward (``torch._C._current_graph_task_id() != -1``) the layer stays
  bound until the recompute of the layer below begins (its backward is done by then).
* **Overlap.** Copies run on a small thread pool (CPU home -> slot memcpy, NVMe reads straight into the aligned slot
  with O_DIRECT). On CUDA: pinned homes/staging, a copy stream and events, never ``synchronize()`` (DeepSpeed#1130).

The engine keeps its own accounting (``peak_bound`` layers, bytes per link, seconds waited, a timeline) which the
tests and ``metrics.jsonl`` read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from ..blocks import Block, flat_layout, keep_torch_forwards, model_blocks, view_as
from ..plan_phases import ring_slots
from ..store.memory import STREAM_MMAP_THRESHOLD_BYTES, fix_mmap_threshold, host_copy, release_free_memory
from ..store.nvme import NvmeStore, aligned_empty
from .bnb_compat import keep_training_layout, streamable_4bit
from .homes import HomeAccess

TIMELINE_EVENTS = 8192  # the timeline keeps the most recent events (a few steps of a large model), not a whole run


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (a checkpointed layer is being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def is_kv_cache(value) -> bool:
    """Whether ``value`` is a transformers key/value cache (a ``Cache``: state a layer call appends to)."""
    return isinstance(value, Cache)


def _done(value=None) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class _Layer:
    """A streamed decoder layer: its tensors, their offsets in the flat region and its bound slot (if any)."""

    def __init__(self, index: int, block: Block, params: list[nn.Parameter], offsets: list[int], nbytes: int):
        self.index, self.block, self.params, self.offsets, self.nbytes = index, block, params, offsets, nbytes
        self.shapes = [(p.shape, p.dtype) for p in params]
        self.slot: int | None = None       # ring slot holding (or receiving) the layer
        self.fetch: Future | None = None    # the copy into the slot; result: a CUDA event or None
        self.home_ready: Future = _done()   # a pending write-back to the home
        self.bound = False


class BlockStreamer(HomeAccess):
    """Keeps only the layers in the prefetch window on ``device``; the rest live in ``home`` ("cpu" or "nvme").

    ``stream_trainable``: stream every parameter of a layer (zeroth-order / full fine-tuning), not only frozen ones;
    ``writeback``: copy a released layer back to its home (its weights changed while bound, e.g. zeroth-order).
    ``on_bind(index)``: called after a layer is bound, before its compute (zeroth-order applies deferred updates).
    ``fill(index)``: materializes layer ``index``'s parameters just before its home is built (the streamed load,
    ``finetune/streamed_load.py``: the layer is read from the checkpoint then, so the model never exists whole).
    """

    def __init__(self, model: nn.Module, home: str, device: torch.device | str, prefetch: int = 1,
                 nvme_dir: str | None = None, stream_trainable: bool = False, writeback: bool = False,
                 threads: int = 2, on_bind: Callable[[int], None] | None = None,
                 fill: Callable[[int], None] | None = None):
        if home not in ("cpu", "nvme"):
            raise ValueError(f"home must be 'cpu' or 'nvme', got {home!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        if home == "nvme" and not nvme_dir:
            raise ValueError("home 'nvme' needs nvme_dir (offload.nvme_dir)")
        self.model, self.home, self.device = model, home, torch.device(device)
        self.prefetch, self.writeback, self.on_bind = prefetch, writeback, on_bind
        self.cuda = self.device.type == "cuda"
        self.layers: list[_Layer] = []
        self.n_slots = ring_slots(prefetch, writeback)
        self.lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="slimtune-stream")
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.stats = {"bytes_to_device": 0, "bytes_to_home": 0, "fetches": 0, "misses": 0, "wait_s": 0.0}
        self.bound_now = self.peak_bound = 0
        self.timeline: deque[tuple[str, float, float, str]] = deque(maxlen=TIMELINE_EVENTS)
        self.t0 = time.perf_counter()  # the timeline's zero
        self._backward_from: dict[int, float] = {}  # layer -> start of its recompute in the running backward
        self.store: NvmeStore | None = None
        self.cpu_homes: list[torch.Tensor] = []
        fix_mmap_threshold(STREAM_MMAP_THRESHOLD_BYTES)
        self._build_homes(model_blocks(model)[1:-1], nvme_dir, threads, stream_trainable, fill)
        release_free_memory()  # the weights that moved home were freed: let RSS show it
        self.slot_bytes = max((layer.nbytes for layer in self.layers), default=0)
        self._slots = [self._new_slot() for _ in range(self.n_slots)]
        self._staging = ([aligned_empty(self.slot_bytes, pin=True) for _ in range(self.n_slots)]
                         if self.cuda and home == "nvme" else None)
        self._slot_free: list[Future] = [_done() for _ in range(self.n_slots)]  # completes when reusable
        self._slot_event: list = [None] * self.n_slots  # CUDA: compute stream done with the slot
        self._free = list(range(self.n_slots))
        self._saved_ckpt: dict[nn.Module, bool] = {}
        self.trim_every = 0  # > 0: malloc_trim after every trim_every layers of a training pass (see after())
        self._originals: dict[nn.Module, Callable] = {}
        self.attach()

    # ------------------------------------------------------------------ homes and slots
    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    def _new_slot(self) -> torch.Tensor:
        if self.cuda:
            return torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
        return aligned_empty(self.slot_bytes)

    def _pack(self, layer: _Layer, out: torch.Tensor) -> None:
        for p, off in zip(layer.params, layer.offsets):
            view_as(out, off, p).copy_(p.data)

    def _build_homes(self, blocks: list[Block], nvme_dir: str | None, threads: int, stream_trainable: bool,
                     fill: Callable[[int], None] | None) -> None:
        """Copy every streamed tensor of each layer to its home, then point the parameter at a placeholder (frees the
        original). With ``fill``, each layer is materialized first, so one layer at a time exists outside its home;
        the parameters are read after the fill (4-bit loading replaces them with new ``Params4bit`` objects)."""
        if self.home == "nvme":  # the size of a filled layer is known only after its fill: the file grows
            capacity = None if fill else sum(
                flat_layout([p for _, p in b.params if stream_trainable or not p.requires_grad])[1] for b in blocks)
            self.store = NvmeStore(nvme_dir, capacity_bytes=capacity or None, direct=None, threads=threads)
        for i, block in enumerate(blocks):
            if fill is not None:
                fill(i)
            params = [p for _, p in block.module.named_parameters() if stream_trainable or not p.requires_grad]
            offsets, nbytes = flat_layout(params)
            layer = _Layer(i, block, params, offsets, nbytes)
            self.layers.append(layer)
            buf = aligned_empty(nbytes, pin=self.cuda and self.home == "cpu")
            if self.home == "nvme":
                buf.zero_()
            self._pack(layer, buf)
            if self.home == "cpu":
                self.cpu_homes.append(buf)
            else:
                self.store.write(layer.index, buf).result()
            for p in layer.params:
                p.data = self._placeholder(p.dtype)
            del buf
            if fill is not None:  # the fill's transients (bnb's 4-bit quantization: many small ones) leave now
                release_free_memory()

    def home_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def device_bytes(self) -> int:
        """Bytes of the ring on the compute device (allocated once)."""
        return self.n_slots * self.slot_bytes

    # ------------------------------------------------------------------ moving one layer
    def record_event(self, lane: str, start: float, label: str) -> None:
        """Add ``(lane, start, now, label)`` to the timeline (seconds since the streamer was built); lanes are fetch,
        compute, write and, from zeroth-order streaming, update."""
        self.timeline.append((lane, start - self.t0, time.perf_counter() - self.t0, label))

    def original_forward(self, module: nn.Module) -> Callable | None:
        """The ``forward`` instance attribute ``module`` had before :meth:`attach` wrapped it (None: the class's)."""
        return self._originals.get(module)

    def _backward_done(self, i: int | None = None) -> None:
        """Close the compute event of layer ``i``'s recompute + backward (``None``: every open one, e.g. a layer
        whose input needs no gradient, closed by the next layer's recompute or :meth:`release_all`)."""
        for j in [i] if i is not None else list(self._backward_from):
            start = self._backward_from.pop(j, None)
            if start is not None:
                self.record_event("compute", start, f"layer {j} (recompute + backward)")
        if i is not None and self.trim_every and i % self.trim_every == 0:
            release_free_memory()  # see after()

    def _start_fetch(self, layer: _Layer) -> None:
        slot = self._free.pop(0)
        layer.slot = slot
        free, home_ready = self._slot_free[slot], layer.home_ready
        dst = self._slots[slot][:layer.nbytes]
        self.bound_now += 1
        self.peak_bound = max(self.peak_bound, self.bound_now)
        self.stats["fetches"] += 1
        self.stats["bytes_to_device"] += layer.nbytes
        event_before = self._slot_event[slot]

        def run():
            free.result()
            home_ready.result()
            t = time.perf_counter()
            if self.cuda:
                src = self.cpu_homes[layer.index] if self.home == "cpu" else self._staging[slot][:layer.nbytes]
                if self.home == "nvme":
                    self.store.read(layer.index, src).result()
                with torch.cuda.stream(self._copy_stream):
                    if event_before is not None:
                        self._copy_stream.wait_event(event_before)
                    dst.copy_(src, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
                self.record_event("fetch", t, f"layer {layer.index}")
                return event
            if self.home == "cpu":
                host_copy(dst, self.cpu_homes[layer.index])
            else:
                self.store.read(layer.index, dst).result()
            self.record_event("fetch", t, f"layer {layer.index}")
            return None

        layer.fetch = self._pool.submit(run)

    def _bind(self, layer: _Layer) -> None:
        t = time.perf_counter()
        if not layer.fetch.done():
            self.stats["misses"] += 1
        event = layer.fetch.result()
        self.stats["wait_s"] += time.perf_counter() - t
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        buf = self._slots[layer.slot]
        for k, p in enumerate(layer.params):
            p.data = self._home_view(buf, layer, k)  # the same typed view into a ring slot as into a home
        layer.bound = True
        if self.on_bind is not None:
            self.on_bind(layer.index)

    def _release(self, layer: _Layer) -> None:
        """Unbind ``layer`` and give its slot back (after writing it home when it changed)."""
        if layer.slot is None:
            return
        slot = layer.slot
        if layer.fetch is not None and not layer.bound:
            layer.fetch.result()  # a prefetch nobody used: let it land before the slot is reused
        for p in layer.params:
            p.data = self._placeholder(p.dtype)
        write = self.writeback and layer.bound
        layer.bound, layer.slot, layer.fetch = False, None, None
        if self.cuda:
            self._slot_event[slot] = torch.cuda.current_stream(self.device).record_event()
        if write:
            layer.home_ready = self._slot_free[slot] = self._pool.submit(self._write_home, layer, slot)
            self.stats["bytes_to_home"] += layer.nbytes
        self._free.append(slot)
        self.bound_now -= 1

    def _write_home(self, layer: _Layer, slot: int) -> None:
        t = time.perf_counter()
        src = self._slots[slot][:layer.nbytes]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._slot_event[slot])  # pragma: no cover - GPU
            host = self.cpu_homes[layer.index] if self.home == "cpu" else self._staging[slot][:layer.nbytes]
            host.copy_(src)  # synchronous D2H on this I/O thread's stream
            src = host
        if self.home == "cpu":
            if not self.cuda:
                host_copy(self.cpu_homes[layer.index], src)
        else:
            self.store.write(layer.index, src).result()
        self.record_event("write", t, f"layer {layer.index}")

    # ------------------------------------------------------------------ the schedule
    def _window(self, i: int, backward: bool, recompute: bool) -> list[int]:
        n = len(self.layers)
        if backward:
            order = list(range(i - 1, -1, -1)) + list(range(n))
        elif recompute:
            order = list(range(i + 1, n)) + list(range(n - 1, -1, -1))
        else:
            order = list(range(i + 1, n)) + list(range(n))
        window: list[int] = []
        for j in order:
            if j != i and j not in window:
                window.append(j)
                if len(window) == self.prefetch:
                    break
        return window

    def acquire(self, i: int, recompute: bool = False) -> None:
        """Bind layer ``i`` (waiting for its prefetch, or fetching it now) and prefetch the window after it."""
        with self.lock:
            backward = in_backward()
            self._backward_done()  # a layer whose input needed no gradient: its backward ended before this
            window = self._window(i, backward, recompute)
            keep = {i, *window}
            for layer in self.layers:
                if layer.slot is not None and layer.index not in keep:
                    self._release(layer)
            layer = self.layers[i]
            if layer.slot is None:
                self._start_fetch(layer)
            for j in window:
                if self.layers[j].slot is None and self._free:
                    self._start_fetch(self.layers[j])
            if not layer.bound:
                self._bind(layer)

    def after(self, i: int, recompute: bool = False) -> None:
        """Layer ``i`` finished its forward: release it unless backward still needs it or it is next again."""
        with self.lock:
            if in_backward():
                return  # the recompute's saved tensors view this slot until the layer's backward is done
            if recompute and i == len(self.layers) - 1:
                return  # the last layer is recomputed right away in backward: keep it
            self._release(self.layers[i])
        if recompute and self.trim_every and (i + 1) % self.trim_every == 0:
            release_free_memory()

    # With ``trim_every`` set (the engine does, for streamed layers without offloaded updates), the heap's free pages
    # go back to the OS (``malloc_trim``) after every ``trim_every`` layers of a training forward and of its backward.
    # Below the 8 MiB mmap threshold a layer's activations come from the heap, and glibc carves each new request
    # from its free space further on instead of reusing the pages just freed: mallinfo2 over bench/peers.py's
    # streamed QLoRA forward showed live memory growing 3 MiB per layer and RSS 25-35 MiB per layer, up the heap's
    # 440 MiB of free space. Trimming every 4 layers, forward and backward (either alone does not lower the peak):
    # peak RSS 1117-1156 -> 987 MiB, step 2.2 -> 2.35 s; every 2 layers 961-969 MiB at +10%; every layer 933-940
    # MiB at +35% (each trim hands back pages the next layers fault in again).

    def release_all(self) -> None:
        """Unbind every layer, wait for write-backs and write partly rewritten homes (after backward, before
        eval/saving)."""
        with self.lock:
            self._backward_done()
            for layer in self.layers:
                self._release(layer)
            for f in self._slot_free:
                f.result()
            self.flush_home_writes()

    @contextlib.contextmanager
    def bound(self, i: int):
        """Bind layer ``i`` outside a forward pass (flushing deferred updates, checkpoints); released on exit."""
        self.acquire(i)
        try:
            yield self.layers[i]
        finally:
            self.after(i)

    @contextlib.contextmanager
    def shaped(self):
        """Unbound parameters show their real shape (a zero-stride view of one zero, no memory) inside the block, for
        code that reads shapes but not values: peft sizes LoRA from a GPT-2 ``Conv1D``'s ``weight.shape``. Outside
        it they point at empty placeholders again, so a stray use fails loudly."""
        with self.lock:
            self.release_all()
            for layer in self.layers:
                for p, (shape, dtype) in zip(layer.params, layer.shapes):
                    p.data = torch.zeros((), dtype=dtype, device=self.device).expand(shape)
            try:
                yield
            finally:
                for layer in self.layers:
                    for p in layer.params:
                        p.data = self._placeholder(p.dtype)

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        keep_training_layout(self.model)  # bnb's CPU eval repack would replace a bound layer's slot view
        keep_torch_forwards(self.model)  # transformers' kernelize on train()/eval() would replace forwards
        for layer in self.layers:
            module = layer.block.module
            if module in self._originals:
                continue
            self._originals[module] = module.__dict__.get("forward")
            self._saved_ckpt[module] = getattr(module, "gradient_checkpointing", None)
            if self._saved_ckpt[module] is not None:
                module.gradient_checkpointing = False  # we checkpoint ourselves, around the bind
            module.forward = self._wrap(layer.index, module.forward)

    def _wrap(self, i: int, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            recompute = torch.is_grad_enabled()
            self.acquire(i, recompute)
            t = time.perf_counter()
            try:
                with streamable_4bit():
                    return forward(*args, **kwargs)
            finally:  # also when checkpoint's early stop ends a recompute with an exception
                if in_backward():  # the lane shows recompute + backward: closed by _backward_done
                    self._backward_from[i] = t
                else:
                    self.record_event("compute", t, f"layer {i}")
                self.after(i, recompute)

        def streamed_forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return run(*args, **kwargs)
            # as HF's checkpointing: a KV cache would be updated twice (forward, recompute). Found by what the
            # call carries, not by name: the kwarg is `cache` in transformers 5, `past_key_values` in 4.x, and GPT-2
            # passes it positionally
            args = tuple(None if is_kv_cache(a) else a for a in args)
            kwargs = {k: None if is_kv_cache(v) else v for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:  # its gradient ends the layer's backward
                hidden.register_hook(lambda grad: self._backward_done(i))
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        return streamed_forward

    def detach(self) -> None:
        """Put every streamed tensor back on the device as an ordinary parameter and remove the hooks."""
        self.release_all()
        for layer in self.layers:
            module = layer.block.module
            original = self._originals.pop(module, None)
            if original is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = original
            if self._saved_ckpt.get(module) is not None:
                module.gradient_checkpointing = self._saved_ckpt[module]
            for p, value in self.layer_tensors(layer.index):
                p.data = value.to(self.device)
        self.close()

    def counters(self) -> dict[str, float]:
        """Cumulative bytes per link and NVMe counters, for metrics.jsonl."""
        out = dict(self.stats)
        if self.store is not None:
            out["nvme_read_bytes"], out["nvme_write_bytes"] = self.store.bytes_read, self.store.bytes_written
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
