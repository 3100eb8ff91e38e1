"""Merge a LoRA/QLoRA adapter into a base that does not fit in memory: one decoder layer at a time.

:func:`~slimtune.finetune.export.merge_adapter` loads the whole base, wraps it with ``PeftModel`` and calls
``merge_and_unload``. :func:`merge_streamed` produces the same checkpoint without holding the base: the model is
built on meta with everything outside the decoder layers loaded (:mod:`.streamed_load`), and for each layer

1. the layer is read from the shards (4-bit quantized exactly as in training for QLoRA, then dequantized with
   ``bitsandbytes.functional.dequantize_4bit``, as ``merge_adapter`` does: the adapter was trained against
   ``dequant(W4)``),
2. peft's LoRA layers are injected into that layer alone (``peft.inject_adapter_in_model`` with the adapter's own
   ``LoraConfig``), the adapter's weights for it are loaded, and peft's own ``merge()`` adds each delta,
3. the merged layer is written into the output shards (:func:`~slimtune.offload.stream.shards.write_shards`) and
   dropped.

Host memory holds the resident weights, the adapter and about two layers. The output equals ``merge_adapter``'s
bit for bit (``tests/test_streamed_merge.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import slimtune.offload.stream.bnb_compat  # noqa: F401  (before peft: bitsandbytes without the kernel hub)

# isort: split
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from slimtune.offload.plan_phases import shard_bytes
from slimtune.offload.store.memory import fix_mmap_threshold, release_free_memory
from slimtune.offload.stream.shards import write_shards

from .errors import SlimtuneError
from .model import DTYPES, quantization_config
from .streamed_load import load_streamed, tied_away
from .streamed_save import saved_names

ADAPTER_FILE = "adapter_model.safetensors"


def merge_streamed(adapter_dir: Path, out_dir: Path, model_cfg, source: str, dtype: str, quantized: bool) -> None:
    """Write the merged model of ``adapter_dir`` + its base ``source`` into ``out_dir`` (an existing empty dir)."""
    target = DTYPES[dtype]
    fix_mmap_threshold()  # each layer's tensors go back to the OS when dropped, not into the heap
    loaded = load_streamed(model_cfg, source, torch.device("cpu"), quantization_config(model_cfg) if quantized
                           else None, gradient_checkpointing=False)
    model, prefix = loaded.model, loaded.prefix
    lora = LoraConfig.from_pretrained(str(adapter_dir))
    lora.inference_mode = True
    weights = load_file(adapter_dir / ADAPTER_FILE)
    if lora.modules_to_save or getattr(lora, "use_dora", False):
        raise SlimtuneError(f"{adapter_dir}: an adapter with modules_to_save or DoRA is merged whole (merge_adapter "
                            "with stream=False)")
    layer_shapes = {f"{prefix}.{i}.{n}": (p.shape, target) for i, layer in enumerate(loaded.layers)
                    for n, p in layer.named_parameters()}
    resident = {n: p for n, p in model.state_dict(keep_vars=True).items() if n not in layer_shapes}
    resident = {n: p for n, p in resident.items() if not tied_away(model, n)}
    shapes = {**{n: (p.shape, target) for n, p in resident.items()}, **layer_shapes}
    order = [n for n in model.state_dict() if n in shapes]
    saved_as = saved_names(model, {n: shapes[n] for n in order})
    entries = [(saved_as[n], shapes[n][0].numel() * target.itemsize) for n in order]
    model_name = {saved_as[n]: n for n in order}
    done: dict[int, dict[str, torch.Tensor]] = {}

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for saved in names:
            name = model_name[saved]
            if name in resident:
                out[saved] = resident[name].detach().to(target).cpu()
                continue
            i = int(name[len(prefix) + 1:].split(".", 1)[0])
            if i not in done:
                done.clear()  # one merged layer kept: shards follow the layer order
                release_free_memory()
                done[i] = _merged_layer(loaded, i, lora, weights, target, quantized)
            out[saved] = done[i][name]
        return out

    layer_bytes = max(sum(shapes[n][0].numel() for n in layer_shapes if n.startswith(f"{prefix}.{i}."))
                      for i in range(len(loaded.layers))) * target.itemsize
    write_shards(out_dir, entries, fetch, shard_bytes(layer_bytes))
    model.config.dtype = target
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = True
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)


def _merged_layer(loaded, i: int, lora: LoraConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                  quantized: bool) -> dict[str, torch.Tensor]:
    """Decoder layer ``i`` read, dequantized (QLoRA), LoRA-merged by peft: its tensors by model name."""
    from .export import dequantize_linears

    layer = loaded.layers[i]
    loaded.fill(i)
    if quantized:
        dequantize_linears(layer, dtype, torch.device("cpu"))
    layer.to(dtype)
    targets = _layer_targets(lora.target_modules, loaded.prefix, i)
    if not targets:  # no LoRA in this layer: it is saved as read
        out = {f"{loaded.prefix}.{i}.{n}": p.detach().clone() for n, p in layer.named_parameters()}
        layer.to_empty(device="meta")
        return out
    inject_adapter_in_model(dataclasses.replace(lora, target_modules=targets), layer, adapter_name="default")
    here = f"base_model.model.{loaded.prefix}.{i}."
    mine = {k[len(here):].replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in weights.items() if k.startswith(here)}
    result = layer.load_state_dict(mine, strict=False)
    lora_keys = {k for k in layer.state_dict() if ".lora_" in k}
    if result.unexpected_keys or lora_keys - set(mine):
        raise SlimtuneError(f"adapter weights for layer {i} do not fit its LoRA layers (unexpected "
                            f"{result.unexpected_keys[:3]}, missing {sorted(lora_keys - set(mine))[:3]})")
    with torch.no_grad():
        for name, module in list(layer.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, module.get_base_layer())
    out = {f"{loaded.prefix}.{i}.{n}": p.detach().clone() for n, p in layer.named_parameters()}
    layer.to_empty(device="meta")  # the layer's memory goes; the next layer is read into its own tensors
    return out


def _layer_targets(targets, prefix: str, i: int) -> set[str] | str:
    """The adapter's ``target_modules`` as names inside decoder layer ``i``: peft saves the full module paths it
    resolved (``model.layers.3.self_attn.q_proj``); short names (``q_proj``) match in every layer as they are."""
    if isinstance(targets, str):
        return targets
    if not any(t.startswith(prefix + ".") for t in targets):
        return set(targets)
    here = f"{prefix}.{i}."
    return {t[len(here):] for t in targets if t.startswith(here)}
