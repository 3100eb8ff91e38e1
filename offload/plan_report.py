"""A :class:`~.plan.Plan` for people: the text table ``slimtune plan`` prints and the PNG bar chart it writes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .units import format_size

if TYPE_CHECKING:
    from .plan import Plan

_CAT_HEAD = {"params": "params", "adapter": "adapter", "grads": "grads", "state": "state", "master": "masters",
             "activations": "activations", "buffers": "buffers", "runtime": "runtime"}
_BUDGET_OF = {"gpu": "device (offload.gpu_memory)", "cpu": "host (offload.cpu_memory)",
              "nvme": "nvme (free space in offload.nvme_dir)"}
_COLORS = {"params": "#4c72b0", "adapter": "#8172b2", "grads": "#dd8452", "state": "#55a868", "master": "#8c8c3c",
           "activations": "#c44e52", "buffers": "#937860", "runtime": "#b0b0b0"}


def _size(n: int) -> str:
    return format_size(n) if n else "-"


def _row(b) -> tuple:
    """A block's columns (without its name): what makes consecutive layers mergeable into one row."""
    trains = b.trainable_bytes > 0
    return (format_size(b.param_bytes), b.params_tier, format_size(b.trainable_bytes) if trains else "-",
            f"{format_size(b.grad_bytes)} {b.grads_tier}" if b.grad_bytes else "-",
            f"{format_size(b.state_bytes)} {b.state_tier}" if b.state_bytes else "-",
            format_size(b.master_bytes) if b.master_bytes else "-", b.update_on if trains else "-")


def _groups(plan: Plan) -> list[tuple[str, tuple]]:
    """Rows, with runs of identical decoder layers merged ("layers.0-31 x32")."""
    rows: list[tuple[str, tuple]] = []
    run: list = []

    def flush():
        if run:
            first, last = run[0].name.split(".")[1], run[-1].name.split(".")[1]
            name = run[0].name if len(run) == 1 else f"layers.{first}-{last} x{len(run)}"
            rows.append((name, _row(run[0])))
            run.clear()

    for b in plan.blocks:
        if b.name.startswith("layers.") and (not run or _row(run[0]) == _row(b)):
            run.append(b)
            continue
        flush()
        if b.name.startswith("layers."):
            run.append(b)
        else:
            rows.append((b.name, _row(b)))
    flush()
    return rows


def _fmt_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


