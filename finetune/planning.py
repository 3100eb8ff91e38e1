"""A recipe's offload plan: the recipe read into the planner's plain inputs (:class:`~slimtune.offload.plan_inputs.
PlanRequest`, the model's :func:`~.sizing.block_sizes`) and :func:`slimtune.offload.plan.make_plan` run on them.
``slimtune plan`` and the trainer both plan through :func:`plan_recipe`, so they plan the same run."""

from __future__ import annotations

from slimtune.offload.plan import Plan, make_plan
from slimtune.offload.plan_inputs import PlanRequest
from slimtune.optimizers import ZEROTH_ORDER

from .recipe import Recipe

VALUE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1, "uint8": 1}


def plan_request(recipe: Recipe, tokens_per_step: int | None = None, checkpoint_value_bytes: int = 4
                 ) -> PlanRequest:
    """The planner's view of ``recipe``. ``tokens_per_step`` defaults to full rows: ``per_device_train_batch_size x
    data.max_length x gradient_accumulation_steps``. ``checkpoint_value_bytes``: bytes per value the checkpoint
    stores (what a streamed load reads per layer; from config.json's dtype, fp32 when it does not say)."""
    t, o, off, m = recipe.training, recipe.optimizer, recipe.offload, recipe.model
    compute = ("bfloat16" if t.bf16 else m.quantization.compute_dtype if recipe.quantized else m.dtype)
    return PlanRequest(
        tokens_per_step=tokens_per_step or (t.per_device_train_batch_size * recipe.data.max_length
                                            * t.gradient_accumulation_steps),
        device=off.device, gpu_memory=off.gpu_memory, cpu_memory=off.cpu_memory, nvme_dir=off.nvme_dir,
        params=off.params, gradients=off.gradients, optimizer_state=off.optimizer_state, prefetch=off.prefetch,
        full=recipe.adapter.type == "none", zeroth_order=o.name in ZEROTH_ORDER,
        n_samples=getattr(o, "n_samples", 1), per_layer=getattr(o, "per_layer", False),
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing, compute_dtype=compute,
        lora_on_full_precision=recipe.adapter.type == "lora" and not recipe.quantized,
        value_bytes=VALUE_BYTES[m.dtype], checkpoint_value_bytes=checkpoint_value_bytes)


def plan_recipe(recipe: Recipe, sizes=None, bandwidths: dict[str, float] | None = None,
                tokens_per_step: int | None = None, runtime_bytes: int | None = None, config=None) -> Plan:
    """Plan ``recipe``'s run. ``sizes``: :func:`~.sizing.block_sizes` output (computed here when None; ``config`` is
    the built model's config, for exact numbers). The rest as :func:`~slimtune.offload.plan.make_plan`."""
    from .sizing import model_config

    if sizes is None:
        from .sizing import block_sizes

        sizes = block_sizes(recipe, config=config)
    stored = getattr(config if config is not None else model_config(recipe), "dtype", None)
    stored = VALUE_BYTES.get(str(stored).removeprefix("torch."), 4) if stored is not None else 4
    if recipe.model.architecture is not None:
        stored = VALUE_BYTES[recipe.model.dtype]  # the run saves its inline base in model.dtype
    return make_plan(plan_request(recipe, tokens_per_step, stored), sizes, bandwidths=bandwidths,
                     runtime_bytes=runtime_bytes)
