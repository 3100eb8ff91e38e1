"""MixLoRA adapters on disk, in the official format (what MoE-PEFT's ``save_adapter_weight`` writes and the
``mixlora`` package's ``load_adapter_weights`` reads).

A directory written by :func:`save_mixlora` holds:

* ``adapter_config.json``: what the official ``MixLoraConfig.export()`` writes (``peft_type: MIXLORA``,
  ``routing_strategy: mixlora``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``num_experts``,
  ``top_k``, ``act_fn`` (always: the package crashes without it), ``expert_lora`` when the experts' LoRA differs),
  plus ``router_aux_loss_coef`` and ``router_init_range``, which both official parsers read (export() drops them,
  so a reload there would silently fall back to 0.001 / 0.02);
* ``adapter_model.safetensors``: the flat dict of fp32 tensors keyed ``mixlora.layers.{L}.self_attn.{proj}.lora_A
  .weight``, ``mixlora.layers.{L}.mlp.moe_gate.weight``, ``mixlora.layers.{L}.mlp.{proj}.experts.{e}.lora_B.weight``
  ...; loading prefers it (no pickle);
* ``adapter_model.bin``: the same dict through ``torch.save``, the only file the official loaders read; we read it
  with ``weights_only=True`` when there is no safetensors file (an official adapter).

``jitter_noise`` is *not* written to adapter_config.json: the official package would apply it at inference (in
place). It goes, with the two router settings, into ``slimtune.json`` (``mixlora``), which takes
precedence on load, so a reload changes nothing. Known limits of the official package 0.2.3 (not ours): it ignores
``expert_lora`` (experts with their own r fail to load there) and asserts ``lora_dropout > 0`` and an int
``lora_alpha``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError

from ..errors import SlimtuneError
from ..recipe import AdapterConfig
from .mixlora import MixLoraSettings, apply_mixlora, decoder_layers

CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
# Settings the official adapter_config.json does not (reliably) carry; slimtune.json keeps them.
EXTRA_FIELDS = ("router_aux_loss_coef", "router_init_range", "jitter_noise")


def official_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every MixLoRA parameter of ``model`` under its official key (``mixlora.layers.{L}...``)."""
    s: MixLoraSettings = model.mixlora_settings
    params: dict[str, torch.nn.Parameter] = {}
    for i, layer in enumerate(decoder_layers(model)):
        prefix = f"mixlora.layers.{i}"
        for proj in s.attention_targets:
            lora = getattr(layer.self_attn, proj)
            params[f"{prefix}.self_attn.{proj}.lora_A.weight"] = lora.lora_A["default"].weight
            params[f"{prefix}.self_attn.{proj}.lora_B.weight"] = lora.lora_B["default"].weight
        params[f"{prefix}.mlp.moe_gate.weight"] = layer.mlp.moe_gate.weight
        for e, loras in enumerate(layer.mlp.experts):
            for proj, pair in loras.items():
                params[f"{prefix}.mlp.{proj}.experts.{e}.lora_A.weight"] = pair.lora_A.weight
                params[f"{prefix}.mlp.{proj}.experts.{e}.lora_B.weight"] = pair.lora_B.weight
    return params


def official_config(settings: MixLoraSettings, base_model_name_or_path: str) -> dict:
    """adapter_config.json in the official format (``MixLoraConfig.export()`` keys, plus the router settings)."""
    s = settings
    config = {
        "bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": s.r, "lora_alpha": _whole(s.alpha), "lora_dropout": s.dropout,
        "target_modules": list(s.attention_targets) + list(s.expert_targets),
        "routing_strategy": "mixlora", "num_experts": s.num_experts, "act_fn": s.act_fn, "top_k": s.top_k,
        "router_aux_loss_coef": s.router_aux_loss_coef, "router_init_range": s.router_init_range,
    }
    if s.use_rslora:
        config["use_rslora"] = True
    if (s.expert_r, s.expert_alpha, s.expert_dropout) != (s.r, s.alpha, s.dropout):
        config["expert_lora"] = {"r": s.expert_r, "lora_alpha": _whole(s.expert_alpha),
                                 "lora_dropout": s.expert_dropout}
    return config


def extra_settings(settings: MixLoraSettings) -> dict:
    """What ``slimtune.json`` records under ``mixlora`` (the settings official files drop or must not carry)."""
    return {key: getattr(settings, key) for key in EXTRA_FIELDS}


