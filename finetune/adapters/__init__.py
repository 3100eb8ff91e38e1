"""Adapters: what gets trained, what a checkpoint holds, and how the result is saved.

``ADAPTERS`` maps ``adapter.type`` to a function ``(model, AdapterConfig, quantized) -> model to train``. Saved
adapters use peft's format (``adapter_config.json`` + ``adapter_model.safetensors``), so ``PeftModel.from_pretrained``
and every peft-aware tool load them; next to it ``slimtune.json`` records what peft does not: whether the base was
4-bit at training time (and with which settings), so inference and merging rebuild exactly the base the adapter
was trained against. MixLoRA adapters (``mixlora``, :mod:`.mixlora`) are saved in the official MixLoRA format instead
(:mod:`.mixlora_io`: peft has no MoE adapter type), with the same ``slimtune.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

import slimtune.offload.stream.bnb_compat  # noqa: F401  (before peft: bitsandbytes without the kernel hub)

# isort: split
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from slimtune.offload.store.atomic_io import atomic_dir

from ..errors import CheckpointError, SlimtuneError
from ..recipe import AdapterConfig
from .lora import apply_lora
from .mixlora import apply_mixlora, aux_loss, is_mixlora, router_load  # noqa: F401  (aux_loss, router_load: re-exported)
from .mixlora_io import extra_settings, save_mixlora

METADATA_FILE = "slimtune.json"


def apply_full(model: torch.nn.Module, cfg: AdapterConfig, quantized: bool) -> torch.nn.Module:
    """Full fine-tuning: every parameter trains. A 4-bit base cannot (its weights are frozen integer codes)."""
    if quantized or any(getattr(p, "quant_state", None) is not None for p in model.parameters()):
        raise SlimtuneError("adapter.type none (full fine-tuning) cannot train a 4-bit base: its weights are "
                            "quantized integer codes with no gradient; use adapter.type qlora, or set "
                            "model.load_in_4bit false")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


ADAPTERS: dict[str, Callable] = {"lora": apply_lora, "qlora": apply_lora, "mixlora": apply_mixlora,
                                  "none": apply_full}


def apply_adapter(model: torch.nn.Module, cfg: AdapterConfig, quantized: bool) -> torch.nn.Module:
    """Return the model to train for ``cfg.type`` (a ``PeftModel`` for lora/qlora, ``model`` itself with its
    adapter injected for mixlora, ``model`` itself for none)."""
    if cfg.type not in ADAPTERS:
        raise SlimtuneError(f"adapter.type {cfg.type!r} is not known; choose one of {', '.join(ADAPTERS)}")
    return ADAPTERS[cfg.type](model, cfg, quantized)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint saves: the adapter weights (peft's keys, as in ``adapter_model.safetensors``), or for
    full fine-tuning every trainable parameter (tied weights once)."""
    if isinstance(model, PeftModel):
        return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state_dict`. Strict: any missing/unexpected key or shape mismatch is an error
    (it means the checkpoint came from a different adapter or model setup)."""
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:5])}{more}")
        raise CheckpointError("the checkpoint's trainable weights do not fit this model (was adapter.r, "
                              "target_modules, adapter.type or the base model changed?): " + "; ".join(parts))
    if isinstance(model, PeftModel):
        result = set_peft_model_state_dict(model, sd)
        if result.unexpected_keys:
            raise CheckpointError(f"peft did not load {len(result.unexpected_keys)} key(s): "
                                  f"{', '.join(result.unexpected_keys[:5])}")
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in sd.items():
            params[name].copy_(value)


def save_adapter(model: torch.nn.Module, out_dir: Path, tokenizer, write_model=None) -> None:
    """Write a loadable result to ``out_dir`` (atomically: a temp dir renamed into place).

    lora/qlora: peft format (``adapter_config.json`` + ``adapter_model.safetensors``) + tokenizer + ``slimtune.json``.
    mixlora: the official MixLoRA format (see :mod:`.mixlora_io`) + tokenizer + ``slimtune.json``.
    none: the full model (``write_model(dir)`` when given -- the engine's streamed save --, else
    ``save_pretrained``; safetensors) + tokenizer + ``slimtune.json``.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    quantized = bool(getattr(base, "is_loaded_in_4bit", False))
    mixlora = is_mixlora(model)
    meta = {
        "adapter_type": "mixlora" if mixlora else ("qlora" if quantized else "lora") if isinstance(model, PeftModel)
        else "none",
        "quantized": quantized,
        "quantization": _quantization_meta(base) if quantized else None,
        "dtype": _dtype_name(getattr(base.config, "dtype", None) or base.dtype),
        "base_revision": getattr(base.config, "_commit_hash", None),  # hub commit the base was loaded from
    }
    if mixlora:
        meta["mixlora"] = extra_settings(model.mixlora_settings)
    with atomic_dir(out_dir) as tmp:
        if mixlora:
            save_mixlora(model, tmp)
        elif write_model is not None:
            write_model(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_metadata(directory: Path) -> dict:
    """``slimtune.json`` of a saved adapter/model ({} for one not written by slimtune)."""
    path = Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _quantization_meta(base: torch.nn.Module) -> dict:
    q = base.config.quantization_config
    get = q.get if isinstance(q, dict) else lambda k, d=None: getattr(q, k, d)
    return {
        "quant_type": get("bnb_4bit_quant_type"),
        "double_quant": bool(get("bnb_4bit_use_double_quant")),
        "compute_dtype": _dtype_name(get("bnb_4bit_compute_dtype")),
    }


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"
