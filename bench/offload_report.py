"""The report of ``bench/offload.py``: per-row statistics, ratios, the Markdown table, bar chart and step timeline.

Pure functions of the rows the contenders' child processes return (see bench/offload.py for what is measured).
"""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path

GB = 1e9
OFFLOADED = ("deepspeed", "slimtune", "slimtune-8bit")  # rows compared with max(resident, io)


def summarize(runs: list[dict], budget: int) -> dict:
    """One contender over its runs (``--rounds``): the first failed run's row if any failed; else step time = median of
    the runs' medians (timed steps only), min/max over all timed steps, memory and disk bytes = median over runs,
    peak RSS / budget; losses, timeline and the rest from the first run; load averages of every run."""
    loads = [(r.get("load_before", math.nan), r.get("load_after", math.nan)) for r in runs]
    bad = next((r for r in runs if r["status"] != "ok"), None)
    if bad is not None:
        return {**bad, "loads": loads}
    timed = [r["step_s"][-r["timed_steps"]:] for r in runs]
    per_run = [statistics.median(t) for t in timed]

    def med(key):
        vals = [r[key] for r in runs]
        return None if None in vals else statistics.median(vals)

    return {**runs[0], "median_step_s": statistics.median(per_run), "runs_median_step_s": per_run,
            "min_step_s": min(min(t) for t in timed), "max_step_s": max(max(t) for t in timed), "loads": loads,
            **{k: med(k) for k in ("peak_rss_bytes", "steps_peak_rss_bytes", "disk_read_per_step",
                                   "disk_write_per_step")},
            "rss_over_budget": med("peak_rss_bytes") / budget}


def ratios(rows: dict) -> dict:
    """Step time offloaded / max(resident, io) per offloaded row, deepspeed / slimtune, mezo-stream / -resident."""
    ok = {n: r for n, r in rows.items() if r["status"] == "ok"}
    out = {}
    # the bound: the compute-only step of the same math (fp32 masters) when measured, else the bf16-only one
    base = next((n for n in ("resident-master", "resident") if n in ok), None)
    if base and "io" in ok:
        bound = max(ok[base]["median_step_s"], ok["io"]["median_step_s"])
        out.update({f"{n}_over_bound": ok[n]["median_step_s"] / bound for n in OFFLOADED if n in ok})
        out["bound_row"] = base
    if base == "resident-master" and "resident" in ok and "io" in ok:
        bf16 = max(ok["resident"]["median_step_s"], ok["io"]["median_step_s"])
        out.update({f"{n}_over_bf16_bound": ok[n]["median_step_s"] / bf16 for n in OFFLOADED if n in ok})
    if "deepspeed" in ok and "slimtune" in ok:
        out["deepspeed_over_slimtune_step"] = ok["deepspeed"]["median_step_s"] / ok["slimtune"]["median_step_s"]
        out["deepspeed_over_slimtune_rss"] = ok["deepspeed"]["peak_rss_bytes"] / ok["slimtune"]["peak_rss_bytes"]
    if "slimtune" in ok and "slimtune-8bit" in ok:
        s32, s8 = ok["slimtune"], ok["slimtune-8bit"]
        out["8bit_over_32bit_step"] = s8["median_step_s"] / s32["median_step_s"]
        if s32.get("disk_read_per_step") and s8.get("disk_read_per_step"):
            out["8bit_over_32bit_disk_bytes"] = ((s8["disk_read_per_step"] + s8["disk_write_per_step"])
                                                 / (s32["disk_read_per_step"] + s32["disk_write_per_step"]))
    if "mezo-resident" in ok and "mezo-stream" in ok:
        out["mezo_stream_over_resident"] = ok["mezo-stream"]["median_step_s"] / ok["mezo-resident"]["median_step_s"]
    return out


def _fmt(v, spec: str, none: str = "—") -> str:
    """``format(v, spec)``, or ``none`` for a missing value."""
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: dict, rat: dict, header: str, labels: dict) -> str:
    """Markdown: the header, one row per contender (``labels`` names them), then the cross-row ratios."""
    cols = ["contender", "status", "median step (s)", "min–max (s) [median of each run]", "step / max(resident, io)",
            "peak RSS (MiB)", "peak RSS in steps (MiB)", "RSS / budget", "disk read / step (GB)",
            "disk write / step (GB)", "loss first → last", "load avg before/after each run", "measured"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * 10 + "---|"]
    for n, r in rows.items():
        loads = ", ".join(f"{b:.1f}/{e:.1f}" for b, e in r.get("loads", []))
        if r["status"] != "ok":
            lines.append(f"| {labels[n]} | {r['status']} |" + " |" * 9 + f" {loads} | {r.get('measured_at', '')} |")
            continue
        mib, gb = (lambda v: _fmt(v and v / 2**20, ".0f")), (lambda v: _fmt(v and v / GB, ".2f"))
        losses = r.get("losses") or []
        lines.append(
            f"| {labels[n]} | ok | {r['median_step_s']:.2f} | {r['min_step_s']:.2f}–{r['max_step_s']:.2f} "
            f"[{', '.join(f'{x:.2f}' for x in r.get('runs_median_step_s', [r['median_step_s']]))}] | "
            f"{_fmt(rat.get(f'{n}_over_bound'), '.2f')} | {mib(r['peak_rss_bytes'])} | "
            f"{mib(r['steps_peak_rss_bytes'])} | {r['rss_over_budget']:.2f} | {gb(r['disk_read_per_step'])} | "
            f"{gb(r['disk_write_per_step'])} | " + (f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "—")
            + f" | {loads} | {r['measured_at']} |")
    x = {k: _fmt(v, ".2f") + "x" for k, v in rat.items() if k != "bound_row"}
    notes = [(f"deepspeed / slimtune: step {x['deepspeed_over_slimtune_step']}, peak RSS "
              f"{x['deepspeed_over_slimtune_rss']}") if x.get("deepspeed_over_slimtune_step") else
             "deepspeed / slimtune: needs both rows ok",
             f"mezo-stream / mezo-resident step: {x.get('mezo_stream_over_resident', 'needs both rows ok')}"]
    if x.get("8bit_over_32bit_step"):
        notes.append(f"8-bit / 32-bit AdamW state: step {x['8bit_over_32bit_step']}, disk bytes per step "
                     f"{x.get('8bit_over_32bit_disk_bytes', 'n/a')}")
    if rat.get("bound_row"):
        notes.append(f"step / max(resident, io) uses the {labels[rat['bound_row']]} row"
                     + "".join(f"; {n} over max(bf16-only resident, io): {x[f'{n}_over_bf16_bound']}"
                               for n in OFFLOADED if f"{n}_over_bf16_bound" in x))
    d = rows.get("deepspeed", {})
    if d.get("status") == "ok":
        files = ", ".join(f"{k} {v['files']} files {v['bytes'] / GB:.2f} GB" for k, v in d["swap_files"].items())
        notes.append(f"DeepSpeed swap files under nvme_path after the run: {files or 'none (not on NVMe!)'}")
    return "\n".join(lines + [""] + [f"- {x}" for x in notes]) + "\n"


