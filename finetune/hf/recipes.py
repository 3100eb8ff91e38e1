"""A recipe through the Trainer: what ``slimtune train`` builds, handed to a ``SlimtuneTrainer``."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import transformers

from ..engine import build_engine
from ..errors import RecipeError
from ..recipe import Recipe, load_recipe
from ..streaming import Stream, StreamBatches
from ..trainer import example_count, total_steps, warmup_steps
from .process_group import destroy_process_group_at_exit
from .refusals import problems_under_processes
from .trainer import SlimtuneTrainer


def training_arguments(recipe: Recipe, n_examples: int, device: torch.device,
                       **overrides) -> transformers.TrainingArguments:
    """``TrainingArguments`` that say what the recipe says: batch, accumulation, steps, schedule, clipping, seed,
    logging, evaluation every ``training.eval_steps`` (the Trainer's eval loss) and checkpoints
    (``output.output_dir``/checkpoint-N). ``overrides``: any other TrainingArguments field."""
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
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps or None,
        prediction_loss_only=True,  # evaluate() keeps the loss, not every eval token's logits
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
    from ..batches import collate
    from ..build import prepare
    from ..model import resolve_device

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    from accelerate import PartialState

    # the process group as TrainingArguments(use_cpu=...) sets it up (gloo on CPU), made now to order the processes
    state = PartialState(cpu=resolve_device(recipe.offload.device).type == "cpu")
    if state.num_processes > 1:
        destroy_process_group_at_exit()
    if state.num_processes > 1 and problems_under_processes(recipe):
        raise RecipeError(problems_under_processes(recipe))
    with state.main_process_first():  # several processes: the first writes the run directory, the others read it
        prepared = prepare(recipe, writer=state.is_main_process)
    engine = None
    try:
        engine = build_engine(recipe, prepared.model, prepared.device, prepared.plan, prepared.streamer)
        args = training_arguments(recipe, example_count(prepared.train_examples), prepared.device, **args_overrides)
        train_dataset = prepared.train_examples
        if isinstance(train_dataset, Stream):
            train_dataset = StreamBatches(train_dataset, recipe.training.per_device_train_batch_size,
                                          recipe.training.seed, prepared.tokenizer.pad_token_id, recipe.data.packing,
                                          rank=state.process_index, world=state.num_processes)
        return SlimtuneTrainer(
            model=prepared.model, args=args, train_dataset=train_dataset,
            eval_dataset=prepared.eval_examples or None,
            data_collator=partial(collate, pad_id=prepared.tokenizer.pad_token_id, packed=recipe.data.packing),
            processing_class=prepared.tokenizer, engine=engine, data_seed=recipe.training.seed,
            chunked_loss=recipe.training.chunked_loss, callbacks=list(callbacks))
    except BaseException:
        if engine is not None:
            engine.close()
        elif prepared.streamer is not None:
            prepared.streamer.close()
        raise
