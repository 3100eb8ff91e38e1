"""THE training loop: forward, loss, backward, clip, step, log, eval, checkpoint, resume. One loop for every
adapter and optimizer; methods plug in as objects (the optimizer from the registry, the adapter from peft).

Gradient accumulation is exact: each optimizer step sums token losses over its micro-batches and divides by the
number of supervised tokens in all of them, so ``per_device_train_batch_size=2, gradient_accumulation_steps=4``
computes the same gradient as one batch of 8 (HF's ``num_items_in_batch`` fix, transformers #34191).

Resume is exact on CPU in fp32: the checkpoint holds the trainable weights, optimizer and scheduler state, the RNG
states and the data position (epoch, micro-batch), and micro-batch order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler, set_seed

from slimtune.offload import memory_snapshot
from slimtune.offload.store.atomic_io import atomic_write_text
from slimtune.optimizers import ZEROTH_ORDER

from .adapters import router_load, save_adapter
from .batches import batches, input_tokens, num_batches
from .checkpoint import (
    TrainerState,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    recipe_changes,
    set_rng_state,
)
from .chunked_loss import chunked_loss_supported
from .engine import build_engine
from .errors import CheckpointError, TrainingDiverged
from .evaluate import eval_loss, exact_match_score
from .metrics import MetricsLog, write_plots
from .recipe import Recipe
from .step_loss import backward_step, zeroth_order_loss
from .streaming import Stream, endless_batches


@dataclass
class Prepared:
    """What :func:`slimtune.finetune.build.prepare` hands the trainer."""

    model: Any
    tokenizer: Any
    train_examples: Any           # tokenized examples: a datasets.Dataset (Arrow) or a list of {input_ids, labels}
    eval_examples: Any | None
    eval_pairs: list[tuple[str, str]]
    device: torch.device
    run_dir: Path
    trainable_params: int = 0
    total_params: int = 0
    plan: Any = None      # the offload plan made before a streamed load (None: the engine plans)
    streamer: Any = None  # the block streamer that streamed load filled (its homes hold the decoder layers)


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns: outputs, eval before/after, peaks, samples, losses."""
    run_dir: Path
    adapter_dir: Path
    steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    samples: list[tuple[str, str, str]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from: Path | None = None


def example_count(examples) -> int | None:
    """How many training examples there are (None for a stream: unknown until it ends)."""
    return None if isinstance(examples, Stream) else len(examples)


def total_steps(recipe: Recipe, n_examples: int | None) -> int:
    """Optimizer steps of the run: max_steps, or num_train_epochs over the micro-batches per epoch."""
    t = recipe.training
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = num_batches(n_examples, t.per_device_train_batch_size)
    return max(1, math.ceil(per_epoch * t.num_train_epochs / t.gradient_accumulation_steps))


def warmup_steps(recipe: Recipe, steps: int) -> int:
    """training.warmup_steps as a count (a value < 1 is a fraction of the run, as in transformers 5)."""
    w = recipe.training.warmup_steps
    return int(math.ceil(w * steps)) if 0 < w < 1 else int(w)


class Trainer:
    """Runs a :class:`Recipe` on prepared components. ``train()`` returns a :class:`TrainResult`."""

    def __init__(self, recipe: Recipe, prepared: Prepared, progress: bool = True,
                 on_step: Callable[[int, float, float, int], None] | None = None):
        """``on_step(step, began, ended, tokens)``, when given, is called after each optimizer step with its
        ``time.perf_counter()`` bounds and input tokens (the benches time steps through it)."""
        self.recipe, self.p, self.progress, self.on_step = recipe, prepared, progress, on_step
        t = recipe.training
        self.model, self.device = prepared.model, prepared.device
        self.pad_id = prepared.tokenizer.pad_token_id
        self.steps = total_steps(recipe, example_count(prepared.train_examples))
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        # Where tensors live and how a step ends: the in-memory engine, or the offload engine the recipe's plan asks
        # for (streamed layers, offloaded optimizer state that then owns the optimizer, zeroth-order streaming).
        try:
            self.engine = build_engine(recipe, self.model, self.device, prepared.plan, prepared.streamer)
        except BaseException:
            if prepared.streamer is not None:
                prepared.streamer.close()  # a refusal after a streamed load: its swap file goes too
            raise
        self.zeroth_order = recipe.optimizer.name in ZEROTH_ORDER
        # the training loss in chunks (finetune/chunked_loss.py) where it is the model's own loss
        self.chunked_loss = t.chunked_loss and chunked_loss_supported(self.model) is None
        self.scheduler = get_scheduler(t.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=warmup_steps(recipe, self.steps),
                                       num_training_steps=self.steps)
        self.state = TrainerState()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Swap the optimizer (the benches compare against other implementations); rebuild the scheduler after."""
        self.engine.set_optimizer(optimizer, per_layer=self.engine.per_layer is not None)

    # ------------------------------------------------------------------ data
    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from the saved data position on, across epochs; updates the position as it goes."""
        t, s = self.recipe.training, self.state
        if isinstance(self.p.train_examples, Stream):
            yield from self.streamed_micro_batches()
            return
        n = num_batches(len(self.p.train_examples), t.per_device_train_batch_size)
        while True:
            skip = s.batch_in_epoch  # micro-batches consumed before the checkpoint we resumed from
            order = batches(self.p.train_examples, t.per_device_train_batch_size, t.seed, s.epoch, self.pad_id,
                            skip=skip, packed=self.recipe.data.packing)
            for index, batch in enumerate(order, start=skip):
                s.batch_in_epoch = index + 1
                if s.batch_in_epoch == n:
                    s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                yield batch
            if s.batch_in_epoch != 0:  # the generator ended early (fewer batches than counted)
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0

    def streamed_micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """:meth:`micro_batches` of a stream (``data.streaming``): the position is the rows of the epoch's shuffled
        stream read so far (a mixture's: its draws and each source's rows), so a resumed run skips exactly those and
        reads the next example."""
        t, s = self.recipe.training, self.state
        for batch, epoch, position in endless_batches(self.p.train_examples, t.per_device_train_batch_size, t.seed,
                                                      self.pad_id, self.recipe.data.packing, s.epoch,
                                                      s.rows_in_epoch):
            if epoch != s.epoch:
                s.epoch, s.batch_in_epoch = epoch, 0
            s.batch_in_epoch, s.rows_in_epoch = s.batch_in_epoch + 1, position
            yield batch

    # ------------------------------------------------------------------ one optimizer step
    def optimizer_step(self, micro: Iterator[dict[str, torch.Tensor]]) -> tuple[float, float | None, int]:
        """Accumulate gradients over ``gradient_accumulation_steps`` micro-batches, then let the engine end the step
        (clip and step, or wait for the updates that ran during backward).

        Returns (token-weighted loss, grad norm before clipping or None, input tokens processed).
        """
        t = self.recipe.training
        group = [next(micro) for _ in range(t.gradient_accumulation_steps)]
        tokens = sum(input_tokens(b) for b in group)
        if self.zeroth_order:
            return self.zeroth_order_step(group), None, tokens
        loss_sum = backward_step(self.model, group, self.engine, self.device, t.bf16, self.chunked_loss)
        grad_norm = self.engine.step(t.max_grad_norm)
        self.scheduler.step()
        return loss_sum, grad_norm, tokens

    def zeroth_order_step(self, group: list[dict[str, torch.Tensor]]) -> float:
        """MeZO: the loss of a perturbation is the token-weighted loss over all micro-batches of the step
        (:func:`.step_loss.zeroth_order_loss`)."""
        t = self.recipe.training

        def closure() -> float:
            return zeroth_order_loss(self.model, group, self.device, t.bf16)

        loss = self.engine.zeroth_order_step(group, closure)
        self.scheduler.step()
        return loss

    # ------------------------------------------------------------------ eval
    def evaluate(self, log: MetricsLog | None) -> dict[str, Any] | None:
        p, d, t = self.p, self.recipe.data, self.recipe.training
        if not p.eval_examples:
            return None
        self.engine.sync()  # deferred zeroth-order updates land before eval
        result: dict[str, Any] = {"step": self.state.step,
                                  "eval_loss": eval_loss(self.model, p.eval_examples, t.per_device_eval_batch_size,
                                                         self.pad_id, self.device, t.bf16)}
        if d.metric == "exact_match" and p.eval_pairs:
            score, samples = exact_match_score(self.model, p.tokenizer, p.eval_pairs, d.max_new_tokens,
                                               t.per_device_eval_batch_size, self.device, t.bf16)
            result["eval_exact_match"] = score
            result["samples"] = samples
        if log is not None:
            log.log({k: v for k, v in result.items() if k != "samples"})
        return result

    # ------------------------------------------------------------------ checkpoint / resume
    def save(self) -> Path:
        o = self.recipe.output
        try:
            return self.engine.save(self.p.run_dir, self.state, self.scheduler, self.recipe.to_dict(),
                                    o.save_total_limit)
        except OSError as exc:  # disk full, quota, permissions: the half-written temp dir is already removed
            previous = list_checkpoints(self.p.run_dir)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write the step-{self.state.step} checkpoint in {self.p.run_dir}: "
                                  f"{exc.strerror or exc}; {kept}") from None

    def restore(self, path: Path, log_warning) -> None:
        ckpt = load_checkpoint(path)
        refused, warned = recipe_changes(ckpt.recipe, self.recipe.to_dict())
        if refused:
            raise CheckpointError(
                f"resuming from {path} with a recipe that would silently change the run:\n    "
                + "\n    ".join(refused)
                + "\n  restore these values, or start a new run (another output.output_dir, or "
                  "output.overwrite_output_dir=true)")
        for line in warned:
            log_warning(f"resuming with a changed schedule length ({line}): the LR schedule is rebuilt for the "
                        "new length, so steps after the checkpoint differ from the original plan")
        self.engine.restore(path, ckpt)
        if not warned:
            self.scheduler.load_state_dict(ckpt.scheduler)
        else:
            with warnings.catch_warnings():  # stepping a scheduler with no optimizer step in between is the point
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(ckpt.state.step):  # fast-forward the new-length schedule to the checkpoint's step
                    self.scheduler.step()
        set_rng_state(ckpt.rng)
        self.state = ckpt.state

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        r, t, o = self.recipe, self.recipe.training, self.recipe.output
        run_dir = self.p.run_dir
        resumed = find_resume_checkpoint(run_dir, t.resume_from_checkpoint)
        if resumed is not None:
            self.restore(resumed, warnings.warn)
        log = MetricsLog(run_dir, self.steps, self.state.step, o.report_to, r.to_dict(), self.progress)
        try:
            if resumed is not None:
                log.write(f"resumed from {resumed} at step {self.state.step}")
            before = self.evaluate(log) if self.state.step == 0 else None
            if self.state.step == 0:  # dropout's draws start from the seed, as on the Hugging Face route (.hf)
                set_seed(t.seed)
            micro = self.micro_batches()
            self.model.train()
            losses: list[float] = []
            start = time.perf_counter()
            while self.state.step < self.steps:
                lr = self.scheduler.get_last_lr()[0]
                began = time.perf_counter()
                loss, grad_norm, tokens = self.optimizer_step(micro)
                if self.on_step is not None:
                    self.on_step(self.state.step + 1, began, time.perf_counter(), tokens)
                if not math.isfinite(loss):
                    raise self.diverged(loss, lr)
                self.state.step += 1
                self.state.tokens_seen += tokens
                log.count_tokens(tokens)
                losses.append(loss)
                log.advance()
                step = self.state.step
                if step % o.logging_steps == 0 or step == self.steps:
                    window = losses[-(step % o.logging_steps or o.logging_steps):]
                    log.log({"step": step, "epoch": round(self.epoch_progress(), 4), "loss": sum(window) / len(window),
                             "lr": lr, "grad_norm": grad_norm, "tokens_per_s": log.tokens_per_s(),
                             "tokens_seen": self.state.tokens_seen, **memory_snapshot(self.device),
                             **self.engine.metrics(len(window)),
                             **router_load(self.model)})
                if t.eval_steps and step % t.eval_steps == 0 and step != self.steps:
                    self.evaluate(log)
                if o.save_steps and step % o.save_steps == 0 and step != self.steps:
                    self.save()
            train_seconds = time.perf_counter() - start
            after = self.evaluate(log)
            self.save()
            adapter_dir = run_dir / "adapter"
            # an adapter run saves only the adapter, which never left the device; a full run saves every weight
            # through the engine, which writes streamed layers from their homes a shard at a time (a 70B model
            # streamed from NVMe is never materialized to be saved)
            self.engine.sync()
            save_adapter(self.model, adapter_dir, self.p.tokenizer,  # atomic: temp dir renamed into place
                         write_model=self.engine.save_model if self.recipe.adapter.type == "none" else None)
            self.engine.close()
            if o.plots:
                write_plots(log.records, run_dir)
        finally:
            log.close()
            self.engine.close()  # swap files removed (also when training fails)
        mem = memory_snapshot(self.device)
        result = TrainResult(
            run_dir=run_dir, adapter_dir=adapter_dir, steps=self.state.step,
            eval_before=_scalars(before), eval_after=_scalars(after), peak_rss_bytes=mem["peak_rss_bytes"],
            peak_gpu_bytes=mem.get("peak_gpu_bytes"), samples=(after or {}).get("samples", [])[:3], losses=losses,
            train_seconds=train_seconds, resumed_from=resumed)
        atomic_write_text(run_dir / "summary.json", summary_json(result))
        return result

    def diverged(self, loss: float, lr: float) -> TrainingDiverged:
        """The one-line stop of a run whose loss became NaN/inf: the step, the last good checkpoint, what to try.
        Nothing of the diverged step is saved (its weights already took the non-finite update)."""
        t, step = self.recipe.training, self.state.step + 1
        kept = list_checkpoints(self.p.run_dir)
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written before it"
        return TrainingDiverged(
            f"training diverged: the loss became {loss} at step {step} (learning rate {lr:.3g}); {where}. Try a "
            f"lower training.learning_rate (now {t.learning_rate:g}), gradient clipping (training.max_grad_norm, now "
            f"{t.max_grad_norm:g}), or a warm-up (training.warmup_steps)")

    def epoch_progress(self) -> float:
        if isinstance(self.p.train_examples, Stream):
            return float(self.state.epoch)  # a stream's length is unknown until it ends
        n = num_batches(len(self.p.train_examples), self.recipe.training.per_device_train_batch_size)
        return self.state.epoch + self.state.batch_in_epoch / max(n, 1)


def _scalars(result: dict[str, Any] | None) -> dict[str, float] | None:
    return None if result is None else {k: v for k, v in result.items() if isinstance(v, (int, float))}


def summary_json(result: TrainResult) -> str:
    """summary.json's text: steps, eval before/after, peaks, outputs, final loss, samples."""
    import json

    return json.dumps({
        "steps": result.steps, "eval_before": result.eval_before, "eval_after": result.eval_after,
        "peak_rss_bytes": result.peak_rss_bytes, "peak_gpu_bytes": result.peak_gpu_bytes,
        "adapter_dir": str(result.adapter_dir), "train_seconds": round(result.train_seconds, 2),
        "final_loss": result.losses[-1] if result.losses else None,
        "samples": [{"prompt": p, "reference": r, "generated": g} for p, r, g in result.samples],
    }, indent=2) + "\n"