LANE_ORDER = ("compute", "forward", "backward", "nvme read", "nvme write", "update", "h2d", "d2h")
LANE_COLORS = {"compute": "tab:blue", "forward": "tab:blue", "backward": "tab:cyan", "nvme read": "tab:green",
               "nvme write": "tab:red", "update": "tab:orange"}


def draw_timeline(events, path, title: str = "") -> None:
    """PNG timeline of one step: one lane per kind of work, one bar per event, so overlap (or its absence) shows.

    ``events``: ``(lane, start_s, end_s, label)`` tuples, times in seconds on any common clock (shifted so the
    earliest start is 0). Known lanes come in ``LANE_ORDER`` (compute, forward, backward, nvme read, nvme write,
    update, ...), others after them in order of appearance. A label is written inside its bar when it fits.
    """
    events = [tuple(e) for e in events]
    if not events:
        raise ValueError("draw_timeline needs at least one (lane, start_s, end_s, label) event")
    for e in events:
        if len(e) != 4 or not isinstance(e[0], str) or not all(isinstance(t, (int, float)) for t in e[1:3]):
            raise ValueError(f"each event must be (lane: str, start_s: float, end_s: float, label), got {e!r}")
        if not e[2] >= e[1]:
            raise ValueError(f"event {e!r} ends before it starts")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = list(dict.fromkeys(e[0] for e in events))
    lanes = [x for x in LANE_ORDER if x in seen] + [x for x in seen if x not in LANE_ORDER]
    t0 = min(e[1] for e in events)
    span = max(e[2] for e in events) - t0 or 1.0
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(lanes) + 1.4))
    for e in events:
        y, color = lanes.index(e[0]), LANE_COLORS.get(e[0], f"C{(4 + lanes.index(e[0])) % 10}")
        ax.barh(y, e[2] - e[1], left=e[1] - t0, height=0.7, color=color, edgecolor="white", linewidth=0.5)
        if e[3] and (e[2] - e[1]) > 0.02 * span * max(1, len(str(e[3])) / 3):
            ax.text((e[1] + e[2]) / 2 - t0, y, str(e[3]), ha="center", va="center", fontsize=7, color="white")
    busy = {lane: _union([(e[1], e[2]) for e in events if e[0] == lane]) for lane in lanes}
    ax.set_yticks(range(len(lanes)), [f"{x}\n{busy[x] / span:.0%} busy" for x in lanes], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="seconds into the step", xlim=(0, span), title=title or f"one step, {span:.2f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _union(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals (a lane with overlapping events, e.g. two I/O threads, is busy once)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        total += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    return total


def plot(rows: dict, budget: int, title: str, labels: dict, path: Path) -> None:
    """PNG: median step time and peak RSS per contender (failed rows: n/a), the CPU budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    ok = [n for n in names if rows[n]["status"] == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 5))
    for ax, key, unit, scale in [(ax_t, "median_step_s", "s", 1), (ax_m, "peak_rss_bytes", "MiB", 2**20)]:
        vals = [rows[n][key] / scale if n in ok else 0 for n in names]
        bars = ax.bar(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.2f}" if unit == "s" and n in ok else f"{v:.0f}" if n in ok else "n/a"
                                   for v, n in zip(vals, names)], fontsize=8)
        ax.set_xticks(range(len(names)), [labels[n] for n in names], rotation=30, ha="right", fontsize=8)
    if "deepspeed" in ok or "slimtune" in ok:
        ax_m.axhline(budget / 2**20, color="black", ls="--", lw=1, label=f"CPU budget {budget / 2**20:.0f} MiB")
        ax_m.legend(fontsize=8)
    ax_t.set(ylabel="s", title="median step time (after warm-up)")
    ax_m.set(ylabel="MiB", title="peak RSS of the process")
    fig.suptitle(textwrap.fill(title, 200), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
