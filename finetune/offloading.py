"""The offload engine behind the loop's engine interface (:mod:`.engine`), built from the recipe's plan.

The plan (``slimtune.offload.plan``) decides where each kind of tensor lives; this module turns its decisions into
engine objects and keeps the loop free of placement logic:

* decoder-layer weights on ``cpu``/``nvme`` -> a :class:`~slimtune.offload.stream.streamer.BlockStreamer`
  (frozen weights for LoRA/QLoRA/MixLoRA bases; every weight for full fine-tuning and full-parameter zeroth-order),
* full fine-tuning with optimizer state on ``cpu``/``nvme`` -> :class:`~slimtune.offload.updates.offloaded_updates.
  OffloadedUpdates` (gradients leave the device per parameter, updates run on the CPU, overlapped with backward),
* MeZO with streamed weights -> :class:`~slimtune.offload.stream.zo_stream.ZOStream` (each block once per step).

Everything else (LoRA weights, their optimizer state) stays on the device, so a plan with nothing offloaded builds
no offload engine at all and the loop runs the in-memory one (:class:`~.engine.InMemoryEngine`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch

from slimtune.offload.store.memory import release_free_memory

from .adapters import load_trainable_state_dict, trainable_state_dict
from .checkpoint import save_checkpoint
from .engine import InMemoryEngine
from .model import base_config
from .recipe import Recipe

TRIM_EVERY_LAYERS = 4  # streamed layers alone: malloc_trim every 4 layers of a pass (measured: BlockStreamer.after)
STREAMED_DIR = "streamed"  # in a checkpoint: the trainable weights that live in streamed homes, as shards


class OffloadEngine(InMemoryEngine):
    """The offload pieces of one run (``streamer``, ``updates``, ``zo``: each may be None) behind the engine
    interface, and the per-tier accounting the metrics read. What the offload engine does not take over (the LoRA
    optimizer of a streamed base, ...) runs as in memory."""

    def __init__(self, model: torch.nn.Module, device: torch.device, plan: Any = None):
        super().__init__(model, device)
        self.plan = plan
        self.streamer = self.updates = self.zo = None
        self.update_blocks: list[int] = []  # the offloaded optimizer's update unit -> model block index
        self._last: dict[str, float] = {}
        self._named: dict | None = None  # the model's parameters by name (on_updated runs once per update unit)

    def on_updated(self, b: int, named: list[tuple[str, torch.Tensor, slice | None]]) -> None:
        """OffloadedUpdates -> new weights: streamed layers get them in their home, resident blocks in place.
        ``(name, value, rows)``: ``rows`` None for a whole parameter, else the dim-0 rows ``value`` holds (a staging
        chunk): only those rows are written."""
        block = self.update_blocks[b]
        layer = block - 1
        if self._named is None:
            self._named = dict(self.model.named_parameters())
        params = self._named
        if self.streamer is not None and 0 <= layer < len(self.streamer.layers):
            position = {id(p): k for k, p in enumerate(self.streamer.layers[layer].params)}
            self.streamer.write_home(layer, {position[id(params[n])]: v for n, v, _ in named},
                                     rows={position[id(params[n])]: r for n, _, r in named if r is not None})
            return
        with torch.no_grad():
            for name, value, rows in named:
                (params[name].data if rows is None else params[name].data[rows]).copy_(value)

    # ------------------------------------------------------------------ the engine interface
    def begin_micro_batch(self, final: bool) -> None:
        super().begin_micro_batch(final)
        if self.updates is not None:
            self.updates.final = final  # the last backward of the step sends each block's update off
        self._trim_heap()

    def before_backward(self) -> None:
        self._trim_heap()

    def _trim_heap(self) -> None:
        """Where the streamer trims the heap within a pass (``trim_every``: streamed layers without offloaded
        updates, CPU compute), also give its free pages back between forward and backward and between micro-batches
        (``malloc_trim``): the streamer lets activations up to 8 MiB come from the heap (fast: no fresh mapping per
        tensor, see ``fix_mmap_threshold``), and each phase leaves hundreds of MiB free there that the next phase's
        differently sized tensors do not reuse (mallinfo2 at the peak of bench/peers.py's streamed QLoRA step: 444
        of 687 MiB of the heap free). Measured there: peak RSS 1105-1121 -> 1067 MiB, same step time (2.2 s). Not
        with the offloaded optimizer: its 1 MiB threshold keeps such transients out of the heap; not on a GPU: the
        activations are not in the host heap."""
        if self.streamer is not None and self.streamer.trim_every:
            release_free_memory()

    def step(self, max_grad_norm: float) -> float | None:
        """After the step's last backward: wait for (or run) every offloaded update; with streamed weights, drop
        every bound/prefetched layer so the next forward fetches the updated homes. Returns the pre-clip norm."""
        if self.updates is None:
            return super().step(max_grad_norm)
        norm = self.updates.step(max_grad_norm)
        if self.streamer is not None:
            self.streamer.release_all()
        return norm

    def zeroth_order_step(self, group: list[dict[str, torch.Tensor]], closure) -> float:
        if self.zo is None:
            return super().zeroth_order_step(group, closure)
        return self.zo.step([{k: v.to(self.device) for k, v in b.items()} for b in group])  # a fetch per micro-batch

    def save(self, run_dir: Path, state, scheduler, recipe: dict, limit: int | None) -> Path:
        if self.updates is not None:  # masters + state live in the engine: written by it, block by block
            return save_checkpoint(run_dir, state, {}, {}, scheduler, recipe, limit,
                                   extra=lambda tmp: self.updates.save(tmp / "offload"))
        self.sync()  # deferred zeroth-order updates land first
        streamed = self._streamed_trainable()
        if not streamed:
            return save_checkpoint(run_dir, state, trainable_state_dict(self.model), self.optimizer.state_dict(),
                                   scheduler, recipe, limit)
        # trainable weights in the homes (zeroth-order): written shard by shard, never all at once
        resident = {n: p.detach().clone() for n, p in self.model.named_parameters()
                    if p.requires_grad and p.numel() and n not in streamed}
        return save_checkpoint(run_dir, state, resident, self.optimizer.state_dict(), scheduler, recipe, limit,
                               extra=lambda tmp: self._write_streamed(tmp / STREAMED_DIR, streamed))

    def restore(self, path: Path, checkpoint) -> None:
        if self.updates is not None:
            self.updates.load(path / "offload")  # masters, state, and the model's weights from them
            if self.streamer is not None:
                self.streamer.release_all()
            return
        if (path / STREAMED_DIR).is_dir():
            self._read_streamed(path / STREAMED_DIR)
            self._load_resident(checkpoint.trainable)
        else:
            load_trainable_state_dict(self.model, checkpoint.trainable)
        self.optimizer.load_state_dict(checkpoint.optimizer)

    def _load_resident(self, sd: dict[str, torch.Tensor]) -> None:
        """The trainable weights that do not stream, strictly by name (a checkpoint of another setup is refused)."""
        from .errors import CheckpointError

        streamed = self._streamed_trainable()
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in streamed}
        if set(params) != set(sd):
            odd = sorted(set(params) ^ set(sd))
            raise CheckpointError(f"the checkpoint's trainable weights do not fit this model: {len(odd)} name(s) "
                                  f"differ ({', '.join(odd[:5])})")
        with torch.no_grad():
            for name, value in sd.items():
                params[name].copy_(value)

    def _streamed_trainable(self) -> dict[str, tuple[int, int]]:
        """Trainable parameters that live in a streamed layer's home: name -> (layer, position in the layer)."""
        if self.streamer is None:
            return {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: (i, k) for i, layer in enumerate(self.streamer.layers)
                for k, p in enumerate(layer.params) if p.requires_grad}

    def _write_streamed(self, directory: Path, streamed: dict[str, tuple[int, int]]) -> None:
        """The streamed trainable weights as safetensors shards of about two layers, read home by home."""
        from slimtune.offload.plan_phases import shard_bytes
        from slimtune.offload.stream.shards import write_shards

        directory.mkdir()
        layers, reader = self.streamer.layers, self.streamer.reader()
        entries = [(n, layers[i].shapes[k][0].numel() * layers[i].shapes[k][1].itemsize)
                   for n, (i, k) in streamed.items()]
        param = {n: layers[i].params[k] for n, (i, k) in streamed.items()}
        write_shards(directory, entries, lambda names: {n: reader(param[n]) for n in names},
                     shard_bytes(max(layer.nbytes for layer in layers)))

    def _read_streamed(self, directory: Path) -> None:
        """Put the streamed weights of a checkpoint back into their homes, one layer at a time."""
        from slimtune.offload.stream.shards import CheckpointShards

        shards = CheckpointShards(directory, None)
        by_layer: dict[int, list[str]] = {}
        streamed = self._streamed_trainable()
        for name, (i, _) in streamed.items():
            by_layer.setdefault(i, []).append(name)
        absent = shards.missing(list(streamed))
        if absent or len(shards.keys) != len(streamed):
            from .errors import CheckpointError

            raise CheckpointError(f"{directory} does not hold this model's streamed weights "
                                  f"({len(absent)} missing, e.g. {', '.join(absent[:3]) or '-'})")
        self.streamer.release_all()
        for i, names in by_layer.items():
            layer = [v for _, v in self.streamer.layer_tensors(i)]  # frozen tensors of the layer stay as they are
            for name, value in shards.read(names).items():
                layer[streamed[name][1]] = value
            self.streamer.write_layer(i, layer)

    def sync(self) -> None:
        """Make the model's weights current (deferred zeroth-order updates applied): before eval, saving, export."""
        if self.zo is not None:
            self.zo.flush()

    def attach_zeroth_order(self, optimizer) -> None:
        """MeZO over streamed blocks: each block visited once per step (both perturbed forwards back to back)."""
        from slimtune.offload.stream.zo_stream import ZOStream

        self.zo = ZOStream(self.model, optimizer, self.streamer)

    # ------------------------------------------------------------------ accounting
    def tier_bytes(self) -> dict[str, int]:
        """What the engine holds per tier now (its own accounting, compared with the plan's predictions)."""
        gpu = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.numel())
        cpu = nvme = 0
        if self.streamer is not None:
            gpu += self.streamer.device_bytes() - sum(
                p.numel() * p.element_size() for layer in self.streamer.layers for p in layer.params if p.numel())
            if self.streamer.home == "cpu":
                cpu += self.streamer.home_bytes()
            else:
                nvme += self.streamer.home_bytes()
        if self.updates is not None:
            tiers = self.updates.resident_bytes()
            cpu += tiers.get("cpu", 0)
            nvme += tiers.get("nvme", 0)
            if self.streamer is None:
                gpu = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"gpu_tier_bytes": gpu, "cpu_tier_bytes": cpu, "nvme_tier_bytes": nvme}

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.streamer.counters()) if self.streamer is not None else {}
        if self.updates is not None:
            u = self.updates.stats()
            for key, theirs in (("nvme_read_bytes", "nvme_bytes_read"), ("nvme_write_bytes", "nvme_bytes_written"),
                                ("bytes_to_home", "grad_bytes_to_cpu"), ("bytes_to_device", "param_bytes_to_device")):
                out[key] = out.get(key, 0) + u.get(theirs, 0)
        return out

    def metrics(self, steps: int) -> dict[str, float]:
        """Per-tier bytes now, and bytes moved per step (averaged since the previous call over ``steps`` steps)."""
        now = self.counters()
        record: dict[str, float] = dict(self.tier_bytes())
        for key in ("nvme_read_bytes", "nvme_write_bytes", "bytes_to_device", "bytes_to_home"):
            if key in now:
                record[f"{key}_per_step"] = (now[key] - self._last.get(key, 0)) / max(steps, 1)
        self._last = now
        return record

    def save_model(self, directory: Path) -> None:
        """The full model as a sharded HF checkpoint, streamed layers written from their homes one shard at a time
        (:func:`~.streamed_save.save_streamed`): the model is never materialized."""
        if self.streamer is None:
            return super().save_model(directory)
        from .streamed_save import save_streamed

        self.sync()
        if self.updates is not None:  # training is over (its checkpoint written): give back its staging and grads
            self.updates.close()
            self.updates = None
        self.streamer.release_all()
        save_streamed(self.model, self.streamer, directory)

    def close(self) -> None:
        """Stop the engine: hooks removed, swap files deleted."""
        self.sync()
        if self.zo is not None:
            self.zo.detach()
        if self.updates is not None:
            self.updates.close()
        if self.streamer is not None:
            self.streamer.close()
        self.streamer = self.updates = self.zo = None


