"""What the planner tells the user: the refusal of a recipe that fits no placement (the numbers per budget, by
phase, and what to change) and the notes under a plan (:mod:`.plan` builds both with these)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .plan_inputs import PlanRequest
from .units import format_size

if TYPE_CHECKING:
    from .plan import Plan

_LABELS = {"params": "params", "adapter": "adapter weights", "grads": "gradients", "state": "optimizer state",
           "master": "fp32 masters", "activations": "activations", "buffers": "buffers", "runtime": "runtime"}


def _breakdown_text(plan: Plan, tiers: tuple[str, ...]) -> str:
    items: dict[str, int] = {}
    for tier in tiers:
        for cat, n in plan.breakdown[tier].items():
            items[cat] = items.get(cat, 0) + n
    if "cpu" in tiers:
        items["runtime"] = plan.runtime_bytes
    parts = [f"{_LABELS[c]} {format_size(n)}" for c, n in sorted(items.items(), key=lambda kv: -kv[1]) if n]
    return ", ".join(parts)


def refusal(off: PlanRequest, plan: Plan, n_tried: int) -> str:
    """What the closest plan needs, per budget it exceeds, and what to change."""
    p_tier, g_tier, s_tier = plan.blocks[1].params_tier, plan.blocks[0].grads_tier, plan.blocks[0].state_tier
    full = not off.frozen_base
    lines = []
    for tier, need, budget in plan.problems():
        if tier == "gpu":
            lines.append(f"needs {format_size(need)} on the {plan.device} device ({_breakdown_text(plan, ('gpu',))}), "
                         f"offload.gpu_memory is {format_size(budget)}")
        elif tier == "cpu":
            tiers, where = (("cpu", "gpu"), "host memory (device + cpu tiers + runtime)") if plan.device == "cpu" \
                else (("cpu",), "host memory (cpu tier + runtime)")
            by_phase = plan.phase_host_bytes()
            phase = max(by_phase, key=by_phase.get)
            during = "" if phase == "train" else (
                f" while it {'loads the base layer by layer' if phase == 'load' else 'saves the model'}; training "
                f"needs {format_size(plan.host_bytes)}")
            lines.append(f"needs {format_size(need)} of {where}{during} ({_breakdown_text(plan, tiers)}), "
                         f"offload.cpu_memory is {format_size(budget)}")
        else:
            lines.append(f"needs {format_size(need)} in offload.nvme_dir ({_breakdown_text(plan, ('nvme',))}), "
                         f"{off.nvme_dir} has {format_size(budget)} free")
    fixed = [f"offload.{k}: {getattr(off, k)}" for k in ("params", "gradients", "optimizer_state")
             if getattr(off, k) != "auto"]
    fixes = []
    if fixed:
        fixes.append(f"set {' / '.join(fixed)} to auto (or another tier) so the planner can move it")
    if not off.nvme_dir:
        what = "optimizer state and params" if full else "params"
        fixes.append(f"set offload.nvme_dir (a local NVMe/SSD directory) so {what} can move to NVMe")
    over = {tier for tier, _, _ in plan.problems()}
    if "gpu" in over or (plan.device == "cpu" and "cpu" in over):
        fixes.append("lower training.per_device_train_batch_size or data.max_length"
                     + ("" if plan.checkpointing else ", or set training.gradient_checkpointing: true")
                     + (", lower offload.prefetch" if off.prefetch > 1 and p_tier != "gpu" else "")
                     + (", or use adapter.type qlora (a 4-bit base)" if off.lora_on_full_precision else ""))
    fixes += [f"raise offload.{'gpu_memory' if t == 'gpu' else 'cpu_memory'}" for t in ("gpu", "cpu") if t in over]
    if "nvme" in over:
        fixes.append("free space there or point offload.nvme_dir at a larger disk")
    placed = f"params {p_tier}, gradients {g_tier}, optimizer state {s_tier}"
    return (f"no placement fits ({n_tried} tried; the closest, {placed}, " + "; and ".join(lines)
            + "). To fix: " + "; or ".join(fixes))


def plan_notes(off: PlanRequest, plan: Plan) -> list[str]:
    """Notes under a plan that fits: recompute forced by streaming, adapter state off the device, NVMe wear."""
    notes = []
    streamed = plan.blocks[1].params_tier != "gpu"
    if streamed and not off.gradient_checkpointing and not off.zeroth_order:
        notes.append("streamed layers are recomputed in backward (per-block activation checkpointing), whatever "
                     "training.gradient_checkpointing says")
    if not streamed and off.prefetch > 1:
        notes.append(f"offload.prefetch {off.prefetch} is unused: no layer streams")
    if not off.full and plan.blocks[0].state_tier != "gpu":
        adapter = sum(b.state_bytes + b.master_bytes for b in plan.blocks)
        notes.append(f"adapter state off the device ({format_size(adapter)}): keeping it on the GPU would be faster "
                     "(offload.optimizer_state auto)")
    notes.append("activations and FLOPs assume full rows: micro-batches of per_device_train_batch_size x "
                 "data.max_length tokens (padded: the attention mask is counted); shorter data needs less")
    if plan.blocks[0].state_tier == "nvme":
        written = plan.link_bytes["cpu->nvme"]
        notes.append(f"NVMe writes {format_size(written)} per step ({format_size(written * 1000)} per 1000 steps): "
                     "mind the drive's rated TBW")
    return notes
