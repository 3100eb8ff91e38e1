"""What `slimtune train` prints before and after a run."""

from __future__ import annotations

from slimtune.finetune.trainer import example_count
from slimtune.offload import format_bytes
from slimtune.optimizers import optimizer_state_bytes


def format_header(recipe, prepared, steps: int, optimizer=None) -> str:
    """The lines ``slimtune train`` prints before training: run dir, model, adapter, data, optimizer."""
    m, a, t = recipe.model, recipe.adapter, recipe.training
    model = m.name_or_path or (f"inline llama ({m.architecture.num_hidden_layers} layers, hidden "
                               f"{m.architecture.hidden_size}, vocab {len(prepared.tokenizer)})")
    pct = 100 * prepared.trainable_params / max(prepared.total_params, 1)
    eval_rows = len(prepared.eval_examples or [])
    n_train = example_count(prepared.train_examples)
    return "\n".join([
        f"slimtune train -> {prepared.run_dir}",
        f"  model      {model}{' 4-bit ' + m.quantization.quant_type if recipe.quantized else ''}, {m.dtype}"
        f"{', bf16 autocast' if t.bf16 else ''}, on {prepared.device}",
        f"  adapter    {a.type}" + (f" r={a.r} alpha={a.alpha:g}" if a.type != "none" else "")
        + f"; trainable {prepared.trainable_params:,} of {prepared.total_params:,} parameters ({pct:.2f}%)",
        f"  data       {'streamed' if n_train is None else n_train} train / {eval_rows} eval examples "
        f"({recipe.data.describe()})",
        f"  optimizer  {recipe.optimizer.name} lr {t.learning_rate:g}, {t.lr_scheduler_type} schedule; {steps} steps "
        f"x {t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation"
        + (f"; state {format_bytes(optimizer_state_bytes(optimizer))}" if optimizer is not None else "")
        + (", per-layer updates in backward" if getattr(recipe.optimizer, "per_layer", False) else ""),
    ])


def format_summary(result) -> str:
    """The lines ``slimtune train`` prints after training: time, eval before/after, memory, outputs."""
    lines = ["", f"done: {result.steps} steps in {result.train_seconds:.1f} s"]
    before, after = result.eval_before or {}, result.eval_after or {}
    for key, label in (("eval_loss", "eval loss"), ("eval_exact_match", "exact match")):
        if key in after:
            b = before.get(key)
            fmt = (lambda v: f"{v:.1%}") if key == "eval_exact_match" else (lambda v: f"{v:.4f}")
            lines.append(f"  {label:<12} {fmt(b) if b is not None else '-':>8}  ->  {fmt(after[key]):>8}")
    peak = f"peak RSS {format_bytes(result.peak_rss_bytes)}"
    if result.peak_gpu_bytes is not None:
        peak += f", peak GPU {format_bytes(result.peak_gpu_bytes)}"
    lines.append(f"  memory       {peak}")
    lines.append(f"  adapter      {result.adapter_dir}")
    lines.append(f"  metrics      {result.run_dir / 'metrics.jsonl'}, plots in {result.run_dir}")
    for prompt, reference, generated in result.samples[:1]:
        lines.append("  sample")
        lines += ["    " + line for line in prompt.rstrip().splitlines()]
        lines.append(f"    -> {generated.strip()!r} (reference {reference.strip()!r})")
    return "\n".join(lines)