def table(plan: Plan) -> str:
    """Per-block placement, tier peaks vs budgets (item by item), bytes per link, the step-time bound, notes."""
    title = (f"plan: {plan.source or 'model'} | device {plan.device} | prefetch {plan.prefetch} | activation "
             f"checkpointing {'on' if plan.checkpointing else 'off'} | {plan.tokens_per_step} tokens per step")
    lines = [title, ""]
    header = ["block", "params", "at", "trainable", "grads", "optimizer state", "fp32 masters", "update"]
    lines += _fmt_table(header, [[name, *cols] for name, cols in _groups(plan)])
    lines.append("")
    cats = [c for c in _CAT_HEAD if c == "runtime" or any(plan.breakdown[t].get(c) for t in plan.breakdown)]
    rows = []
    budget_of = {"gpu": plan.budgets.get("gpu"), "cpu": None, "nvme": plan.budgets.get("nvme")}
    for tier in ("gpu", "cpu", "nvme"):
        label = "device (host memory)" if tier == "gpu" and plan.device == "cpu" else tier
        budget = budget_of[tier]
        rows.append([label, format_size(plan.peak_bytes[tier]), "-" if budget is None else format_size(budget)]
                    + [_size(plan.breakdown[tier].get(c, 0)) for c in cats])
    host = _host(plan)
    budget = plan.budgets.get("cpu")
    rows.append(["host = " + ("device + cpu" if plan.device == "cpu" else "cpu") + " + runtime",
                 format_size(plan.host_bytes), "-" if budget is None else format_size(budget)]
                + [_size(host[c]) for c in cats])
    lines += _fmt_table(["tier", "peak", "budget"] + [_CAT_HEAD[c] for c in cats], rows)
    phases = {k: v for k, v in plan.phase_host_bytes().items() if v}
    if len(phases) > 1:
        lines.append("host memory by phase: " + " | ".join(f"{k} {format_size(v)}" for k, v in phases.items())
                     + " (load: the base read layer by layer into its homes; save: the full model written shard by "
                       "shard)")
    lines.append("")
    links = " | ".join(f"{k} {format_size(v)}" for k, v in plan.link_bytes.items())
    lines.append(f"bytes per optimizer step: {links}")
    if plan.step_terms:
        bound_by = max(plan.step_terms, key=plan.step_terms.get)
        rates = {"compute": ("flops", "FLOP/s"), "gpu<->cpu": ("cpu->gpu", "B/s"), "nvme": ("nvme->cpu", "B/s"),
                 "cpu update": ("memcpy", "B/s")}
        terms = []
        for k, v in plan.step_terms.items():
            key, unit = rates[k]
            rate = plan.bandwidths.get(key)
            terms.append(f"{k} {v:.3g} s" + (f" at {_rate(rate, unit)}" if rate else ""))
        lines.append(f"step time >= {plan.step_time_lower_bound_s:.3g} s, bound by {bound_by}: " + " | ".join(terms))
    over = plan.problems()
    lines.append("fits every budget" if not over else
                 "OVER BUDGET: " + ", ".join(f"{_BUDGET_OF[t]} needs {format_size(n)} > {format_size(b)}"
                                             for t, n, b in over))
    if plan.notes:
        lines.append("notes:")
        lines += [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


def _host(plan: Plan) -> dict[str, int]:
    """What ``offload.cpu_memory`` bounds, by category: the cpu tier (+ the device tier on a CPU device) + runtime."""
    tiers = ("gpu", "cpu") if plan.device == "cpu" else ("cpu",)
    host = {c: sum(plan.breakdown[t].get(c, 0) for t in tiers) for c in _CAT_HEAD}
    host["runtime"] = plan.runtime_bytes
    return host


def _rate(value: float, unit: str) -> str:
    if unit == "FLOP/s":
        return f"{value / 1e12:.3g} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.3g} GFLOP/s"
    return f"{format_size(value)}/s"


def plot(plan: Plan, path) -> str:
    """Stacked bars per tier (one colour per category) with each tier's budget as a dashed line; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("device" if plan.device == "cpu" else "gpu", plan.breakdown["gpu"], plan.budgets.get("gpu")),
            ("cpu", plan.breakdown["cpu"], None),
            ("nvme", plan.breakdown["nvme"], plan.budgets.get("nvme")),
            ("host\n(" + ("device + " if plan.device == "cpu" else "") + "cpu + runtime)", _host(plan),
             plan.budgets.get("cpu"))]
    tallest = max([sum(b.values()) for _, b, _ in bars] + [1])
    # a budget far above every bar (a 2 TB disk under a 1 GB plan) is written at the top instead of drawn
    top = max([tallest] + [v for _, _, v in bars if v is not None and v <= 3 * tallest])
    scale, unit = next((s, u) for s, u in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                       if top >= s)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    bottoms = [0.0] * len(bars)
    for cat in _CAT_HEAD:
        values = [b.get(cat, 0) / scale for _, b, _ in bars]
        if any(values):
            ax.bar(range(len(bars)), values, bottom=bottoms, color=_COLORS[cat], label=_CAT_HEAD[cat], width=0.6)
            bottoms = [x + v for x, v in zip(bottoms, values)]
    labelled = False
    for i, (_, _, budget) in enumerate(bars):
        if budget is None:
            continue
        if budget > top:
            ax.annotate(f"budget {format_size(budget)} ^", (i, top * 1.1 / scale), ha="center", fontsize=8)
            continue
        ax.hlines(budget / scale, i - 0.4, i + 0.4, colors="black", linestyles="--",
                  label=None if labelled else "budget")
        labelled = True
    ax.set_ylim(0, top * 1.2 / scale)
    ax.set_xticks(range(len(bars)), [name for name, _, _ in bars])
    ax.set_ylabel(unit)
    tiers = plan.blocks[1]
    ax.set_title(f"{plan.source}\nparams {tiers.params_tier}, grads {tiers.grads_tier}, state {tiers.state_tier}; "
                 f"step >= {plan.step_time_lower_bound_s:.3g} s", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
