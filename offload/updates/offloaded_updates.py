"""Full-parameter training with gradients, fp32 master weights and optimizer state offloaded to CPU or NVMe.

The offloaded sibling of per-layer mode (``finetune/per_layer.py``). Each gradient leaves the device as soon as
backward produces it (a ``register_post_accumulate_grad_hook``, the pattern of torchao's ``CPUOffloadOptimizer``,
``prototype/low_bit_optim/cpu_offload.py``) into its block's CPU fp32 buffer, and the device gradient is freed at
once. When a block has all its final gradients, its update runs on a worker thread while backward continues on the
blocks still to come (docs/offload-design.md rule 10: Fuyou / SuperOffload, instead of ZeRO-3's and torchao's step
after backward). The update is the optimizer's own per-tensor function (``PerTensorOptimizer.update_param``) on fp32
masters held off the device (ZeRO-Offload's fp32 master partition, arXiv 2101.06840), so every first-order optimizer
of the project works unchanged and the result equals the in-memory run. The updated master is cast to the device dtype
and copied into the model.

State tiers:

* ``cpu``: masters in one flat fp32 buffer per block; optimizer state in ``optimizer.state`` as the optimizer
  creates it. RAM: grads + masters + state.
* ``nvme``: each block's masters and tensor-valued state in one aligned region of a swap file
  (:mod:`.state_layout`, :mod:`.state_swapper`), read into a ring of ``threads + 2`` staging buffers, prefetched in
  the expected order and written back behind the update. Between updates no state tensor stays in RAM: a small
  :class:`~.state_layout.BlockLayout` (keys, shapes, dtypes, offsets, non-tensor values) is all that is kept.
  RAM: gradient buffers + the staging ring + the state a block's first update allocates before it is packed -- not
  masters + state of the whole model. Gradient buffers are held from a block's first gradient of the step to its
  update: every block with gradient accumulation or clipping, only the blocks in flight with ``overlap`` and one
  micro-batch (:class:`~.offloaded_blocks.GradPool`).

Global-norm clipping (docs/offload-design.md rule 12) needs every gradient first, so it runs with ``overlap=False``:
the updates wait for :meth:`step`, which computes the norm from the CPU buffers with torch's own ``get_total_norm``
and scales them as ``clip_grad_norm_`` does, then runs the block updates (still pipelined with NVMe I/O).

How the trainer uses this (one optimizer step, gradient accumulation over micro-batches ``0..last``)::

    engine = OffloadedUpdates(trainable_named_params, block_names,
                              lambda named: build_optimizer(name, named, lr=..., per_layer=True, **hparams),
                              state_tier="nvme", nvme_dir=recipe.offload.nvme_dir, overlap=max_grad_norm == 0)
    scheduler = get_scheduler(..., engine.optimizer, ...)    # LR schedules drive the optimizer over the masters
    for i, batch in enumerate(micro_batches):               # those with supervised tokens
        engine.final = i == last                             # like PerLayerUpdates.final
        (model(**batch).loss * n_i / n_total).backward()     # hooks: grads -> CPU buffers, device grads freed,
                                                             # (overlap) finished blocks update during backward
    grad_norm = engine.step(max_grad_norm)                   # waits for every update, clips first if asked,
                                                             # runs finish_step; returns the pre-clip norm or None
    scheduler.step()                                         # no optimizer.step()/zero_grad(): step() did both
    ...
    engine.save(checkpoint_dir / "optimizer")                # one safetensors file per block, atomic; NOT
                                                             # optimizer.state_dict(), empty on the NVMe tier
    engine.load(checkpoint_dir / "optimizer")                # on resume, after building the engine; also sets
                                                             # the device params from the masters
    engine.close()                                           # removes the hooks and the swap file

``step()`` (or ``wait()``) must return before the next forward: the device weights are final only then.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from slimtune.optimizers import PerTensorOptimizer, allocated_state_bytes

from ..store.memory import fix_mmap_threshold
from .grad_mover import GradMover
from .offloaded_blocks import GradPool, build_blocks, check_int, checked_optimizer, row_slice
from .offloaded_checkpoint import load_engine, save_engine
from .paged_state import PagedState
from .state_layout import aliases, master_views, pack_state, plan_layout, planned_block_bytes, signature_of, state_views
from .state_swapper import StateSwapper

TIERS = ("cpu", "nvme")
MASTER_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class OffloadedUpdates:
    """Gradient hooks + CPU/NVMe optimizer updates for the model's trainable ``named_params``, grouped in ``blocks``.

    Args:
        named_params: the model's trainable parameters (on the compute device, any float dtype), each once.
        blocks: parameter names per block, in model order (embedding, layers, head); every name exactly once.
            A block is the unit of gradient hand-off and clipping (one CPU buffer of whole-parameter gradients);
            without ``chunk_bytes`` also of update and NVMe I/O, and the NVMe tier stages ``threads + 2`` of the
            largest one in RAM: the trainer passes runs of at most the largest tensor
            (:func:`~.offloaded_blocks.staging_groups`, via ``finetune.offloading.offloaded_updates``), not layers.
        build_optimizer: called once with ``[(name, master)]`` (a row chunk's master carries its parameter's name, so
            name-based param groups, e.g. no decay on norms, come out the same); must return a first-order
            :class:`PerTensorOptimizer` over exactly those masters (e.g. ``build_optimizer("galore", named, ...,
            per_layer=True)``). Its param groups, LR and ``finish_step`` counters are the run's.
        state_tier: ``"cpu"`` or ``"nvme"`` (masters + state in a swap file in ``nvme_dir``).
        nvme_dir: directory for the swap file (``offload.nvme_dir``); required with ``"nvme"``, refused otherwise.
        master_dtype: dtype of the masters and of the CPU gradient buffers (float32 default; float64, bfloat16,
            float16 accepted).
        overlap: update blocks during backward as their gradients complete; False defers every update to
            :meth:`step` (required for global-norm clipping).
        threads: worker threads running block updates (the NVMe ring holds ``threads + 2`` staging buffers); a
            worker on a CPU device too: updates inline in backward measured slower (bench/offload.py, 9.3 vs 7.0 s).
        chunk_bytes: stage each block in units of at most this many bytes of masters
            (:func:`~.offloaded_blocks.staging_units`): runs of whole small tensors, and the ``chunk_names`` tensors
            larger than that as chunks of whole rows, each with its own masters and state, so the staging ring holds
            ``threads + 2`` chunks, not the largest tensor. None (default): every tensor whole.
        chunk_names: the parameters whose update is element-wise (``slimtune.optimizers.elementwise_params``), the
            only ones a row chunk may split; None: all.
        initial_values: ``f(params) -> values`` (CPU tensors, same shapes) the masters start from, called once per
            staging unit; default: the parameters' own data. A streamed load passes the values in the layers'
            homes (the parameters are shape-only stand-ins then), so masters are written unit by unit straight to
            the NVMe tier without the model ever existing whole.

    ``on_updated(block_index, [(name, master, rows)])``, when set, replaces copying updated masters into the device
    params (params streamed from a home), once per staging unit; ``rows``: None for the whole parameter, else the
    dim-0 ``slice`` ``master`` holds. The masters may view a staging buffer: copy before returning.

    Used by its two helper modules (:mod:`.offloaded_checkpoint`, :mod:`.paged_state`), and by nothing else:
    ``futures`` (updates in flight), ``order`` (the staging units' update order of the last step), ``state_held`` /
    ``block_state_bytes`` (RAM accounting), ``lock``, ``pack`` / ``publish`` (a block's state into its staging slot,
    its masters into the model), ``note_peak`` and ``begin_step``.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], blocks: list[list[str]],
                 build_optimizer: Callable[[list[tuple[str, torch.Tensor]]], PerTensorOptimizer],
                 state_tier: str = "cpu", nvme_dir: str | None = None, master_dtype: torch.dtype = torch.float32,
                 overlap: bool = True, threads: int = 1, max_pending: int = 2, chunk_bytes: int | None = None,
                 chunk_names: set[str] | None = None,
                 initial_values: Callable[[list[nn.Parameter]], list[torch.Tensor]] | None = None):
        if state_tier not in TIERS:
            raise ValueError(f"state_tier must be one of {TIERS}, got {state_tier!r}")
        if (state_tier == "nvme") != (nvme_dir is not None):
            raise ValueError("nvme_dir is required with state_tier='nvme' and only used there; got "
                             f"state_tier={state_tier!r}, nvme_dir={nvme_dir!r}")
        if master_dtype not in MASTER_DTYPES:
            raise ValueError(f"master_dtype must be one of {MASTER_DTYPES}, got {master_dtype}")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        check_int("threads (update worker threads)", threads, 1)
        check_int("max_pending (updates in flight before backward waits; 0 = unbounded)", max_pending, 0)
        if chunk_bytes is not None:
            check_int("chunk_bytes (bytes of masters per staging unit; None = whole tensors)", chunk_bytes, 1)
        self.tier, self.overlap, self.threads, self.master_dtype = state_tier, overlap, threads, master_dtype
        self.max_pending = max_pending
        self.final, self.on_updated = True, None
        named_params = list(named_params)
        fix_mmap_threshold()
        pin = torch.cuda.is_available() and any(p.is_cuda for _, p in named_params)
        self.initial_values = initial_values or (lambda params: [p.detach() for p in params])
        self.grad_blocks, self.blocks = build_blocks(named_params, blocks, master_dtype, self.initial_values,
                                                     keep_masters=state_tier == "cpu", pin=pin, chunk_bytes=chunk_bytes,
                                                     chunk_names=chunk_names)
        self.optimizer = checked_optimizer(build_optimizer([(n, m) for blk in self.blocks
                                                             for n, m in zip(blk.names, blk.masters)]), self.blocks)
        self._group = {id(m): g for g in self.optimizer.param_groups for m in g["params"]}
        self._where = {id(p): (g, j) for g, gb in enumerate(self.grad_blocks) for j, p in enumerate(gb.params)}
        self._master_at = {id(m): (b, i) for b, blk in enumerate(self.blocks) for i, m in enumerate(blk.masters)}
        self._events: list[tuple[str, float, float, str]] = []
        self.lock = threading.Lock()
        self._grad_pool = GradPool(pin)
        cuda = next((p.device for _, p in named_params if p.is_cuda), None)
        self.grad_mover = GradMover(cuda if cuda is not None else torch.device("cpu"))
        self._counts = {"grad_bytes_to_cpu": 0, "param_bytes_to_device": 0, "update_seconds": 0.0}
        self.state_held = [0] * len(self.blocks)  # cpu tier: allocated state bytes per block
        self.steps = 0
        self.last_step: dict = {}
        # units in backward order of their blocks until a step has been observed
        self.order = [u for gb in reversed(self.grad_blocks) for u in gb.units]
        self._submitted: list[int] = []
        self.futures: list[Future] = []
        self.swapper: StateSwapper | None = None
        self.layouts = []
        if state_tier == "nvme":
            self._init_nvme(nvme_dir, pin)
        else:
            self.state_held = [self.block_state_bytes(b) for b in range(len(self.blocks))]
        self._peak = self._held_bytes()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="slimtune-update")
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for gb in self.grad_blocks for p in gb.params]
        self.begin_step()

    # ---- construction ---------------------------------------------------------------------------------------------
    def _planned_state(self, b: int) -> list[int]:
        return [self.optimizer.state_bytes(m, self._group[id(m)]) for m in self.blocks[b].masters]

    def _init_nvme(self, nvme_dir, pin: bool) -> None:
        """Reserve every unit's region from state_bytes, then write each unit's masters (and any state the
        optimizer made at construction, e.g. SPAM's masks) through one staging buffer; nothing stays in RAM."""
        states = [[self.optimizer.state.pop(m, {}) for m in blk.masters] for blk in self.blocks]
        self.layouts = [plan_layout(blk.master_bytes, s) for blk, s in zip(self.blocks, states)]
        planned = [max(planned_block_bytes(blk.master_bytes, self._planned_state(b)), self.layouts[b].nbytes)
                   for b, blk in enumerate(self.blocks)]
        self.swapper = StateSwapper(nvme_dir, planned, [lay.nbytes for lay in self.layouts], self.threads + 2, pin,
                                    self._events, self.lock)
        for b, blk in enumerate(self.blocks):
            slot = self.swapper.acquire(b, read=False)
            views = master_views(slot.buf, blk.shapes, blk.offsets, self.master_dtype)
            for view, value, rows in zip(views, self.initial_values(blk.params), blk.rows):
                view.copy_(row_slice(value, rows))
            self._pack_and_release(b, slot, states[b])
        self.swapper.forget()  # written: nothing staged counts as a prefetch of the first step

    # ---- gradients leave the device -------------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        t0 = time.perf_counter()
        g, j = self._where[id(p)]
        gb, grad = self.grad_blocks[g], p.grad
        if gb.submitted:  # its update may be running on this very buffer
            raise RuntimeError(f"a gradient for {gb.names[j]!r} arrived after its block's update started; set "
                               "final=True only for the last backward of an optimizer step")
        if gb.grad_flat is None:
            single = self.overlap and self.final  # this step's only gradient for the block: no sum to widen
            if single:
                self._backpressure()
            with self.lock:
                self._grad_pool.take(gb, gb.param_dtype if single and gb.param_dtype else self.master_dtype)
                self.note_peak(0)  # CPU buffers are freed after their update: the peak is when one is taken
        moving = self.grad_mover.move(grad, gb.grads[j], fresh=not gb.got[j])  # CUDA: queued, not waited
        if moving is not None:
            gb.moving.append(moving)
        p.grad = None  # the device gradient is gone now (CUDA: once its copy ran): the next block's never meets it
        gb.got[j] = True
        with self.lock:
            self._counts["grad_bytes_to_cpu"] += grad.numel() * grad.element_size()
            self._events.append(("grad copy", t0, time.perf_counter(), gb.names[j]))
        if self.final:
            gb.final.add(j)
            if self.overlap and len(gb.final) == len(gb.params) and not gb.submitted:
                self._submit(g)

    def _backpressure(self) -> None:
        """Bound the gradient pool: a block about to take a buffer waits while ``max_pending`` updates are still
        queued or running (backward pauses for the CPU instead of RAM growing with how far updates trail). On a
        step whose updates refresh a projector (:meth:`_refresh_step`), it waits for every one: the refresh's SVD
        needs more scratch than a block of gradients, so the two do not coexist (measured on bench/scale.py's
        GaLore row: peak RSS 2.35 GB -> 2.01 GB, same step time, the SVD being CPU-bound anyway)."""
        limit = 1 if self._refresh_step() else self.max_pending
        while limit and len(pending := [f for f in self.futures if not f.done()]) >= limit:
            pending[0].result()

    def _refresh_step(self) -> bool:
        """Whether this step's updates refresh a projector with scratch memory: the optimizer's ``refreshes(step,
        group)`` for the update numbered ``self.steps`` (every parameter's update count, when each gets a gradient
        every step), in a group whose ``scratch_bytes`` is not 0 (an SVD; FRUGAL's coordinate subsets need none)."""
        opt = self.optimizer
        if not (hasattr(opt, "refreshes") and hasattr(opt, "scratch_bytes")):
            return False
        return any(g["params"] and opt.refreshes(self.steps, g) and opt.scratch_bytes(g["params"][0], g) > 0
                   for g in opt.param_groups)

    def _submit(self, g: int) -> None:
        """Queue block ``g``'s update: its staging units one after the other on a worker, then its buffer freed."""
        self.grad_blocks[g].submitted = True
        self._submitted.append(g)
        self.futures.append(self._pool.submit(self._update_block, g))
        if self.swapper is not None:
            self.swapper.prefetch()

    # ---- one block's update ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_block(self, g: int) -> None:
        """Update every staging unit of block ``g`` from its gradient buffer, then give the buffer back zeroed."""
        gb = self.grad_blocks[g]
        gb.landed()
        for u in gb.units:
            self._update_unit(u)
        t0 = time.perf_counter()
        gb.grad_flat.zero_()
        gb.got, gb.final = [False] * len(gb.params), set()
        with self.lock:
            self._grad_pool.give(gb)
            self._counts["update_seconds"] += time.perf_counter() - t0

    @torch.no_grad()
    def _update_unit(self, b: int) -> None:
        blk, opt = self.blocks[b], self.optimizer
        gb = self.grad_blocks[blk.grad_block]
        slot = None
        if self.swapper is not None:
            slot = self.swapper.acquire(b)
            self.swapper.prefetch()
            self._stage(b, slot)
        t0 = time.perf_counter()
        todo = [i for i, j in enumerate(blk.members) if gb.got[j]]
        for i in todo:
            m = blk.masters[i]
            # its rows of the whole parameter's gradient, widened per tensor when the buffer holds the params' dtype
            m.grad = row_slice(gb.grads[blk.members[i]], blk.rows[i]).to(m.dtype)
            opt.update_param(m, self._group[id(m)])
            m.grad = None
        if slot is None:
            self.publish(b, blk.master_views, todo)
            held = self.block_state_bytes(b)
            with self.lock:
                self.state_held[b] = held
                self.note_peak(0)
        else:
            states = [opt.state.get(m, {}) for m in blk.masters]
            with self.lock:  # new state (a first update, a refresh) is in RAM until packed
                self.note_peak(sum(v.nbytes for s in states for v in s.values()
                                    if isinstance(v, torch.Tensor) and not aliases(v, slot.buf)))
            views = self.pack(b, slot, states)
            self.publish(b, views, todo)
            self._unstage(b)
            self.swapper.release(slot, b, self.layouts[b].nbytes)
        t1 = time.perf_counter()  # the update's CPU time: optimizer math, packing, copies to the device
        with self.lock:
            self._counts["update_seconds"] += t1 - t0
            self._events.append(("update", t0, t1, f"block {b}"))

    def _stage(self, b: int, slot) -> None:
        """Point block ``b``'s masters and optimizer state at views into its staging buffer."""
        blk = self.blocks[b]
        views = master_views(slot.buf, blk.shapes, blk.offsets, self.master_dtype)
        for m, view, state in zip(blk.masters, views, state_views(slot.buf, self.layouts[b])):
            m.data = view
            self.optimizer.state[m] = state

    def _unstage(self, b: int) -> None:
        for m, parked in zip(self.blocks[b].masters, self.blocks[b].parked):
            self.optimizer.state.pop(m, None)
            m.data = parked

    def pack(self, b: int, slot, states: list[dict]) -> list[torch.Tensor]:
        """Lay ``states`` out after the masters in ``slot`` (moving what changed shape); returns the master views."""
        blk = self.blocks[b]
        layout = plan_layout(blk.master_bytes, states)
        if signature_of(states) != self.layouts[b].signature():  # entries move: copy the ones still in the buffer
            states = [{k: v.clone() if isinstance(v, torch.Tensor) and aliases(v, slot.buf) else v
                       for k, v in s.items()} for s in states]
            self.swapper.ensure_buffer(slot, layout.nbytes, keep=blk.master_bytes)
        pack_state(slot.buf, layout, states)
        self.layouts[b] = layout
        return master_views(slot.buf, blk.shapes, blk.offsets, self.master_dtype)

    def _pack_and_release(self, b: int, slot, states: list[dict]) -> None:
        self.pack(b, slot, states)
        self.swapper.release(slot, b, self.layouts[b].nbytes)

    def publish(self, b: int, masters: list[torch.Tensor], which: list[int]) -> None:
        """Unit ``b``'s updated masters -> their rows of the device params (cast to their dtype), or to
        ``on_updated`` (with the caller's block index and each master's rows)."""
        blk = self.blocks[b]
        if self.on_updated is not None:
            self.on_updated(blk.grad_block, [(blk.names[i], masters[i], blk.rows[i]) for i in which])
            return
        for i in which:
            row_slice(blk.params[i].data, blk.rows[i]).copy_(masters[i])
        with self.lock:
            self._counts["param_bytes_to_device"] += sum(masters[i].numel() * blk.params[i].element_size()
                                                         for i in which)

    # ---- the step -------------------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every submitted update has run and its NVMe write landed; re-raises a worker's error."""
        futures, self.futures = self.futures, []
        errors = [f.exception() for f in futures]
        if self.swapper is not None:
            self.swapper.drain()
        for error in errors:
            if error is not None:
                raise error

    @torch.no_grad()
    def step(self, max_grad_norm: float = 0.0) -> float | None:
        """Finish the optimizer step: (overlap=False) clip and run every update; wait; ``finish_step``.

        Returns the global gradient norm before clipping when ``max_grad_norm > 0``, else None.
        """
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {max_grad_norm}")
        if max_grad_norm > 0 and self.overlap:
            raise ValueError("global-norm clipping needs every gradient before any update: build OffloadedUpdates "
                             "with overlap=False, or pass max_grad_norm=0")
        norm = self._clip(max_grad_norm) if max_grad_norm > 0 else None
        # overlap=False: every block now; overlap=True: blocks whose params did not all get a final gradient.
        for g in self._block_order():
            if any(self.grad_blocks[g].got) and not self.grad_blocks[g].submitted:
                self._submit(g)
        self.wait()
        self._finish()
        self._end_step()
        return None if norm is None else float(norm)

    def _block_order(self) -> list[int]:
        """The blocks in the order their first staging unit appears in ``order`` (the expected update order)."""
        return list(dict.fromkeys(self.blocks[u].grad_block for u in self.order))

    def _clip(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` on the CPU buffers: same norm function, coefficient and order, over
        whole-parameter gradients (a block's buffer holds whole parameters even when its units are row chunks)."""
        for gb in self.grad_blocks:
            gb.landed()
        grads = [gb.grads[j] for gb in self.grad_blocks for j, got in enumerate(gb.got) if got]
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if grads:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        return total

    def _finish(self) -> None:
        """``optimizer.step()`` with no gradient left: runs ``finish_step`` once and tells LR schedulers a step
        happened. On NVMe, per-parameter state that ``finish_step`` touches (SPAM's mask re-draw) is paged in."""
        if self.swapper is None:
            self.optimizer.step()
            return
        real = self.optimizer.state
        self.optimizer.state = PagedState(self)
        try:
            self.optimizer.step()
        finally:
            paged, self.optimizer.state = self.optimizer.state, real
            paged.flush()
            self.swapper.drain()

    def _end_step(self) -> None:
        now = time.perf_counter()
        with self.lock:
            events = list(self._events)
            self.note_peak(0)
        counts = self.stats()
        self.last_step = {k: counts[k] - self._step_start_counts.get(k, 0) for k in counts}
        self.last_step["step_seconds"] = now - self._t0
        self.last_step["timeline"] = sorted((lane, s - self._t0, e - self._t0, label)
                                            for lane, s, e, label in events)
        if self._submitted:
            done = [u for g in self._submitted for u in self.grad_blocks[g].units]
            self.order = done + [u for u in self.order if u not in set(done)]
        for gb in self.grad_blocks:
            gb.submitted = False
        self.steps += 1
        self.begin_step()

    def begin_step(self) -> None:
        """Start the clock of the next step; on NVMe, prefetch its first blocks while the forward runs."""
        with self.lock:
            self._events.clear()  # the next step's timeline starts here (its prefetches included)
        self._t0, self._submitted = time.perf_counter(), []
        self._step_start_counts = self.stats()
        if self.swapper is not None:
            self.swapper.begin_step(self.steps, self.order)
            self.swapper.prefetch()

    # ---- accounting -----------------------------------------------------------------------------------------------
    def block_state_bytes(self, b: int) -> int:
        return sum(allocated_state_bytes(self.optimizer, m) for m in self.blocks[b].masters)

    def _held_bytes(self) -> int:
        grads = self._grad_pool.nbytes
        if self.swapper is None:
            return grads + sum(blk.master_flat.nbytes for blk in self.blocks) + sum(self.state_held)
        return grads + self.swapper.staging_bytes

    def note_peak(self, transient: int) -> None:  # caller holds self.lock
        self._peak = max(self._peak, self._held_bytes() + transient)

    def resident_bytes(self) -> dict[str, int]:
        """What this engine holds now, per tier: RAM (grads, staging / masters + state) and NVMe (region data)."""
        nvme = 0 if self.swapper is None else sum(self.swapper.valid_bytes)
        return {"cpu": self._held_bytes(), "nvme": nvme}

    def peak_resident_bytes(self) -> dict[str, int]:
        """Peak of ``resident_bytes()['cpu']`` including state a block's update allocates before it is packed."""
        nvme = 0 if self.swapper is None else self.swapper.store.reserved_bytes
        return {"cpu": self._peak, "nvme": nvme}

    def predicted_resident_bytes(self) -> dict[str, int]:
        """The RAM and NVMe bytes this engine should peak at, from ``state_bytes`` (what the planner predicts).

        Gradient buffers are counted for every block: what accumulation or clipping needs (see GradPool).
        """
        masters = sum(blk.master_bytes for blk in self.blocks)
        grads = masters  # same dtype and element count (whole parameters per block, the units' rows in all)
        planned = [self._planned_state(b) for b in range(len(self.blocks))]
        if self.swapper is None:
            return {"cpu": grads + masters + sum(map(sum, planned)), "nvme": 0}
        regions = [planned_block_bytes(blk.master_bytes, planned[b]) for b, blk in enumerate(self.blocks)]
        staging = (self.threads + 2) * self.swapper.io_bytes(max(regions))
        return {"cpu": grads + staging + self.threads * max(map(sum, planned)),
                "nvme": sum(map(self.swapper.io_bytes, regions))}

    def stats(self) -> dict[str, float]:
        """Cumulative counters for metrics.jsonl; ``last_step`` holds the same per step plus a timeline of
        (lane, start s, end s, label) events, lanes "update", "nvme read", "nvme write", "grad copy"."""
        with self.lock:
            out = dict(self._counts)
        store = None if self.swapper is None else self.swapper.store
        out["nvme_bytes_read"] = 0 if store is None else store.bytes_read
        out["nvme_bytes_written"] = 0 if store is None else store.bytes_written
        out["nvme_io_seconds"] = 0.0 if store is None else store.io_seconds
        return out

    # ---- checkpoints and lifetime ---------------------------------------------------------------------------------
    def save(self, directory) -> None:
        """Masters + optimizer state, one safetensors file per block, written atomically (see offloaded_checkpoint)."""
        save_engine(self, directory)

    def load(self, directory) -> None:
        """Restore what :meth:`save` wrote into this engine's tier, block by block, and the device params."""
        load_engine(self, directory)

    def close(self) -> None:
        """Remove the hooks, stop the workers, remove the swap file. Idempotent."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.grad_mover.close()
        self._pool.shutdown(wait=True)
        if self.swapper is not None:
            self.swapper.close()

    def __enter__(self) -> OffloadedUpdates:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

