"""One definition of what a run reports: metrics.jsonl, the progress bar, TensorBoard/W&B, and the PNG plots.

Every logged record has ``step``, ``loss``, ``lr``, ``tokens_per_s``, ``peak_rss_bytes`` (and ``peak_gpu_bytes`` on
CUDA; ``router_load`` and ``router_load_per_layer`` for MixLoRA); eval records have ``eval_loss`` and the task
metric. ``metrics.jsonl`` is appended and flushed per record,
so a killed run keeps what it logged; on resume, records past the checkpoint's step are dropped (atomically).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from slimtune.offload import format_bytes
from slimtune.offload.store.atomic_io import atomic_write_text

from .errors import SlimtuneError


class Reporters:
    """Optional external loggers named in ``output.report_to`` (tensorboard, wandb)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any]):
        self.tb = self.wandb_run = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SlimtuneError("output.report_to tensorboard needs the tensorboard package: "
                                    "pip install 'slimtune[tensorboard]' (or remove it from report_to)") from None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise SlimtuneError("output.report_to wandb needs the wandb package: pip install 'slimtune[wandb]' "
                                    "(or remove it from report_to)") from None
            self.wandb_run = wandb.init(dir=str(run_dir), config=config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class MetricsLog:
    """Append-only JSONL log of training and eval records, plus the progress bar."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, report_to: list[str],
                 config: dict[str, Any], progress: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if self.path.exists():  # resumed run: keep what happened up to the checkpoint, drop the rest
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept
        self.file = open(self.path, "a", encoding="utf-8")
        self.reporters = Reporters([n for n in report_to if n != "none"], run_dir, config)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.5)
        self._window_start = time.perf_counter()
        self._window_tokens = 0

    def count_tokens(self, n: int) -> None:
        self._window_tokens += n

    def tokens_per_s(self) -> float:
        """Tokens processed per second since the last logged record (then starts a new window)."""
        now = time.perf_counter()
        rate = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_start, self._window_tokens = now, 0
        return rate

    def log(self, record: dict[str, Any]) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.reporters.log(record)
        if self.bar is not None and record.get("loss") is not None:
            peak = record.get("peak_gpu_bytes") or record.get("peak_rss_bytes")
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", mem=format_bytes(peak), refresh=False)
        if "eval_loss" in record:
            self.write(format_eval(record))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        self.reporters.close()


def format_eval(record: dict[str, Any]) -> str:
    """One line for an eval record: its loss and task metrics."""
    loss = record["eval_loss"]
    parts = [f"eval @ step {record['step']}: loss {'nan' if loss is None else f'{loss:.4f}'}"]
    for key, value in record.items():
        if key.startswith("eval_") and key != "eval_loss" and isinstance(value, float):
            parts.append(f"{key[5:]} {value:.3f}")
    return ", ".join(parts)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a torn last line from a kill is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_plots(records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """loss.png (train and eval loss vs step), memory.png (RSS / GPU peak vs step) and, for MixLoRA runs,
    router_load.png (each expert's share of the routed tokens vs step, averaged over layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("eval_loss") is not None]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    written.append(_finish(fig, ax, "loss (nats/token)", "slimtune: loss", run_dir / "loss.png"))

    mem = [r for r in records if r.get("peak_rss_bytes") is not None]
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in mem]
        ax.plot(steps, [r["rss_bytes"] / 2**20 for r in mem], label="RSS (MiB)")
        ax.plot(steps, [r["peak_rss_bytes"] / 2**20 for r in mem], "--", label="peak RSS (MiB)")
        if any(r.get("peak_gpu_bytes") for r in mem):
            ax.plot(steps, [(r.get("peak_gpu_bytes") or 0) / 2**20 for r in mem], label="peak GPU (MiB)")
        ax.set_ylim(bottom=0)  # absolute scale: a few MiB of allocator noise should look like noise
        written.append(_finish(fig, ax, "MiB", "slimtune: memory", run_dir / "memory.png"))

    load = [r for r in records if r.get("router_load")]
    if load:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in load]
        for e, shares in enumerate(zip(*(r["router_load"] for r in load))):
            ax.plot(steps, shares, label=f"expert {e}")
        ax.axhline(1 / len(load[0]["router_load"]), color="gray", linestyle=":", label="balanced")
        ax.set_ylim(bottom=0)
        written.append(_finish(fig, ax, "share of routed tokens", "slimtune: MixLoRA router load",
                               run_dir / "router_load.png"))
    return written


def _finish(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