def adapter_config_from_official(config: dict, extras: dict | None = None, where: str = CONFIG_FILE
                                 ) -> AdapterConfig:
    """The recipe ``adapter`` section equivalent to an official adapter_config.json (defaults as in the official
    ``MixLoraConfig.from_config``); ``extras`` (slimtune.json's ``mixlora``) override the router settings."""
    if config.get("peft_type") != "MIXLORA":
        raise SlimtuneError(f"{where}: peft_type {config.get('peft_type')!r} is not MIXLORA")
    strategy = config.get("routing_strategy")
    if strategy != "mixlora":
        hint = (" (a legacy m-LoRA checkpoint: convert it with misc/legacy_weights_convertor.py from "
                "TUDB-Labs/MixLoRA)" if strategy == "mixtral" else "")
        raise SlimtuneError(f"{where}: routing_strategy {strategy!r} is not supported; slimtune (like the official "
                            f"mixlora package) loads the top-k router, routing_strategy 'mixlora'{hint}")
    if config.get("use_dora"):
        raise SlimtuneError(f"{where}: use_dora (MixDoRA) is not supported; slimtune's MixLoRA experts are LoRA")
    targets = config.get("target_modules")
    if isinstance(targets, dict):
        targets = [name for name, on in targets.items() if on]
    if not isinstance(targets, list):
        raise SlimtuneError(f"{where}: target_modules must be a list of module names or a dict name -> bool")
    expert = config.get("expert_lora") or {}
    fields = {
        "type": "mixlora", "r": config.get("r"), "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout"), "target_modules": targets,
        "use_rslora": bool(config.get("use_rslora", False)), "num_experts": config.get("num_experts"),
        "top_k": config.get("top_k", 2), "act_fn": config.get("act_fn"),
        "router_aux_loss_coef": (config.get("router_aux_loss_coef", 0.001) if config.get("router_loss", True)
                                 else 0.0),
        "router_init_range": config.get("router_init_range", 0.02), "jitter_noise": config.get("jitter_noise", 0.0),
        "expert_lora": {"r": expert.get("r"), "alpha": expert.get("lora_alpha"),
                        "dropout": expert.get("lora_dropout")},
    }
    fields.update({k: v for k, v in (extras or {}).items() if k in EXTRA_FIELDS})
    try:
        return AdapterConfig.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SlimtuneError(f"{where}: not a valid MixLoRA config ({problems})") from None


def save_mixlora(model: torch.nn.Module, directory: Path) -> None:
    """Write adapter_config.json, adapter_model.safetensors and adapter_model.bin into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    weights = {k: p.detach().to("cpu").contiguous() for k, p in official_parameters(model).items()}
    config = official_config(model.mixlora_settings, str(getattr(model, "name_or_path", "") or ""))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
    torch.save(weights, directory / BIN_FILE)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors: adapter_model.safetensors if present, else adapter_model.bin (``weights_only``)."""
    directory = Path(directory)
    if (directory / SAFETENSORS_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / SAFETENSORS_FILE))
    if (directory / BIN_FILE).is_file():
        try:
            return torch.load(directory / BIN_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with objects other than tensors: refused by weights_only
            raise SlimtuneError(f"{directory / BIN_FILE}: not a plain dict of tensors ({exc.__class__.__name__}); "
                                "refusing to unpickle arbitrary objects") from None
    raise SlimtuneError(f"{directory} has neither {SAFETENSORS_FILE} nor {BIN_FILE}")


def load_official_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Copy official-keyed ``weights`` into ``model``'s MixLoRA parameters; strict about keys and shapes."""
    params = official_parameters(model)
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    shapes = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(p.shape)}" for k, p in params.items()
              if k in weights and weights[k].shape != p.shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {len(items)}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if items]
        raise SlimtuneError(f"{where}: the MixLoRA weights do not fit this base model and adapter_config.json ("
                            + "; ".join(parts) + ")")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(weights[key])


def load_mixlora(model: torch.nn.Module, directory: Path, quantized: bool, extras: dict | None = None
                 ) -> torch.nn.Module:
    """Put the MixLoRA adapter saved in ``directory`` (ours or an official one) on the base ``model``."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    cfg = adapter_config_from_official(config, extras, str(directory / CONFIG_FILE))
    model = apply_mixlora(model, cfg, quantized)
    load_official_state_dict(model, read_weights(directory), str(directory))
    return model


def _whole(value: float) -> int | float:
    """alpha as an int when it is one: the official config check asserts ``isinstance(lora_alpha, int)``."""
    return int(value) if float(value).is_integer() else value
