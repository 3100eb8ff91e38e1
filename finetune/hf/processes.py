"""``slimtune train`` launched as several processes: DDP through the Hugging Face route."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import transformers

from slimtune.offload import memory_snapshot

from ..recipe import Recipe
from .recipes import from_recipe
from .trainer import is_adapter_model


class RunLog(transformers.TrainerCallback):
    """``slimtune train``'s ``metrics.jsonl`` and progress bar on the Hugging Face route, written by the first
    process: one record per log, in slimtune's keys (``lr``, ``tokens_per_s``, memory per tier)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], progress: bool = True):  # noqa: D107
        self.run_dir, self.config, self.progress = run_dir, config, progress
        self.log = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        from ..metrics import MetricsLog

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

    from ..adapters import save_adapter
    from ..metrics import write_plots
    from ..trainer import TrainResult, summary_json

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
        full = not is_adapter_model(trainer.model)
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