def runtime_rss_bytes(model: torch.nn.Module) -> int:
    """The process's resident memory that is not the model's host tensors (libraries, data, tokenizer, allocator
    slack): the plan's "runtime" item. Measured now, with the model loaded, so setup's leftovers count too."""
    from slimtune.offload import current_rss_bytes

    tensors = {t.data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
               if t.device.type == "cpu"}
    return max(0, current_rss_bytes() - sum(tensors.values()))


def offloaded_updates(model: torch.nn.Module, build_optimizer: Callable, state_tier: str, nvme_dir: str | None,
                      overlap: bool, chunk_bytes: int | None = None, initial_values: Callable | None = None,
                      chunk_names: set[str] | None = None):
    """The offloaded optimizer over ``model``'s trainable parameters, in blocks of at most its largest tensor
    (``staging_groups``), each staged in units of at most ``chunk_bytes`` of masters when given, splitting only the
    ``chunk_names`` tensors in rows (the optimizer's element-wise ones, ``elementwise_params``): returns the engine
    and, per block, the index of the model block it belongs to."""
    from slimtune.offload.blocks import model_blocks
    from slimtune.offload.updates.offloaded_blocks import staging_groups
    from slimtune.offload.updates.offloaded_updates import OffloadedUpdates

    blocks = model_blocks(model)
    trainable = [[(n, p) for n, p in b.params if p.requires_grad] for b in blocks]
    units = staging_groups([[(n, p.numel()) for n, p in block] for block in trainable])
    per_block = max(sum(b == i for b, _ in units) for i in range(len(blocks)))
    engine = OffloadedUpdates([np for block in trainable for np in block], [names for _, names in units],
                              build_optimizer, state_tier=state_tier, nvme_dir=nvme_dir, overlap=overlap,
                              max_pending=2 * per_block,  # backward waits once two blocks' updates trail it
                              chunk_bytes=chunk_bytes, chunk_names=chunk_names, initial_values=initial_values)
    return engine, [b for b, _ in units]


