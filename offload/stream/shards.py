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

    def __init__(self, directory: Path, model: torch.nn.Module):
        self.directory = Path(directory)
        self.files = checkpoint_files(self.directory)
        self.keys = model_names(model, list(self.files))  # model name -> checkpoint key
        self.bytes_read = 0

    def missing(self, names: list[str]) -> list[str]:
        """The names among ``names`` the checkpoint has no tensor for."""
        return [n for n in names if n not in self.keys]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``names`` (model names), in the checkpoint's dtype, on the CPU."""
        absent = self.missing(names)
        if absent:
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            raise CheckpointError(f"{self.directory}: the checkpoint has no tensor for {', '.join(absent[:3])}{more} "
                                  "(from_pretrained would initialize them randomly; the streamed load refuses)")
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
