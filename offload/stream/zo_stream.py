"""Zeroth-order block streaming: one MeZO step that visits each block once (ZO2's idea, done exactly).

ZO2 (arXiv 2503.12668; code liangyuwang/zo2) observes that MeZO needs each block's
weights only for forwards, so a streamed block can run *both* perturbed forwards back to back while it is resident
and be updated the next time it is resident: every block then crosses the link once per step. This module does
that on any Hugging Face decoder model (bare or peft), CPU or CUDA, with or without a
:class:`~slimtune.offload.stream.streamer.BlockStreamer`, and reproduces in-memory ``MeZO(noise="per_tensor")`` bit for
bit (``tests/test_zo_stream.py``). How:

* **One forward of the batch repeated 2n times** (n = ``n_samples``). Every module that owns parameters is wrapped
  (each decoder layer as a whole; outside the layers each module owning parameters directly: embedding, final
  norm, LM head). A wrapper splits every tensor argument whose dim 0 is the repeated batch into 2n chunks (1-D
  tensors such as ``cache_position`` are per position and pass through) and runs chunk k with its trainable
  parameters at θ + εz_{k//2} (k even) or θ − εz_{k//2} (k odd): perturb +ε, chunk, perturb −2ε, chunk, perturb +ε,
  per sample: the in-place ops of ``MeZO.step`` in the same order per tensor, so every tensor takes the same values.
  Frozen modules run chunk by chunk too, so every matmul sees the in-memory batch shape (BLAS results may depend on
  it). Loss of chunk k: the model's own ``loss_function`` on that chunk of the logits (the forward gets no labels),
  i.e. the in-memory closure's ``out.loss``, taken as a Python float like the trainer's closure.
* **Per-tensor noise.** z of tensor j is regenerated from ``tensor_seed(seed, j)`` alone (``noise="per_tensor"``,
  optimizers/zeroth_order.py), so blocks can be perturbed and updated in any order. A block draws each sample's z
  once and keeps it for its three perturbations (in-memory MeZO draws it three times, to hold no copy of the
  model): the same values, one block-sized buffer, and half the Gaussian draws per step (2 instead of 4 per value;
  on a CPU the draws are most of a MeZO step, since the generator is sequential).
* **Deferred update (ZO2).** Step t's update (its seeds, projected gradients and each group's lr / weight decay *at
  step t*) is applied to a tensor the next time its block runs, before it is perturbed, or on :meth:`flush`. A
  streamed layer gets it on bind (the streamer's ``on_bind``), so a plain forward (eval, generate) through a layer
  or any wrapped module also sees updated weights. ZO2 never flushes: its evaluation and saving miss the last update.
* **Tied weights.** A parameter owned by two wrapped modules (tied embedding / LM head) is perturbed in the first
  one to run after a copy of its value is kept; the second restores the copy and replays the same ops, so both uses
  of a branch see the same bits θ ± εz (as in memory) and the update is applied once. ZO2 perturbs and updates it
  twice with different z. Transient cost: one copy of each tied tensor during the step.
* **Optimizer state** advances exactly as ``MeZO.step`` would (``draw_seeds`` / ``record_step``), so a checkpoint of
  the optimizer plus the flushed weights resumes the exact trajectory.

Gradient accumulation: :meth:`ZOStream.step` takes the step's micro-batches (the official code and ZO2 refuse
accumulation; the trainer's in-memory MeZO uses all of them, and so does this). Not supported (clear errors):
``noise="sequential"``, a module that owns parameters and contains another that does
(outside the decoder layers), a trainable module that runs twice in one forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimtune.optimizers.zeroth_order import MeZO, noise_like, noise_source, perturb_, projected_gradient, zo_update_

from ..blocks import decoder_layers, keep_torch_forwards
from .streamer import BlockStreamer


@dataclass
class _Unit:
    """A wrapped module: its trainable parameters as (protocol index, param), and its streamed layer index."""

    name: str
    module: nn.Module
    params: list[tuple[int, nn.Parameter]]
    layer: int | None = None  # index in streamer.layers when the streamer binds this module
    inner: Callable | None = None  # the forward that computes (the streamer's wrapper bypassed)
    previous: Callable | None = field(default=None, repr=False)  # module.__dict__["forward"] before us


def _split(value, total: int, n: int, found: list):
    """``value`` as n chunks (list), splitting tensors with ndim >= 2 and dim 0 == total (recursing into
    tuples/lists/dicts); anything else is repeated as is. Chunks are copied so each is a fresh allocation, as the
    in-memory batch is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == total:
        found.append(True)
        return [c.clone() for c in value.split(total // n)]
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        parts = [_split(v, total, n, found) for v in value]
        return [type(value)(p[k] for p in parts) for k in range(n)]
    if isinstance(value, dict):
        parts = {key: _split(v, total, n, found) for key, v in value.items()}
        return [type(value)((key, p[k]) for key, p in parts.items()) for k in range(n)]
    return [value] * n


def _expand(out, size: int, name: str) -> torch.Tensor:
    """A batch-free module output (dim 0 of size 1, broadcast against the batch downstream) as ``size`` rows."""
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == 1:
        return out.expand(size, *out.shape[1:])
    raise RuntimeError(f"ZO streaming: {name} got no input with the stepped batch size in dim 0 and its output is "
                       "not broadcast over the batch, so its 2n perturbed forwards cannot be told apart")


def _concat(outs: list):
    """Inverse of the split for outputs: tensors concatenated along dim 0, tuples/lists element by element."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(_concat(list(items)) for items in zip(*outs))
    if isinstance(first, (int, float, bool, str)) and all(o == first for o in outs):
        return first
    raise TypeError(f"ZO streaming cannot concatenate a module output of type {type(first).__name__}")


class ZOStream:
    """Streams MeZO steps over ``model``: ``step(batch) -> loss``, ``flush()`` before eval/saving, ``detach()``.

    ``optimizer``: a :class:`MeZO` built with ``noise="per_tensor"`` over (some of) ``model``'s parameters.
    ``streamer``: the :class:`BlockStreamer` already attached to ``model`` (decoder layers streamed), or None when
    everything is resident. Streaming trainable weights needs ``BlockStreamer(..., stream_trainable=True,
    writeback=True)``; LoRA on a streamed frozen base needs neither.
    """

    def __init__(self, model: nn.Module, optimizer: MeZO, streamer: BlockStreamer | None = None):
        if not isinstance(optimizer, MeZO):
            raise ValueError(f"ZOStream needs a slimtune MeZO optimizer, got {type(optimizer).__name__}")
        if optimizer.noise != "per_tensor":
            raise ValueError("ZO streaming regenerates each tensor's noise on its own: build MeZO with "
                             "noise='per_tensor' (recipe: optimizer.noise: per_tensor), got "
                             f"noise={optimizer.noise!r}")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if streamer is not None and streamer.model not in (model, base):
            raise ValueError("streamer was attached to another model than the one given to ZOStream")
        self.model, self.optimizer, self.streamer = model, optimizer, streamer
        self._lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._params = [(p, gi) for gi, g in enumerate(optimizer.param_groups) for p in g["params"]]
        self._group_of = [gi for _, gi in self._params]
        keep_torch_forwards(model)  # else train()/eval() re-kernelizes and drops the wrappers of _attach
        self.units = self._find_units()
        self._pending: tuple | None = None  # (seeds, projected grads, [(lr, wd) per group]) of the last step
        self._stale: set[int] = set()  # protocol indices whose pending update is not applied yet
        self._active: tuple | None = None  # (seeds, eps, n_chunks, total) while a step's forward runs
        self._visited: set[int] = set()
        self._saved: dict[int, torch.Tensor] = {}
        self._previous_on_bind = None
        self._attach()

    # ------------------------------------------------------------------ setup
    def _find_units(self) -> list[_Unit]:
        index = {id(p): j for j, (p, _) in enumerate(self._params)}
        prefix, layers = decoder_layers(self.model)
        streamed = {}
        if self.streamer is not None:
            streamed = {id(layer.block.module): layer for layer in self.streamer.layers}
        units: list[_Unit] = []
        for i, layer in enumerate(layers):
            params = [(index[id(p)], p) for p in layer.parameters() if id(p) in index]
            s = streamed.get(id(layer))
            if s is not None and not self.streamer.writeback and any(p.requires_grad for p in s.params):
                raise ValueError(f"layer {i} streams trainable weights without write-back: their zeroth-order updates "
                                 "would be lost; use BlockStreamer(..., stream_trainable=True, writeback=True)")
            units.append(_Unit(f"{prefix}.{i}", layer, params, s.index if s is not None else None))
        owners = []
        for name, module in self.model.named_modules():
            if name == prefix or name.startswith(prefix + ".") or all(p is None for p in module._parameters.values()):
                continue
            owners.append((name, module))
            params = {id(p): p for p in module._parameters.values() if p is not None and id(p) in index}
            units.append(_Unit(name, module, [(index[k], p) for k, p in params.items()]))
        for name, module in owners:  # nested owners would split an already split chunk
            for other, inner in owners:
                if inner is not module and (name == "" or other.startswith(name + ".")):
                    raise ValueError(f"ZO streaming: {name} owns parameters and contains {other}, which does too; "
                                     "only leaf modules may own parameters outside the decoder layers")
        count: dict[int, int] = {}
        for unit in units:
            for j, _ in unit.params:
                count[j] = count.get(j, 0) + 1
        missing = [j for j in range(len(self._params)) if j not in count]
        if missing:
            names = {id(p): n for n, p in self.model.named_parameters()}
            raise ValueError("ZO streaming: optimizer parameters outside the model's modules: "
                             + ", ".join(names.get(id(self._params[j][0]), f"#{j}") for j in missing))
        self._shared = {j for j, c in count.items() if c > 1}
        for unit in units:
            if unit.layer is not None and any(j in self._shared for j, _ in unit.params):
                raise ValueError(f"ZO streaming: {unit.name} streams a weight shared with another module")
        return units

    def _attach(self) -> None:
        for unit in self.units:
            module = unit.module
            unit.previous = module.__dict__.get("forward")
            if getattr(unit.previous, "_zo_stream", False):
                raise ValueError(f"{unit.name} is already wrapped by another ZOStream; detach() it first")
            if unit.layer is not None:  # the streamer's wrapper binds per call; we bind once per step ourselves
                original = self.streamer.original_forward(module)
                unit.inner = original if original is not None else type(module).forward.__get__(module)
            else:
                unit.inner = module.forward
            module.forward = self._wrap(unit)
        if self.streamer is not None:
            self._previous_on_bind = self.streamer.on_bind
            self.streamer.on_bind = self._on_bind

    def detach(self) -> None:
        """Apply pending updates and remove the wrappers (the streamer stays attached; detach it after)."""
        self.flush()
        for unit in self.units:
            if unit.previous is None:
                unit.module.__dict__.pop("forward", None)
            else:
                unit.module.forward = unit.previous
        if self.streamer is not None:
            self.streamer.on_bind = self._previous_on_bind

    # ------------------------------------------------------------------ deferred updates
    def _needs_bind(self, unit: _Unit) -> bool:
        return unit.layer is not None and any(p.requires_grad for p in self.streamer.layers[unit.layer].params)

    @torch.no_grad()
    def _apply(self, unit: _Unit) -> None:
        """Eq. (3)/(4) of step t on this unit's stale tensors, per tensor in MeZO.step's order (samples in order,
        weight decay with the first), with that step's lr and weight decay."""
        if not self._stale:
            return
        seeds, grads, hparams = self._pending
        n = len(seeds)
        for j, p in unit.params:
            if j not in self._stale:
                continue
            lr, wd = hparams[self._group_of[j]]
            for k, (seed, g) in enumerate(zip(seeds, grads)):
                z = noise_like(p, noise_source("per_tensor", seed)(j, p))
                zo_update_(p, z, g / n, lr, wd if k == 0 else 0.0)
            self._stale.discard(j)

    def _on_bind(self, i: int) -> None:
        t = time.perf_counter()
        for unit in self.units:
            if unit.layer == i and any(j in self._stale for j, _ in unit.params):
                self._apply(unit)
                self.streamer.record_event("update", t, f"layer {i} (deferred)")  # the streamer's timeline lane
        if self._previous_on_bind is not None:
            self._previous_on_bind(i)

    def flush(self) -> None:
        """Apply every pending update (binding streamed layers), so evaluation, saving and export see the weights
        of the last step. Write-backs are complete when it returns."""
        bound = False
        for unit in self.units:
            if not any(j in self._stale for j, _ in unit.params):
                continue
            if self._needs_bind(unit):
                with self.streamer.bound(unit.layer):
                    self._apply(unit)
                bound = True
            else:
                self._apply(unit)
        if bound:
            self.streamer.release_all()

    @property
    def pending(self) -> bool:
        """True while some update has not reached its weights (call :meth:`flush` before reading them)."""
        return bool(self._stale)

    # ------------------------------------------------------------------ the wrapped forward
    def _wrap(self, unit: _Unit) -> Callable:
        def forward(*args, **kwargs):
            if self._active is None:  # eval / generate: updated weights, no splitting
                if unit.layer is not None:
                    return unit.previous(*args, **kwargs)  # the streamer binds; on_bind applies the update
                self._apply(unit)
                return unit.inner(*args, **kwargs)
            if unit.layer is not None:
                with self.streamer.bound(unit.layer):
                    return self._visit(unit, args, kwargs)
            return self._visit(unit, args, kwargs)

        forward.__wrapped__, forward._zo_stream = unit.inner, True
        return forward

    @torch.no_grad()
    def _visit(self, unit: _Unit, args: tuple | None, kwargs: dict | None):
        """Run ``unit`` on the 2n chunks with its perturbed weights (args None: only the perturbations)."""
        seeds, eps, n_chunks, total = self._active
        self._apply(unit)  # step t-1's update first: the block is resident now
        if unit.params:
            if id(unit) in self._visited:
                raise RuntimeError(f"ZO streaming: {unit.name} ran twice in one forward; each module owning "
                                   "trainable parameters must run once per step")
            self._visited.add(id(unit))
        for j, p in unit.params:
            if j in self._shared:  # tied: the second use replays the first from the same starting value
                if j in self._saved:
                    p.copy_(self._saved[j])
                else:
                    self._saved[j] = p.detach().clone()
        found: list = []
        broadcast = None  # rows to expand a batch-free output to
        if args is not None:
            split_args = _split(list(args), total, n_chunks, found)
            split_kwargs = _split(dict(kwargs), total, n_chunks, found)
            if not found:
                if not unit.params:
                    return unit.inner(*args, **kwargs)  # frozen, batch-free: nothing to split
                # batch-free input (GPT-2's position embedding gets position_ids of shape (1, seq)): each chunk runs
                # on the same input and its output, broadcast over the batch in memory, is expanded to the chunk
                split_args, split_kwargs = [list(args)] * n_chunks, [dict(kwargs)] * n_chunks
                broadcast = total // n_chunks
        t, outs = time.perf_counter(), []
        for sample in range(n_chunks // 2):
            source = noise_source("per_tensor", seeds[sample])
            zs = [noise_like(p, source(j, p)) for j, p in unit.params]  # MeZO.step's z, drawn once here
            for k, scale in ((2 * sample, eps), (2 * sample + 1, -2.0 * eps)):  # θ + εz, then θ − εz
                for (_, p), z in zip(unit.params, zs):
                    perturb_(p, z, scale)
                if args is not None:
                    out = unit.inner(*split_args[k], **split_kwargs[k])
                    outs.append(out if broadcast is None else _expand(out, broadcast, unit.name))
            for (_, p), z in zip(unit.params, zs):  # restore (+ε), as MeZO.step, before the next sample
                perturb_(p, z, eps)
            del zs
        if unit.layer is not None:
            self.streamer.record_event("compute", t, f"layer {unit.layer} (zo x{n_chunks})")
        return _concat(outs) if outs else None

    # ------------------------------------------------------------------ one step
    def _device(self) -> torch.device:
        if self.streamer is not None:
            return self.streamer.device
        return next(iter(self.model.parameters())).device

    @torch.no_grad()
    def step(self, batches) -> float:
        """One MeZO step on ``batches``: a dict with ``labels``, or the step's list of micro-batches (gradient
        accumulation: the SPSA batch is all of them, as in memory). Returns L(θ + εz) of the last sample, as
        ``MeZO.step`` does. Runs the model in eval mode (deterministic forwards, like the official ``zo_forward``)
        and restores its mode.

        The loss of a perturbation is the token-weighted mean over the micro-batches, summed as the trainer's
        in-memory closure sums it (``float(loss_i) * n_i / n``, micro-batches without supervised tokens skipped).
        Each micro-batch is one forward, so a streamed block is fetched once per micro-batch that reaches it (the
        in-memory closure runs the same forwards); micro-batch i > 1 sees the block's weights after i - 1
        perturbation round trips (+ε, -2ε, +ε), which equal θ up to float rounding, as in memory after one step."""
        batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
        if not batches or any("labels" not in b for b in batches):
            raise ValueError("ZOStream.step needs batches with 'labels' (the loss is computed per perturbed chunk)")
        opt, device = self.optimizer, self._device()
        n_chunks = 2 * opt.n_samples
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        total = sum(counts)
        seeds = opt.draw_seeds()
        losses = [0.0] * n_chunks  # nothing supervised: the trainer's closure returns 0 without a forward
        reached: set[int] = set()
        was_training = self.model.training
        self.model.eval()
        try:
            for batch, n in zip(batches, counts):
                if n == 0:
                    continue
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                labels = batch["labels"]
                size = labels.shape[0]
                self._active = (seeds, opt.eps, n_chunks, size * n_chunks)
                self._visited, self._saved = set(), {}
                inputs = {k: torch.cat([v] * n_chunks) if isinstance(v, torch.Tensor) and v.dim() >= 1
                          and v.shape[0] == size else v for k, v in batch.items() if k != "labels"}
                logits = self.model(**inputs, use_cache=False).logits
                for k, chunk in enumerate(logits.split(size)):
                    losses[k] += float(self._lm.loss_function(logits=chunk, labels=labels,
                                                              vocab_size=self._lm.config.vocab_size)) * n / total
                reached |= self._visited
                del logits
            self._active = (seeds, opt.eps, n_chunks, 0)
            for unit in self.units:  # modules no forward reached still take MeZO.step's perturbations
                if unit.params and id(unit) not in reached:
                    if self._needs_bind(unit):
                        with self.streamer.bound(unit.layer):
                            self._visit(unit, None, None)
                    else:
                        self._visit(unit, None, None)
        finally:
            self._active, self._saved = None, {}
            self.model.train(was_training)
        if self._stale:  # every trainable tensor belongs to a unit and every unit ran or was swept
            raise RuntimeError(f"ZO streaming: {len(self._stale)} tensors missed the previous step's update")
        grads = [projected_gradient(losses[2 * k], losses[2 * k + 1], opt.eps) for k in range(opt.n_samples)]
        self._pending = (seeds, grads, [(g["lr"], g["weight_decay"]) for g in opt.param_groups])
        self._stale = set(range(len(self._params)))
        opt.record_step(seeds, grads)
        return losses[-2]
