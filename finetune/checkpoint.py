"""Checkpoints that survive a kill and resume the exact trajectory.

Layout of ``<output_dir>/checkpoints/checkpoint-<step>/``:

* ``trainable.safetensors``: the trainable weights (LoRA/QLoRA adapter, or every parameter for full fine-tuning),
* ``optimizer.pt``, ``scheduler.pt``: tensor-only state dicts (``torch.load(weights_only=True)`` loads them),
* ``rng.pt``: torch CPU/CUDA, Python and NumPy RNG states (as tensors and plain numbers),
* ``trainer_state.json``: step, data position (epoch, micro-batch within the epoch), tokens seen,
* ``recipe.yaml``: the resolved recipe, compared with the resuming recipe.

Each checkpoint is written to a temporary directory and renamed into place (see :mod:`.io`), so a kill at any
moment leaves the previous checkpoint intact; ``save_total_limit`` removes the oldest after a successful save.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from slimtune.offload.store.atomic_io import atomic_dir, remove_stale_temps

from .errors import CheckpointError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Keys that may change between a run and its resumption without changing the trajectory.
RESUME_SAFE_KEYS = (
    "training.resume_from_checkpoint", "training.eval_steps", "output.", "data.metric_samples",
    "data.max_new_tokens", "data.num_proc", "offload.device",
)
# Keys that change the schedule but are a normal thing to do when extending a run: warned, not refused.
RESUME_WARN_KEYS = ("training.max_steps", "training.num_train_epochs")


@dataclass
class TrainerState:
    """Where the loop is: optimizer steps done, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    rows_in_epoch: int | list[int] = 0  # data.streaming: the stream's position in the epoch (streaming.Stream)


def checkpoint_dir(run_dir: Path) -> Path:
    """Where the next checkpoint of a run goes (``<run_dir>/checkpoints``)."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def rng_state() -> dict[str, Any]:
    """Every generator's state (Python, numpy, torch CPU and CUDA), as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(obj: Any) -> Any:
    return [_to_plain(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuple(obj: Any) -> Any:
    return tuple(_to_tuple(o) for o in obj) if isinstance(obj, list) else obj


def save_checkpoint(run_dir: Path, state: TrainerState, trainable: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], scheduler: Any, recipe: dict[str, Any],
                    save_total_limit: int | None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically, then prune old checkpoints beyond ``save_total_limit``.

    ``extra(tmp_dir)`` writes more files into the checkpoint before it is renamed into place (the offload engine's
    masters and optimizer state, streamed block by block into ``offload/``)."""
    target = checkpoint_dir(run_dir) / f"checkpoint-{state.step}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        if extra is not None:
            extra(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if save_total_limit is not None:
        for old in list_checkpoints(run_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: trainer state, trainable weights, optimizer, scheduler, RNG, recipe."""
    path: Path
    state: TrainerState
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    recipe: dict[str, Any]


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (tensor-only, ``weights_only=True``)."""
    path = Path(path)
    needed = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "recipe.yaml"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete slimtune checkpoint (missing {', '.join(missing)})")
    return LoadedCheckpoint(
        path=path,
        state=TrainerState(**json.loads((path / "trainer_state.json").read_text())),
        trainable=load_file(path / "trainable.safetensors"),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        scheduler=torch.load(path / "scheduler.pt", weights_only=True),
        rng=torch.load(path / "rng.pt", weights_only=True),
        recipe=yaml.safe_load((path / "recipe.yaml").read_text()),
    )


def find_resume_checkpoint(run_dir: Path, resume: bool | str | None) -> Path | None:
    """The checkpoint named by ``training.resume_from_checkpoint`` (true = latest in run_dir), or None."""
    if resume in (None, False):
        return None
    remove_stale_temps(checkpoint_dir(run_dir))
    if resume is True:
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"training.resume_from_checkpoint is true but {checkpoint_dir(run_dir)} holds no "
                                  "checkpoint; set it to false to start a new run, or to a checkpoint path")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"training.resume_from_checkpoint: {path} is not a directory (use true for the "
                              "latest checkpoint in output.output_dir)")
    return path


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``: nested recipe dicts as dotted keys."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, warned) dotted keys whose values differ between the checkpoint's recipe and the current one."""
    old, new = flatten(saved), flatten(current)
    refused, warned = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key.startswith(RESUME_SAFE_KEYS):
            continue
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        (warned if key in RESUME_WARN_KEYS else refused).append(line)
    return refused, warned