def home_values(streamer) -> Callable[[list[torch.nn.Parameter]], list[torch.Tensor]]:
    """``f(params) -> values``: the current values of parameters, read from their streamed layer's home when they
    stream (:meth:`~slimtune.offload.stream.homes.HomeAccess.reader`), else their own data. The offloaded
    optimizer's masters start from these after a streamed load."""
    reader = streamer.reader()
    return lambda params: [reader(p) if p in reader else p.detach() for p in params]


# The trainer needs the plan's placement, not its step-time bound: skip the bandwidth/FLOP measurements.
_NOT_MEASURED = {"cpu->gpu": 1e10, "gpu->cpu": 1e10, "nvme->cpu": 1e9, "cpu->nvme": 1e9, "memcpy": 1e10,
                 "flops": 1e12}


def offload_requested(recipe: Recipe) -> bool:
    """Plan only when the recipe asks for offloading (a placement or a budget) or runs on CUDA (auto may need it)."""
    o = recipe.offload
    return bool(o.model_fields_set - {"device"}) or o.device == "cuda"


def plan_offload(recipe: Recipe, config, runtime_bytes: int):
    """The recipe's plan for the trainer (placement only, no bandwidth measurement); the run's RNG is untouched."""
    from .planning import plan_recipe

    with torch.random.fork_rng(devices=[]):  # sizing builds stand-in tensors: keep the run's RNG stream untouched
        return plan_recipe(recipe, config=config, bandwidths=_NOT_MEASURED, runtime_bytes=runtime_bytes)


