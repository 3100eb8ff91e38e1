"""Use a trained result: load it for inference, generate text, merge an adapter into its base.

A saved adapter directory (see :func:`slimtune.finetune.adapters.save_adapter`) holds peft's files, the tokenizer
and ``slimtune.json``; the latter says whether the base was 4-bit during training, so the base is rebuilt the way
the adapter saw it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import slimtune.offload.stream.bnb_compat  # noqa: F401  (before peft: bitsandbytes without the kernel hub)

# isort: split
from peft import PeftModel
from transformers import AutoTokenizer

from slimtune.offload.store.atomic_io import atomic_dir

from .adapters import METADATA_FILE, read_metadata
from .adapters.mixlora_io import load_mixlora
from .errors import SlimtuneError
from .model import DTYPES, load_model, resolve_device
from .recipe import ModelConfig, QuantizationConfig
from .tokenizer import ensure_pad_token
from .tokens import prompt_ids


def load_for_inference(run_or_adapter_dir: Path, device: str | torch.device = "auto", base: str | None = None,
                       trust_remote_code: bool = False):
    """``(model, tokenizer)`` in eval mode from an adapter dir, a full-model dir, or a run dir holding one of them.

    For an adapter, the base is ``base`` if given, else the adapter's ``base_model_name_or_path``; it is loaded in
    4 bits with the training-time settings when ``slimtune.json`` says it was 4-bit then. ``trust_remote_code`` is
    an explicit argument, never read from the directory (a downloaded adapter must not be able to opt you in).
    """
    directory = _find_result_dir(Path(run_or_adapter_dir))
    meta = read_metadata(directory)
    device = resolve_device(device)
    if (directory / "adapter_config.json").is_file():
        adapter_cfg = json.loads((directory / "adapter_config.json").read_text())
        if adapter_cfg.get("peft_type") not in ("LORA", "MIXLORA"):
            raise SlimtuneError(f"{directory}: adapter peft_type {adapter_cfg.get('peft_type')!r} is not supported "
                                "here (LORA and MIXLORA are)")
        model_cfg, source = _base_config(directory, adapter_cfg, meta, base, trust_remote_code)
        model = _load_base(directory, model_cfg, source, device, bool(meta.get("quantized")))
        if adapter_cfg["peft_type"] == "MIXLORA":  # ours or an official one (official format, see mixlora_io)
            model = load_mixlora(model, directory, bool(meta.get("quantized")), meta.get("mixlora"))
        else:
            model = PeftModel.from_pretrained(model, str(directory))
        tokenizer_dir = directory if (directory / "tokenizer_config.json").is_file() else source
    else:
        model_cfg = ModelConfig(name_or_path=str(directory), dtype=meta.get("dtype") or "float32",
                                trust_remote_code=trust_remote_code)
        model = load_model(model_cfg, directory, device, quantized=False, gradient_checkpointing=False)
        tokenizer_dir = directory
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(str(tokenizer_dir),
                                                               trust_remote_code=trust_remote_code))
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> str:
    """Complete ``prompt``; returns only the new text (special tokens dropped), stopping at the eos token."""
    device = next(model.parameters()).device
    ids = prompt_ids(prompt, tokenizer)  # exactly as training encoded prompts (bos first when there is one)
    if not ids:
        raise SlimtuneError("empty prompt and the tokenizer has no bos token to start from; give a prompt")
    input_ids = torch.tensor([ids])
    attention_mask = torch.ones_like(input_ids)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "use_cache": True,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def merge_adapter(adapter_dir: Path, out_dir: Path, dtype: str = "float32", device: str = "cpu",
                  base: str | None = None, stream: bool | None = None) -> Path:
    """Merge a LoRA/QLoRA adapter into its base and save a plain model (safetensors + tokenizer) to ``out_dir``.

    LoRA: base in full precision + adapter, ``merge_and_unload``.

    QLoRA: the base is loaded in 4 bits exactly as in training, each ``Linear4bit`` is dequantized
    (``bitsandbytes.functional.dequantize_4bit``) into a plain ``nn.Linear`` in ``dtype``, and the LoRA delta is
    merged into *that*. The adapter was trained against ``dequant(W4)``, not the original 16-bit ``W16``
    (peft #2321, transformers #31293), so:

    * the merged model ≈ what was trained (the 4-bit model + adapter, up to the compute-dtype rounding of training);
    * it is **not** the original 16-bit base + delta: every base weight carries its NF4 rounding error. Merging into
      ``W16`` instead would give a model that was never trained, and merging into the 4-bit weights re-quantizes the
      delta away.

    ``device`` is where the 4-bit base is quantized on load; use the training device (e.g. cuda) to reproduce its
    quantization bit for bit. Dequantized layers are moved to the CPU as they are made; the output is on disk.
    ``base`` overrides the adapter's recorded base (hub id or directory), e.g. when the base dir has moved.

    ``stream`` (default: when the base is a safetensors checkpoint and ``device`` is the CPU): merge one decoder
    layer at a time (:func:`~.streamed_merge.merge_streamed`: the same output, bit for bit, without the base in
    memory); the output is then sharded like ``save_pretrained(max_shard_size=...)``.

    MixLoRA adapters are refused: the router picks different LoRA experts per token, so no dense weight matrix
    reproduces the adapted model.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise SlimtuneError(f"merge dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not (adapter_dir / "adapter_config.json").is_file():
        what = "a full model already (nothing to merge)" if (adapter_dir / "config.json").is_file() else \
            "not an adapter directory"
        raise SlimtuneError(f"{adapter_dir} is {what}; merge needs a directory with adapter_config.json "
                            "(the adapter written at the end of a lora/qlora run)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SlimtuneError(f"merge output {out_dir} already exists and is not empty; choose a new directory")
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_cfg.get("peft_type") == "MIXLORA":
        raise SlimtuneError(f"{adapter_dir} is a MixLoRA adapter, which cannot be merged into dense weights: its "
                            "router picks different experts (different LoRA deltas) for every token, so no single "
                            "weight matrix reproduces it. Use it as is (slimtune generate, or load_for_inference)")
    meta = read_metadata(adapter_dir)
    quantized = bool(meta.get("quantized"))
    model_cfg, source = _base_config(adapter_dir, adapter_cfg, meta, base, False)
    if not quantized:
        model_cfg.dtype = dtype
    if stream is None:
        stream = str(device) == "cpu" and _safetensors_base(source)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else source
    merged_meta = {"adapter_type": "none", "quantized": False, "quantization": None, "dtype": dtype,
                   "merged_from": str(adapter_dir.resolve()), "merged_into_dequantized_4bit_base": quantized}
    if stream:
        from .streamed_merge import merge_streamed

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        with atomic_dir(out_dir) as tmp:
            merge_streamed(adapter_dir, tmp, model_cfg, source, dtype, quantized)
            tokenizer.save_pretrained(tmp)
            (tmp / METADATA_FILE).write_text(json.dumps(merged_meta, indent=2) + "\n")
        return out_dir
    model = _load_base(adapter_dir, model_cfg, source, device if quantized else "cpu", quantized)
    if quantized:
        dequantize_model(model, DTYPES[dtype], torch.device("cpu"))
    model = model.to(device="cpu", dtype=DTYPES[dtype])
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(merged_meta, indent=2) + "\n")
    return out_dir


def _safetensors_base(source: str) -> bool:
    """Whether ``source`` is a local safetensors checkpoint (what the streamed merge reads; a hub id merges whole
    unless asked)."""
    path = Path(source).expanduser()
    return path.is_dir() and any(path.glob("model*.safetensors*"))


def dequantize_model(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every bitsandbytes ``Linear4bit`` with an ``nn.Linear`` holding ``dequant(W4)`` in ``dtype``, and
    drop the model's quantization markers so ``save_pretrained`` writes a plain model."""
    dequantize_linears(model, dtype, device)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_loaded_in_4bit = False
    model.hf_quantizer = None
    model.quantization_method = None


def dequantize_linears(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every bitsandbytes ``Linear4bit`` under ``model`` (any module) with an ``nn.Linear`` holding
    ``dequant(W4)`` (``bitsandbytes.functional.dequantize_4bit``) in ``dtype``."""
    import bitsandbytes.functional as bnbF

    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Linear4bit" or not hasattr(module.weight, "quant_state"):
            continue
        weight = bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state)
        linear = torch.nn.utils.skip_init(torch.nn.Linear, module.in_features, module.out_features,
                                          bias=module.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.reshape(module.out_features, module.in_features))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)


def _base_config(directory: Path, adapter_cfg: dict, meta: dict, base: str | None, trust_remote_code: bool
                 ) -> tuple[ModelConfig, str]:
    """The ModelConfig that rebuilds the base an adapter was trained on (4-bit settings from slimtune.json)."""
    source = base or adapter_cfg.get("base_model_name_or_path")
    if not source:
        raise SlimtuneError(f"{directory}/adapter_config.json names no base_model_name_or_path; pass the base "
                            "model (hub id or directory) explicitly")
    quantization = meta.get("quantization") or {}
    cfg = ModelConfig(name_or_path=str(source), dtype=meta.get("dtype") or "float32",
                      quantization=QuantizationConfig(**quantization), trust_remote_code=trust_remote_code,
                      revision=meta.get("base_revision") if base is None else None)
    return cfg, str(source)


def _load_base(directory: Path, cfg: ModelConfig, source: str, device, quantized: bool):
    try:
        return load_model(cfg, source, device, quantized=quantized, gradient_checkpointing=False)
    except SlimtuneError as exc:
        raise SlimtuneError(f"cannot load the base model of adapter {directory} ({exc}); if the base moved, pass "
                            "it explicitly (base=... / --base) as a hub id or model directory") from None


def _find_result_dir(path: Path) -> Path:
    """``path`` itself if it holds an adapter or model, else the one such subdirectory of a run dir."""
    if not path.is_dir():
        raise SlimtuneError(f"{path} does not exist; give an adapter directory (adapter_config.json), a model "
                            "directory (config.json) or a run directory that holds one")
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / METADATA_FILE).is_file())
    final = [p for p in found if not p.name.startswith("checkpoint")] or found
    if len(final) == 1:
        return final[0]
    if not final:
        raise SlimtuneError(f"{path} holds no adapter or model (no adapter_config.json, config.json, or "
                            f"subdirectory with {METADATA_FILE}); give the adapter or model directory")
    raise SlimtuneError(f"{path} holds several results ({', '.join(p.name for p in final)}); pass one of them")
