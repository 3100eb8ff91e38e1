"""slimtune from a Hugging Face script: a drop-in ``transformers.Trainer``, a callback, and recipes.

* :class:`SlimtuneTrainer` (a ``transformers.Trainer``): the step is slimtune's engine's (:mod:`.engine`), which is
  what a callback cannot reach: per-layer updates inside backward (gradient accumulation included), the offload
  engine's streamed layers and offloaded optimizer step, MeZO's forward-only step, MixLoRA's router loss. The
  Trainer keeps its own scheduler, logging, checkpoints (``optimizer.pt`` is our optimizer's ``state_dict``) and
  ``resume_from_checkpoint``.
* :func:`from_recipe`: a :class:`SlimtuneTrainer` with a recipe's model, adapter, data (same order), optimizer and
  offload plan: per step the same losses as ``slimtune train`` on that recipe.
* :class:`SlimtuneCallback`: for a stock ``transformers.Trainer``: memory per tier and MixLoRA's router load in the
  logs (:class:`SlimtuneTrainer` logs them itself, with what its engine holds and moves).
* :func:`slimtune_optimizer`: one of slimtune's optimizers (GaLore, FRUGAL, SPAM, AdamW, ...) for a stock Trainer
  (``optimizers=(slimtune_optimizer(...), None)``; the Trainer builds its scheduler around it), per-layer too.
* :func:`train_on_processes`: ``slimtune train`` launched as several processes (DDP through this route).

What a callback can and cannot change is set out in transformers' ``trainer_callback.py``: it cannot replace the
optimizer or the training step, hence the subclass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader, Sampler

from slimtune.offload import memory_snapshot
from slimtune.optimizers import SEEDED, ZEROTH_ORDER, build_optimizer

from .adapters import router_load
from .chunked_loss import chunked_loss_supported
from .engine import InMemoryEngine, build_engine
from .errors import RecipeError
from .evaluate import supervised_tokens
from .recipe import Recipe, load_recipe
from .step_loss import micro_batch_loss, zeroth_order_loss


# ----------------------------------------------------------------------------------------------- the optimizer
class EngineOptimizer(torch.optim.Optimizer):
    """The Trainer's handle on an engine's optimizer. ``param_groups`` and ``state`` are the optimizer's own objects
    (the Trainer's LR scheduler sets their ``lr``; ``state_dict`` is the optimizer's, so ``optimizer.pt`` resumes
    it), and ``step()`` ends the step the engine's way: clip to ``max_grad_norm``, step, zero (in memory), wait for
    the updates that ran during backward (per-layer, offloaded state), or nothing after a zeroth-order step, which
    :class:`SlimtuneTrainer` ran in its ``training_step``. ``grad_norm``: the last step's norm before clipping."""

    def __init__(self, engine, max_grad_norm: float):  # noqa: D107 - the class says it
        # torch.optim.Optimizer.__init__ is not called: it would copy the param groups this object must share
        self.engine, self.max_grad_norm = engine, max_grad_norm
        self.inner: torch.optim.Optimizer = engine.optimizer
        self.zeroth_order = _is_zeroth_order(self.inner)
        self.grad_norm: float | None = None

    # the optimizer's own objects, looked up each time: its load_state_dict replaces them
    param_groups = property(lambda self: self.inner.param_groups)
    state = property(lambda self: self.inner.state)
    defaults = property(lambda self: self.inner.defaults)

    def step(self, closure=None):  # noqa: D102 - the class says it
        if self.zeroth_order:
            return None
        self.grad_norm = self.engine.step(self.max_grad_norm)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        self.engine.sync()
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self.inner.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"EngineOptimizer({self.inner!r})"


def _is_zeroth_order(optimizer: torch.optim.Optimizer) -> bool:
    from slimtune.optimizers import MeZO

    return isinstance(optimizer, MeZO)


# --------------------------------------------------------------------------------------------------- data order
class SeededOrder(Sampler[int]):
    """Example order of one epoch: ``randperm(n)`` seeded by ``seed + epoch`` (``set_epoch``, which the Trainer
    calls), the order ``slimtune train`` uses (:func:`.data.batches`), so batches of consecutive indices are its
    micro-batches."""

    def __init__(self, n: int, seed: int):  # noqa: D107
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # noqa: D102
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