def layer_tiers(plan) -> tuple[str, str]:
    """(params tier, optimizer-state tier) the plan gives the decoder layers."""
    layers = [b for b in plan.blocks if b.name.startswith("layers.")]
    return layers[0].params_tier, layers[0].state_tier


def build_streamer(recipe: Recipe, plan, model: torch.nn.Module, device: torch.device,
                   fill: Callable[[int], None] | None = None):
    """The block streamer of ``plan`` over ``model``'s decoder layers (None when the layers stay on the device).
    ``fill``: the streamed load's per-layer materializer; the model then has no adapter yet, so every layer
    parameter streams (the adapter's own weights, added later, stay resident)."""
    from slimtune.offload.stream.streamer import BlockStreamer
    from slimtune.optimizers import ZEROTH_ORDER

    params_tier, _ = layer_tiers(plan)
    if params_tier not in ("cpu", "nvme"):
        return None
    o, full = recipe.offload, recipe.adapter.type == "none"
    return BlockStreamer(model, params_tier, device, prefetch=o.prefetch, nvme_dir=o.nvme_dir,
                         stream_trainable=full or fill is not None,
                         writeback=full and recipe.optimizer.name in ZEROTH_ORDER, fill=fill)


def build_offload(recipe: Recipe, model: torch.nn.Module, device: torch.device,
                  build_optimizer: Callable[[list], torch.optim.Optimizer], plan=None,
                  streamer=None) -> OffloadEngine | None:
    """The engine the recipe's plan asks for, attached to ``model``; None when everything stays on the device.
    ``plan`` and ``streamer``: made before the model was loaded (the streamed load, :mod:`.streamed_load`); else
    planned here. Raises PlanError (a SlimtuneError naming the budget and a fix) when nothing fits."""
    from slimtune.optimizers import ZEROTH_ORDER, elementwise_params

    o, t = recipe.offload, recipe.training
    if plan is None:
        plan = plan_offload(recipe, base_config(model), runtime_rss_bytes(model))
    params_tier, state_tier = layer_tiers(plan)
    full, zeroth_order = recipe.adapter.type == "none", recipe.optimizer.name in ZEROTH_ORDER
    off = OffloadEngine(model, device, plan)
    if full and not zeroth_order and state_tier in ("cpu", "nvme"):
        per_tensor = lambda named_masters: build_optimizer(named_masters, per_layer=True)  # noqa: E731
        # after a streamed load the layers' params are placeholders: real shapes while the engine is built, and
        # the masters start from the homes
        with streamer.shaped() if streamer is not None else contextlib.nullcontext():
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            chunkable = elementwise_params(recipe.optimizer.name, named, recipe.optimizer.model_dump())
            off.updates, off.update_blocks = offloaded_updates(
                model, per_tensor, state_tier, o.nvme_dir if state_tier == "nvme" else None,
                overlap=t.max_grad_norm == 0, chunk_bytes=o.staging_chunk if chunkable else None,
                chunk_names=chunkable, initial_values=home_values(streamer) if streamer is not None else None)
    if params_tier in ("cpu", "nvme"):
        off.streamer = streamer or build_streamer(recipe, plan, model, device)
        if off.updates is not None:
            off.updates.on_updated = off.on_updated
        elif torch.device(device).type == "cpu":  # activations in the host heap: trim it (_trim_heap)
            off.streamer.trim_every = TRIM_EVERY_LAYERS
    if off.streamer is None and off.updates is None:
        return None
    return off
