"""Recipe → the pieces the trainer runs: device, data, tokenizer, model (+ 4-bit base), adapter.

Order matters for tiny inline models: their tokenizer is trained on the training texts, and the model's vocabulary
is the tokenizer's, so rows are read first. The built base (weights + tokenizer) is saved in
``<output_dir>/base_model`` so that ``generate``, ``merge`` and ``PeftModel.from_pretrained`` find it, and a
resumed run reuses it rather than rebuilding.
"""

from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from slimtune.offload.store.atomic_io import atomic_dir, atomic_write_text, remove_stale_temps

from .adapters import apply_adapter
from .checkpoint import list_checkpoints
from .data import eval_prompts
from .data_sources import concatenated, load_sources, mixed_examples, tokenized, training_texts
from .errors import SlimtuneError
from .model import (
    build_base_model,
    check_packing,
    count_parameters,
    load_model,
    quantization_config,
    resolve_device,
)
from .recipe import Recipe
from .tokenizer import load_tokenizer
from .trainer import Prepared

RUN_OUTPUTS = ("checkpoints", "adapter", "base_model", "metrics.jsonl", "summary.json", "loss.png", "memory.png",
               "router_load.png", "recipe.yaml", "tensorboard")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(recipe: Recipe) -> Path:
    """Create the output dir; refuse to mix a new run into an old one unless told to resume or overwrite."""
    run_dir = Path(recipe.output.output_dir)
    resuming = recipe.training.resume_from_checkpoint not in (None, False)
    has_run = (run_dir / "metrics.jsonl").exists() or bool(list_checkpoints(run_dir))
    if has_run and not resuming:
        if not recipe.output.overwrite_output_dir:
            raise SlimtuneError(
                f"output.output_dir {run_dir} already holds a run. Continue it with "
                "training.resume_from_checkpoint=true, start over with output.overwrite_output_dir=true, or choose "
                "another output.output_dir")
        for name in RUN_OUTPUTS:
            target = run_dir / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlimtuneError(f"output.output_dir {run_dir} cannot be created: {exc.strerror}") from None
    remove_stale_temps(run_dir)
    return run_dir


def prepare(recipe: Recipe, writer: bool = True) -> Prepared:
    """Build everything a :class:`~slimtune.finetune.trainer.Trainer` needs from a validated recipe. ``writer``
    False: another process of the same run (which ran first) wrote the run directory; read its base, write nothing."""
    t, d, m = recipe.training, recipe.data, recipe.model
    seed_everything(t.seed)
    device = resolve_device(recipe.offload.device)
    run_dir = prepare_run_dir(recipe) if writer else Path(recipe.output.output_dir)
    sources = load_sources(d, t.seed)

    base_dir = run_dir / "base_model"
    if m.architecture is not None and (base_dir / "config.json").is_file() and (t.resume_from_checkpoint
                                                                                  or not writer):
        source = base_dir  # resuming, or a second process: the exact base and tokenizer of the run
        tokenizer = load_tokenizer(m.model_copy(update={"tokenizer": str(base_dir)}), None)
    else:
        tokenizer = load_tokenizer(m, lambda: training_texts(sources))
        if m.architecture is not None:
            with atomic_dir(base_dir) as tmp:
                build_base_model(m, tokenizer, t.seed, tmp)
            source = base_dir
        else:
            source = build_base_model(m, tokenizer, t.seed, None)

    # the data is checked before the model loads: a bad dataset fails in seconds, not after a 70B load
    train_examples = mixed_examples(d, sources, tokenized(sources, tokenizer, "train"), t.seed)
    eval_examples = concatenated(tokenized(sources, tokenizer, "eval"))
    pairs = []
    for s in sources:  # the task metric's (prompt, reference) pairs: the first eval rows of instruction sources
        if s.eval is not None and d.metric != "none" and s.cfg.format != "text":
            pairs += eval_prompts(s.eval, s.cfg, tokenizer, d.metric_samples - len(pairs))
    plan, model, streamer = load_base(recipe, source, device)
    try:
        if d.packing:
            check_packing(model)
        seed_everything(t.seed)  # adapter init does not depend on how much RNG the steps above consumed
        with streamer.shaped() if streamer is not None else contextlib.nullcontext():
            model = apply_adapter(model, recipe.adapter, recipe.quantized)
            trainable, total = count_parameters(model)
    except BaseException:
        if streamer is not None:
            streamer.close()  # its swap file goes with it
        raise
    if writer:
        atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return Prepared(model=model, tokenizer=tokenizer, train_examples=train_examples, eval_examples=eval_examples,
                    eval_pairs=pairs, device=device, run_dir=run_dir, trainable_params=trainable,
                    total_params=total, plan=plan, streamer=streamer)


def load_base(recipe: Recipe, source, device: torch.device):
    """(plan, base model, streamer). When the recipe's plan streams the decoder layers, the model is loaded layer by
    layer straight into the streamer's homes (:mod:`.streamed_load`): it never exists whole. Otherwise it is loaded
    whole (``from_pretrained``) and the engine streams it later if the plan says so (streamer None). The plan is made
    before anything loads, for the engine too: one plan per run."""
    from slimtune.offload import current_rss_bytes

    from .offloading import build_streamer, layer_tiers, offload_requested, plan_offload
    from .sizing import model_config
    from .streamed_load import load_streamed

    m, t = recipe.model, recipe.training
    plan = None
    if offload_requested(recipe):
        plan = plan_offload(recipe, model_config(recipe), current_rss_bytes())
        if layer_tiers(plan)[0] in ("cpu", "nvme"):
            loaded = load_streamed(m, source, device, quantization_config(m) if recipe.quantized else None,
                                   t.gradient_checkpointing)
            return plan, loaded.model, build_streamer(recipe, plan, loaded.model, device, fill=loaded.fill)
    return plan, load_model(m, source, device, recipe.quantized, t.gradient_checkpointing), None