# ---------------------------------------------------------------------------------------------- the Trainer
class SlimtuneTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose step is a slimtune engine's.

    Give it either ``engine=`` (built from a recipe by :func:`from_recipe`) or ``optimizer=`` (a name in
    ``slimtune.optimizers.OPTIMIZERS``) with ``optimizer_kwargs`` and ``per_layer``; the optimizer then gets the
    args' ``learning_rate`` and ``weight_decay`` and trains the model's trainable parameters in memory.

    ``args.max_grad_norm`` is applied by the engine (as ``slimtune train`` does; the Trainer's own clipping is
    turned off, and the logged ``grad_norm`` is the engine's). The loss of a micro-batch is slimtune's
    (:func:`.step_loss.micro_batch_loss`: token-weighted over the step's micro-batches, plus MixLoRA's router
    term). ``data_seed`` (default None: the Trainer's sampler) orders the examples as ``slimtune train`` does.
    ``step_losses``: every optimizer step's loss, unrounded (the Trainer's logs round to 4 digits).
    """

    def __init__(self, *args, engine=None, optimizer: str | None = None, optimizer_kwargs: dict | None = None,
                 per_layer: bool = False, data_seed: int | None = None, chunked_loss: bool = True, **kwargs):
        if (engine is None) == (optimizer is None):
            raise TypeError("SlimtuneTrainer: give engine= (from_recipe builds one) or optimizer= (a slimtune "
                            "optimizer name), not both and not neither")
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise TypeError("SlimtuneTrainer builds its optimizer (engine= or optimizer=); drop optimizers=")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.fsdp:  # before transformers' own checks of it
            raise RecipeError([FSDP_REFUSED])
        super().__init__(*args, **kwargs)
        if getattr(engine, "updates", None) is not None:
            raise RecipeError(["offload.optimizer_state cpu/nvme: the optimizer state lives in the offload engine, "
                               "which a Trainer checkpoint (optimizer.pt) cannot hold; train this recipe with "
                               "slimtune train, or keep offload.optimizer_state gpu on the Hugging Face route"])
        self.world = self.accelerator.num_processes
        if self.world > 1:
            refuse_under_processes(engine, per_layer)
        if engine is None:
            engine = InMemoryEngine(self.model, self.args.device)
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            hparams = dict(optimizer_kwargs or {})
            if optimizer in SEEDED:
                hparams.setdefault("seed", self.args.seed)
            if per_layer:
                hparams["per_layer"] = True
            built = build_optimizer(optimizer, named, lr=self.args.learning_rate,
                                    weight_decay=self.args.weight_decay, **hparams)
            if per_layer and self.args.max_grad_norm > 0:
                raise RecipeError(["per_layer: global-norm clipping needs every gradient at once; set "
                                   "TrainingArguments(max_grad_norm=0)"])
            engine.set_optimizer(built, per_layer=per_layer)
        self.engine, self.data_seed = engine, data_seed
        # the Trainer wraps self.optimizer (accelerate) when training starts; engine_optimizer stays ours
        self.engine_optimizer = self.optimizer = EngineOptimizer(engine, self.args.max_grad_norm)
        self.args.max_grad_norm = 0.0  # the engine clips (EngineOptimizer.step)
        self.zeroth_order = self.engine_optimizer.zeroth_order
        self.chunked_loss = chunked_loss and chunked_loss_supported(self.model) is None
        self.step_losses: list[float] = []
        self._micro: list[dict[str, torch.Tensor]] = []  # the step's micro-batches so far
        self._tokens, self._window_start = 0, time.perf_counter()  # input tokens of this process since the last log

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's loader, or with ``data_seed`` ``slimtune train``'s order (:class:`SeededOrder`)."""
        if self.data_seed is None:
            return super().get_train_dataloader()
        loader = DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                            sampler=SeededOrder(len(self.train_dataset), self.data_seed),
                            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(self.data_seed))  # no draw from torch's RNG
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ the step
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """One micro-batch: slimtune's loss and backward through the engine (or, for a zeroth-order optimizer, the
        whole step at the last micro-batch). The Trainer then calls ``optimizer.step()`` (:class:`EngineOptimizer`)."""
        final = self.accelerator.sync_gradients  # the step's last micro-batch
        self._micro.append(inputs)
        if "attention_mask" in inputs:
            self._tokens += int(inputs["attention_mask"].sum())
        if not final:
            return torch.zeros((), device=self.args.device)
        group, self._micro = self._micro, []
        loss = self._zeroth_order_step(group) if self.zeroth_order else self._backward(model, group)
        self.step_losses.append(loss)
        return torch.tensor(loss, device=self.args.device)

    def _backward(self, model: torch.nn.Module, group: list[dict[str, Any]]) -> float:
        """Forward and backward of every micro-batch of the step, token-weighted (held until the last one so the
        weights are known, as ``slimtune train`` does; the Trainer has fetched them all already). Across processes
        the weights are global: micro-batch i of a rank weighs ``n_i * processes / (tokens of all ranks)``, so
        DDP's mean of the ranks' gradients is the gradient of one batch of every rank's examples; the gradient
        all-reduce runs once, in the last backward. Returns the step's loss over all processes."""
        counts = [supervised_tokens(b["labels"]) for b in group]
        total = self._all_ranks(float(sum(counts)))
        last = max((i for i, n in enumerate(counts) if n), default=-1)
        model.train()
        wrapped = model if self.world > 1 else None
        loss_sum = 0.0
        for i, (batch, n) in enumerate(zip(group, counts)):
            if n == 0:
                continue  # nothing supervised: no loss, no backward
            self.engine.begin_micro_batch(final=i == last)
            on_device = {k: v.to(self.args.device) for k, v in batch.items()}
            sync = self.accelerator.no_sync(model) if (wrapped is not None and i != last) else nullcontext()
            with sync:
                with self.compute_loss_context_manager():
                    loss = micro_batch_loss(self.model, on_device, n * self.world / total, self.args.device,
                                            self.args.bf16, self.chunked_loss and wrapped is None, wrapped)
                self.engine.before_backward()
                self.accelerator.backward(loss)
            loss_sum += float(loss.detach())
        return self._all_ranks(loss_sum) / self.world

    def _zeroth_order_step(self, group: list[dict[str, Any]]) -> float:
        """MeZO over every process's examples: each rank draws the same z (the shared seed), and the loss of a
        perturbation is the token-weighted loss over all ranks' micro-batches, one all-reduce of two scalars; so
        every rank computes the same projected gradient and update, and no gradient crosses a process."""
        tokens = float(sum(supervised_tokens(b["labels"]) for b in group))

        def closure() -> float:
            local = zeroth_order_loss(self.model, group, self.args.device, self.args.bf16)
            if self.world == 1:
                return local
            both = self.accelerator.reduce(torch.tensor([local * tokens, tokens], dtype=torch.float64,
                                                        device=self.args.device), reduction="sum")
            return float(both[0] / both[1])

        return self.engine.zeroth_order_step(group, closure)

    def _all_ranks(self, value: float) -> float:
        """``value`` summed over the processes (itself with one)."""
        if self.world == 1:
            return value
        summed = self.accelerator.reduce(torch.tensor([value], dtype=torch.float64, device=self.args.device),
                                         reduction="sum")
        return float(summed[0])

    # ------------------------------------------------------------------ logs, eval, save
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs; training logs gain the engine's pre-clip ``grad_norm`` and :func:`memory_logs` (so
        every reporter, TensorBoard or W&B, sees them)."""
        if "loss" in logs:
            if self.engine_optimizer.grad_norm is not None:
                logs["grad_norm"] = self.engine_optimizer.grad_norm
            now = time.perf_counter()  # every process reads about as many tokens (the batches are its share)
            logs["tokens_per_s"] = self._tokens * self.world / max(now - self._window_start, 1e-9)
            self._tokens, self._window_start = 0, now
            logs.update(memory_logs(self.args.device, self.model, self.engine, self.args.logging_steps))
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        """Deferred (zeroth-order) updates land first."""
        self.engine.sync()
        return super().evaluate(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Deferred updates land first; a full fine-tune whose layers the engine streams is written by the engine
        (a shard at a time, never whole), anything else by the Trainer."""
        self.engine.sync()
        if getattr(self.engine, "streamer", None) is not None and not _is_adapter_model(self.model):
            target = Path(output_dir or self.args.output_dir)
            if self.args.should_save:
                self.engine.save_model(target)
            return
        super().save_model(output_dir, _internal_call=_internal_call)

    def train(self, *args, **kwargs):
        """The Trainer's ``train``, deferred updates applied when it ends (also on failure). ``engine.close()``
        stops the engine (hooks removed, swap files deleted) once the model is no longer needed."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.engine.sync()


FSDP_REFUSED = ("TrainingArguments.fsdp: SlimtuneTrainer does not shard parameters across processes yet (its "
                "optimizers work on whole tensors: GaLore's and FRUGAL's projections need a matrix, not a shard; and "
                "accelerate runs CPU processes as plain DDP whatever fsdp says); use DDP (no fsdp), or the offload "
                "engine in one process to go past GPU memory")
PER_LAYER_UNDER_PROCESSES = ("optimizer.per_layer: a per-layer update runs inside backward, on this process's "
                             "gradient, before DDP has averaged it over the processes; train per-layer in one process")
OFFLOAD_UNDER_PROCESSES = ("offload (streamed layers, offloaded optimizer state): the offload engine runs in one "
                           "process; use one process, or offload.params and offload.optimizer_state gpu with DDP")


def problems_under_processes(recipe: Recipe) -> list[str]:
    """What a recipe asks for that several processes cannot run (checked before they start)."""
    problems = []
    if getattr(recipe.optimizer, "per_layer", False):
        problems.append(PER_LAYER_UNDER_PROCESSES)
    if recipe.offload.params in ("cpu", "nvme") or recipe.offload.optimizer_state in ("cpu", "nvme"):
        problems.append(OFFLOAD_UNDER_PROCESSES)
    return problems


def refuse_under_processes(engine, per_layer: bool) -> None:
    """The same refusal for an engine already built (an ``auto`` placement may have chosen to offload)."""
    problems = []
    if per_layer or getattr(engine, "per_layer", None) is not None:
        problems.append(PER_LAYER_UNDER_PROCESSES)
    if getattr(engine, "streamer", None) is not None or getattr(engine, "updates", None) is not None:
        problems.append(OFFLOAD_UNDER_PROCESSES)
    if problems:
        raise RecipeError(problems)


def _is_adapter_model(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------------- callback
def memory_logs(device: torch.device, model: torch.nn.Module, engine=None, steps: int = 1) -> dict[str, Any]:
    """Resident and peak memory per tier (``memory_snapshot``), what ``engine`` holds per tier and moves per step
    (over the last ``steps`` steps), and MixLoRA's router load (share of routed tokens per expert, layers averaged)."""
    logs: dict[str, Any] = dict(memory_snapshot(device))
    if engine is not None:
        logs.update(engine.tier_bytes())
        logs.update(engine.metrics(steps))
    load = router_load(model)
    if load:
        logs["router_load"] = load["router_load"]
    return logs


