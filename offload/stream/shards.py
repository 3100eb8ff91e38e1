"""Read a Hugging Face checkpoint's safetensors shards a few tensors at a time, by the *model's* parameter names.

The streamed load (``finetune/streamed_load.py``) asks for one decoder layer's tensors at a time, so this module
never holds more than that layer in memory:

* **Which file holds a tensor** comes from ``model.safetensors.index.json`` (``weight_map``), or the header of a
  single ``model.safetensors``: :func:`safetensors.safe_open` reads only the header to list keys.
* **Checkpoint key -> model name** is transformers' own rule, the one ``from_pretrained`` applies
  (``transformers.conversion_mapping.get_model_conversion_mapping`` and ``core_model_loading.rename_source_key``):
  the architecture's registered renames, the legacy ones (``LayerNorm.gamma`` -> ``.weight`` ...) and adding or
  removing the ``base_model_prefix``. A checkpoint whose tensors need a *converter* (several checkpoint tensors fused
  into one parameter, e.g. Mixtral's per-expert weights into one 3-D tensor) is refused with the converter named:
  that operation spans tensors a per-layer read may not have together.
* **Reading** opens a shard with ``safe_open`` for one call and closes it again, so the memory-mapped pages it
  touched leave the process's resident set with the call (a handle kept open for the whole load would keep up to a
  shard -- 5 GB and more -- of touched pages resident).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import OffloadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(OffloadError, ValueError):
    """A checkpoint the streamed load cannot read (no safetensors, a tensor it cannot map, a missing weight)."""


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it, for a ``save_pretrained`` directory."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{directory / INDEX} is not a safetensors index (no weight_map): {exc}") from None
        return {key: directory / name for key, name in weight_map.items()}
    if (directory / SINGLE).is_file():
        with safe_open(directory / SINGLE, framework="pt") as f:
            return {key: directory / SINGLE for key in f.keys()}
    found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise CheckpointError(
        f"{directory} has no {SINGLE} or {INDEX} (found: {', '.join(found) or 'no weight files'}); the streamed load "
        "reads safetensors only. Convert once with `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)` "
        "on a machine with the RAM for it, or keep the weights on the device (offload.params gpu)")


def model_names(model: torch.nn.Module, checkpoint_keys: list[str]) -> dict[str, str]:
    """Model state-dict name -> checkpoint key, by transformers' loading rules (see the module docstring).
    Raises :class:`CheckpointError` for a key that only a multi-tensor converter could load."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = dict.fromkeys(model.state_dict())
    out: dict[str, str] = {}
    for key in checkpoint_keys:
        name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converter is not None:
            raise CheckpointError(
                f"checkpoint tensor {key!r} is loaded by transformers through a weight converter ({converter!r} -> "
                f"{name!r}) that combines several tensors; {type(model).__name__} cannot be loaded layer by layer "
                "yet. Keep its weights on the device (offload.params gpu)")
        if name in meta:
            out[name] = key
    return out


class CheckpointShards:
    """A local checkpoint directory read by model names: :meth:`read` returns the named tensors, one shard open at a
    time. ``model`` (usually on the meta device) gives the names and the key mapping."""

    def __init__(self, directory: Path, model: torch.nn.Module | None):
        """``model`` None: the checkpoint's keys are the model's names (a slimtune checkpoint of streamed layers)."""
        self.directory = Path(directory)
        self.files = checkpoint_files(self.directory)
        # model name -> checkpoint key
        self.keys = model_names(model, list(self.files)) if model is not None else {k: k for k in self.files}
        self.bytes_read = 0

    def missing(self, names: list[str]) -> list[str]:
        """The names among ``names`` the checkpoint has no tensor for."""
        return [n for n in names if n not in self.keys]

    def check(self, names: list[str]) -> None:
        """Raise :class:`CheckpointError` naming the first of ``names`` the checkpoint lacks."""
        absent = self.missing(names)
        if absent:
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            raise CheckpointError(f"{self.directory}: the checkpoint has no tensor for {', '.join(absent[:3])}{more} "
                                  "(from_pretrained would initialize them randomly; the streamed load refuses)")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``names`` (model names), in the checkpoint's dtype, on the CPU."""
        self.check(names)
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[self.keys[name]]].append(name)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in group:
                    out[name] = f.get_tensor(self.keys[name])
                    self.bytes_read += out[name].numel() * out[name].element_size()
        return out


def shard_plan(entries: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """``(name, nbytes)`` in order -> consecutive groups of at most ``max_shard_bytes`` each (a tensor larger than
    that gets a shard of its own), the way ``save_pretrained(max_shard_size=...)`` splits a state dict."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return [s for s in shards if s]


def write_shards(directory: Path, entries: list[tuple[str, int]], fetch, max_shard_bytes: int,
                 metadata: dict | None = None) -> list[Path]:
    """Write a sharded safetensors checkpoint (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``,
    the layout ``save_pretrained`` writes) into ``directory``, one shard in memory at a time: ``fetch(names)``
    returns that shard's tensors (CPU). ``entries``: ``(name, nbytes)`` in the order to write."""
    from safetensors.torch import save_file

    directory = Path(directory)
    groups = shard_plan(entries, max_shard_bytes)
    weight_map: dict[str, str] = {}
    files = []
    for k, names in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = fetch(names)
        save_file({n: tensors[n].contiguous() for n in names}, directory / name, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, name))
        files.append(directory / name)
    total = sum(nbytes for _, nbytes in entries)
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files
