"""LoRA and QLoRA through peft.

QLoRA here is LoRA on a base whose linear layers are bitsandbytes ``Linear4bit`` (loaded by
:func:`slimtune.finetune.model.load_model` with the recipe's NF4 / double-quant / bf16-compute settings); peft's
``lora.Linear4bit`` wraps each one and calls its forward (the base-layer pattern).

**We do not call ``peft.prepare_model_for_kbit_training``.** It upcasts every non-4-bit parameter (embeddings,
norms, lm_head) to fp32, which costs memory for no training benefit: those parameters are frozen, and
``LlamaRMSNorm`` already computes in fp32 internally. bitsandbytes #1569 measured QLoRA *with* prepare using more
memory than bf16 LoRA (81 vs 63 GB); TRL replaced it with a lighter version (TRL #4335: 19.1 → 14.2 GB peak) and
stopped upcasting norms (TRL #4457). What prepare does that matters is done here instead:

* freeze the base: ``get_peft_model`` already sets ``requires_grad=False`` on everything but the adapter;
* LoRA weights in fp32 whatever the base dtype: ``autocast_adapter_dtype=True`` (peft's default, made explicit) —
  the LoRA input is cast to fp32 and the result back, as in QLoRA's and MoE-PEFT's code;
* gradient checkpointing: ``load_model`` enables the non-reentrant variant, which needs no input that requires
  grad; ``enable_input_require_grads`` is still called when checkpointing is on, so a reentrant variant set up
  elsewhere (e.g. a user's own ``TrainingArguments``) does not silently produce no gradients (peft #1149).

The non-4-bit parameters therefore stay in ``model.dtype``; choose ``model.dtype: bfloat16`` for the QLoRA
paper's memory footprint.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ..errors import SlimtuneError
from ..recipe import AdapterConfig


def apply_lora(model: torch.nn.Module, cfg: AdapterConfig, quantized: bool) -> PeftModel:
    """Wrap ``model``'s linear layers with LoRA (``cfg.target_modules``) and return the peft model to train."""
    if cfg.target_modules != "all-linear":
        _check_names("adapter.target_modules", list(cfg.target_modules), model, linear_only=True)
    if cfg.modules_to_save:
        _check_names("adapter.modules_to_save", list(cfg.modules_to_save), model, linear_only=False)
    if quantized and not any(_is_4bit(m) for m in model.modules()):
        raise ValueError("apply_lora(quantized=True) on a model without 4-bit layers; load it with quantized=True")
    lora_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules),
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21's PeftModel.__init__ reads transformers 5's deprecated is_gradient_checkpointing: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config, autocast_adapter_dtype=True)
    if _checkpointing(model):
        peft_model.enable_input_require_grads()
    return peft_model


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers 5 renamed is_gradient_checkpointing, deprecated)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _check_names(key: str, names: list[str], model: torch.nn.Module, linear_only: bool) -> None:
    """Every name must match a module the way peft matches it (the full name, or a ``.``-separated suffix).

    peft only complains when *no* name matches; a typo next to valid names is silently skipped, so check each.
    """
    module_names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in module_names)]
    if not missing:
        return
    if linear_only:
        valid = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        what = "linear layers in this model"
    else:
        valid = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if n and any(True for _ in m.parameters(recurse=False))})
        what = "modules with parameters in this model"
    raise SlimtuneError(f"{key}: {', '.join(map(repr, missing))} match no module; {what}: {', '.join(valid)} "
                        "(or use all-linear for every linear layer except lm_head)")


def _is_linear(module: torch.nn.Module) -> bool:
    # bnb.nn.Linear4bit subclasses nn.Linear; Conv1D is GPT-2's linear layer, which peft also wraps.
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _is_4bit(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"