class SlimtuneCallback(transformers.TrainerCallback):
    """For a stock ``transformers.Trainer``: adds :func:`memory_logs` to every training log (``state.log_history``
    and the reporters after it in the callback list), and refuses a zeroth-order optimizer at ``on_train_begin``
    (the stock step always runs backward: use :class:`SlimtuneTrainer`, which logs these itself)."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: D102
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is not None and _is_zeroth_order(inner):
            raise RecipeError([f"{type(inner).__name__} is a zeroth-order optimizer: a stock Trainer's step runs "
                               "backward; train with slimtune.finetune.hf.SlimtuneTrainer"])

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):  # noqa: D102
        if logs is None or "loss" not in logs or model is None:
            return
        extra = memory_logs(args.device, model, steps=args.logging_steps)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer appended a copy of logs before calling us


def slimtune_optimizer(model: torch.nn.Module, name: str, args: transformers.TrainingArguments,
                       per_layer: bool = False, **hparams) -> torch.optim.Optimizer:
    """One of slimtune's optimizers over ``model``'s trainable parameters, for a stock Trainer:
    ``Trainer(..., optimizers=(slimtune_optimizer(model, "galore", args, rank=8), None))`` (the Trainer builds the
    scheduler from ``args``). lr and weight decay come from ``args``; ``hparams`` are the optimizer's own.

    ``per_layer=True``: each parameter is updated inside backward by a gradient hook and its gradient freed at once
    (full gradients never coexist), on the micro-batch that ends the accumulation (accelerate's
    ``GradientState.sync_gradients``, which the Trainer sets before each micro-batch), so gradient accumulation
    works, unlike transformers' layer-wise GaLore. The returned object is what the Trainer steps (its ``step``
    only closes the step); ``args.max_grad_norm`` must be 0 (a global norm needs every gradient at once)."""
    if name in ZEROTH_ORDER:
        raise RecipeError([f"optimizer {name!r} is zeroth-order: a stock Trainer's step runs backward; use "
                           "slimtune.finetune.hf.SlimtuneTrainer(optimizer=...)"])
    if per_layer and args.max_grad_norm > 0:
        raise RecipeError([f"per_layer: global-norm clipping needs every gradient at once; set "
                           f"TrainingArguments(max_grad_norm=0) (now {args.max_grad_norm:g})"])
    if name in SEEDED:
        hparams.setdefault("seed", args.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if per_layer:
        hparams["per_layer"] = True  # the per-tensor twin of an optimizer (torch's AdamW has no per-tensor update)
    optimizer = build_optimizer(name, named, lr=args.learning_rate, weight_decay=args.weight_decay, **hparams)
    if not per_layer:
        return optimizer
    engine = InMemoryEngine(model, args.device)
    engine.set_optimizer(optimizer, per_layer=True, is_final=accumulation_boundary)
    return EngineOptimizer(engine, 0.0)


def accumulation_boundary() -> bool:
    """Whether the micro-batch in backward ends an optimizer step (accelerate's gradient state, set by the
    Trainer before each micro-batch)."""
    from accelerate.state import GradientState

    return GradientState().sync_gradients


# ---------------------------------------------------------------------------------------------- from a recipe
def training_arguments(recipe: Recipe, n_examples: int, device: torch.device,
                       **overrides) -> transformers.TrainingArguments:
    """``TrainingArguments`` that say what the recipe says: batch, accumulation, steps, schedule, clipping, seed,
    logging and checkpoints (``output.output_dir``/checkpoint-N). ``overrides``: any other TrainingArguments field."""
    from .trainer import total_steps, warmup_steps

    t, o = recipe.training, recipe.output
    steps = total_steps(recipe, n_examples)
    values = dict(
        output_dir=o.output_dir, per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=warmup_steps(recipe, steps), max_steps=steps, max_grad_norm=t.max_grad_norm, seed=t.seed,
        logging_steps=o.logging_steps, save_strategy="steps" if o.save_steps else "no",
        save_steps=o.save_steps or 500, save_total_limit=o.save_total_limit,
        report_to=[r for r in o.report_to if r != "none"] or "none", use_cpu=device.type == "cpu", bf16=t.bf16,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        ddp_find_unused_parameters=False)  # every adapter slimtune builds uses all its parameters in each forward
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def from_recipe(recipe: str | Path | Recipe, overrides: Sequence[str] = (), callbacks: Sequence = (),
                **args_overrides) -> SlimtuneTrainer:
    """A :class:`SlimtuneTrainer` for a recipe (a path, with ``overrides`` like the CLI's, or a :class:`Recipe`):
    its model, adapter, tokenized data in ``slimtune train``'s order, optimizer and offload plan. ``callbacks``:
    more ``TrainerCallback``s. ``args_overrides``: TrainingArguments fields to change (``logging_steps=1``...).
    ``trainer.train()`` then gives the per-step losses of ``slimtune train`` on the same recipe."""
    from .build import prepare
    from .data import collate
    from .model import resolve_device

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    from accelerate import PartialState

    # the process group as TrainingArguments(use_cpu=...) sets it up (gloo on CPU), made now to order the processes
    state = PartialState(cpu=resolve_device(recipe.offload.device).type == "cpu")
    if state.num_processes > 1 and problems_under_processes(recipe):
        raise RecipeError(problems_under_processes(recipe))
    with state.main_process_first():  # several processes: the first writes the run directory, the others read it
        prepared = prepare(recipe, writer=state.is_main_process)
    engine = None
    try:
        engine = build_engine(recipe, prepared.model, prepared.device, prepared.plan, prepared.streamer)
        args = training_arguments(recipe, len(prepared.train_examples), prepared.device, **args_overrides)
        return SlimtuneTrainer(
            model=prepared.model, args=args, train_dataset=prepared.train_examples,
            data_collator=partial(collate, pad_id=prepared.tokenizer.pad_token_id),
            processing_class=prepared.tokenizer, engine=engine, data_seed=recipe.training.seed,
            chunked_loss=recipe.training.chunked_loss, callbacks=list(callbacks))
    except BaseException:
        if engine is not None:
            engine.close()
        elif prepared.streamer is not None:
            prepared.streamer.close()
        raise


# ------------------------------------------------------------------------------- slimtune train, several processes
class RunLog(transformers.TrainerCallback):
    """``slimtune train``'s ``metrics.jsonl`` and progress bar on the Hugging Face route, written by the first
    process: one record per log, in slimtune's keys (``lr``, ``tokens_per_s``, memory per tier)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], progress: bool = True):  # noqa: D107
        self.run_dir, self.config, self.progress = run_dir, config, progress
        self.log = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        from .metrics import MetricsLog

        if state.is_world_process_zero:
            self.log = MetricsLog(self.run_dir, state.max_steps, state.global_step, [], self.config, self.progress)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if self.log is not None and logs and "loss" in logs:
            record = {"step": state.global_step, "lr": logs.get("learning_rate"), **logs}
            record.pop("learning_rate", None)
            self.log.log(record)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.log is not None:
            self.log.advance()

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.log is not None:
            self.log.close()


def train_on_processes(recipe: Recipe, progress: bool = True):
    """``slimtune train`` when launched as several processes (torchrun, accelerate launch): the recipe through
    :func:`from_recipe` (DDP), and on the first process the run directory one process writes: ``metrics.jsonl``,
    plots, the adapter (or full model) in ``adapter/``, ``summary.json``. Checkpoints are the Trainer's, in
    ``output_dir/checkpoint-N``; ``training.resume_from_checkpoint`` resumes from them. Returns the
    :class:`~.trainer.TrainResult` on the first process, None on the others."""
    from slimtune.offload.store.atomic_io import atomic_write_text

    from .adapters import save_adapter
    from .metrics import write_plots
    from .trainer import TrainResult, summary_json

    run_dir = Path(recipe.output.output_dir)
    log = RunLog(run_dir, recipe.to_dict(), progress)
    trainer = from_recipe(recipe, callbacks=[log])
    trainer.remove_callback(transformers.PrinterCallback)  # RunLog's progress bar and metrics.jsonl say it
    resume = recipe.training.resume_from_checkpoint
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=None if resume in (None, False) else resume)
        seconds = time.perf_counter() - start
        if not trainer.is_world_process_zero():
            return None
        full = not _is_adapter_model(trainer.model)
        save_adapter(trainer.model, run_dir / "adapter", trainer.processing_class,
                     write_model=trainer.engine.save_model if full else None)
        if recipe.output.plots and log.log is not None:
            write_plots(log.log.records, run_dir)
        mem = memory_snapshot(trainer.args.device)
        result = TrainResult(run_dir=run_dir, adapter_dir=run_dir / "adapter", steps=trainer.state.global_step,
                             eval_before=None, eval_after=None, peak_rss_bytes=mem["peak_rss_bytes"],
                             peak_gpu_bytes=mem.get("peak_gpu_bytes"), losses=trainer.step_losses,
                             train_seconds=seconds)
        atomic_write_text(run_dir / "summary.json", summary_json(result))
        return result
    finally:
        trainer.engine.close()
