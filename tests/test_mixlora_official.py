"""MixLoRA and the official ``mixlora`` package: the package reads our adapters with the same logits and we read its
format, on every MLP layout the official code serves (gated, Phi-3's fused gate_up_proj, Phi-1/2's fc1/fc2), with
exact identity at init; the layouts it does not serve are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimtune.finetune.adapters import apply_adapter, save_adapter
from slimtune.finetune.errors import SlimtuneError
from slimtune.finetune.export import generate, load_for_inference
from slimtune.finetune.recipe import AdapterConfig, ModelConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_mixlora import E, K, _base, _logits, _mixlora, _randomize  # noqa: E402


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
def test_other_llama_family_decoders(family):
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM as Auto

    config = AutoConfig.for_model(family, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = Auto.from_config(config).eval()
    base = _logits(model)
    model = apply_adapter(model, AdapterConfig(type="mixlora", r=4, alpha=8, num_experts=E, top_k=K), False)
    assert torch.equal(_logits(model), base)
    _randomize(model)
    assert (_logits(model) - base).abs().max() > 1e-2
    act = model.mixlora_settings.act_fn
    assert act == ("gelu_pytorch_tanh" if family == "gemma" else "silu")


@pytest.mark.parametrize("family,experts,attention", [("phi3", ("gate_up_proj", "down_proj"), {"qkv_proj", "o_proj"}),
                                                       ("phi", ("fc1", "fc2"), {"q_proj", "k_proj", "v_proj",
                                                                                "dense"})])
def test_phi_layouts_match_the_official_package(tmp_path, tiny_tokenizer, family, experts, attention):
    """Phi-3 fuses gate and up into gate_up_proj: each expert adapts it with one LoRA and chunks the output (the
    official ``_phi3_forward``); Phi-1/2's plain MLP gets expert LoRA on fc1 and fc2 (``_phi_forward``). Identity at
    init is exact, and the official package reads our adapter with the same logits once it is trained away from
    zero."""
    import zoo

    model_dir = zoo.build(family, tmp_path / family, tiny_tokenizer)
    cfg = ModelConfig(name_or_path=str(model_dir))
    base = _logits(_base(cfg, model_dir))
    model = _mixlora(cfg, model_dir, dropout=0.05)
    assert model.mixlora_settings.expert_targets == experts
    assert set(model.mixlora_settings.attention_targets) == attention
    assert torch.equal(_logits(model), base)
    _randomize(model)
    ours = _logits(model)
    assert (ours - base).abs().max() > 0.1
    save_adapter(model, tmp_path / "adapter", tiny_tokenizer)
    torch.testing.assert_close(_logits(_official(tmp_path / "adapter")), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt"])
def test_a_non_gated_mlp_is_refused_with_the_supported_families(tmp_path, tiny_tokenizer, family):
    import zoo

    model_dir = zoo.build(family, tmp_path / family, tiny_tokenizer)
    with pytest.raises(SlimtuneError, match="adapter.type mixlora supports the decoder MLPs of.*Phi-1/2.*lora"):
        _mixlora(ModelConfig(name_or_path=str(model_dir)), model_dir)


# --------------------------------------------------------------------------------------------------- official
def _official(adapter_dir: Path):
    """The official package's model, with its dropout turned off (it keeps dropout active at inference and its
    expert LoRAs live in a plain dict that model.eval() never reaches)."""
    import mixlora

    model, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32)
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return model


def test_official_package_loads_our_adapter_with_the_same_logits(tmp_path, tiny_dir_config, tiny_model_dir,
                                                                 tiny_tokenizer):
    model = _mixlora(tiny_dir_config, tiny_model_dir, dropout=0.05)
    _randomize(model)
    save_adapter(model, tmp_path / "adapter", tiny_tokenizer)
    ours = _logits(model)
    assert (ours - _logits(_base(tiny_dir_config, tiny_model_dir))).abs().max() > 0.1
    theirs = _logits(_official(tmp_path / "adapter"))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_an_official_format_adapter_loads_in_slimtune(tmp_path, tiny_model_dir):
    """Written by hand from the format MoE-PEFT saves (``save_adapter_weight``): .bin only, target_modules as a dict,
    an int alpha, no router settings (their code defaults apply), experts on up/down only."""
    r, experts = 8, 3
    targets = {"q_proj": True, "k_proj": False, "v_proj": True, "o_proj": False, "gate_proj": False,
               "up_proj": True, "down_proj": True}
    config = {"bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(tiny_model_dir), "r": r, "lora_alpha": 16, "lora_dropout": 0.05,
              "target_modules": targets, "routing_strategy": "mixlora", "num_experts": experts, "act_fn": "silu",
              "top_k": 2}
    g = torch.Generator().manual_seed(9)
    shapes = {"q_proj": (64, 64), "v_proj": (64, 64), "up_proj": (64, 128), "down_proj": (128, 64)}
    weights = {}
    for layer in range(2):
        prefix = f"mixlora.layers.{layer}"
        weights[f"{prefix}.mlp.moe_gate.weight"] = torch.randn(experts, 64, generator=g) * 0.5
        for proj in ("q_proj", "v_proj"):
            weights[f"{prefix}.self_attn.{proj}.lora_A.weight"] = torch.randn(r, shapes[proj][0], generator=g) * 0.1
            weights[f"{prefix}.self_attn.{proj}.lora_B.weight"] = torch.randn(shapes[proj][1], r, generator=g) * 0.1
        for proj in ("up_proj", "down_proj"):
            for e in range(experts):
                key = f"{prefix}.mlp.{proj}.experts.{e}"
                weights[f"{key}.lora_A.weight"] = torch.randn(r, shapes[proj][0], generator=g) * 0.1
                weights[f"{key}.lora_B.weight"] = torch.randn(shapes[proj][1], r, generator=g) * 0.1
    out = tmp_path / "official"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    torch.save(weights, out / "adapter_model.bin")

    loaded, tokenizer = load_for_inference(out, "cpu")
    s = loaded.mixlora_settings
    assert (s.attention_targets, s.expert_targets) == (("q_proj", "v_proj"), ("up_proj", "down_proj"))
    assert (s.num_experts, s.router_aux_loss_coef, s.router_init_range, s.jitter_noise) == (3, 0.001, 0.02, 0.0)
    ours = _logits(loaded)
    torch.testing.assert_close(ours, _logits(_official(out)), atol=1e-5, rtol=0)
    assert (ours - _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))).abs().max() > 0.1
    assert isinstance(generate(loaded, tokenizer, "Instruction: name a colour.", max_new_tokens=3), str)
    # what slimtune cannot load is refused with the reason
    for change, message in (({"routing_strategy": "mixlora-switch"}, "routing_strategy 'mixlora-switch'"),
                            ({"use_dora": True}, "MixDoRA"), ({"num_experts": 4}, "shape mismatch|missing")):
        (out / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(SlimtuneError, match=message):
            load_for_inference(out, "cpu")
