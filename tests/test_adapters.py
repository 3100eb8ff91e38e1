"""LoRA / QLoRA / full fine-tuning, checkpoints of trainable weights, saving, inference loading, merging, generation."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from slimtune.finetune.adapters import (
    ADAPTERS,
    apply_adapter,
    load_trainable_state_dict,
    save_adapter,
    trainable_state_dict,
)
from slimtune.finetune.errors import CheckpointError, SlimtuneError
from slimtune.finetune.export import generate, load_for_inference, merge_adapter
from slimtune.finetune.model import count_parameters, load_model
from slimtune.finetune.recipe import AdapterConfig

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
IDS = torch.tensor([[1, 17, 42, 99, 250, 3, 77, 5]])


def _base(cfg, path, quantized=False, gc=False):
    return load_model(cfg, path, "cpu", quantized=quantized, gradient_checkpointing=gc)


def _adapted(cfg, path, quantized=False, gc=False, **adapter):
    adapter.setdefault("type", "qlora" if quantized else "lora")
    adapter.setdefault("dropout", 0.0)
    model = apply_adapter(_base(cfg, path, quantized, gc), AdapterConfig(r=4, alpha=8, **adapter), quantized)
    torch.manual_seed(0)
    return model


def _train(model, batch, steps=5, lr=1e-2):
    """A few AdamW steps on one fixed batch; returns the losses (before each step, then after the last)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        losses.append(model(**batch).loss.item())
    return losses


def _randomize_lora(model, scale=0.2):
    """Give every LoRA B a nonzero value (a stand-in for a trained adapter: B=0 would make merging trivial)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@torch.no_grad()
def _logits(model, ids=IDS):
    model.eval()
    return model(ids.to(next(model.parameters()).device)).logits.float()


def _frozen_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# --------------------------------------------------------------------------------------------------- LoRA
def test_registry():
    assert set(ADAPTERS) >= {"lora", "qlora", "none"}
    assert ADAPTERS["lora"] is ADAPTERS["qlora"]


def test_lora_at_init_gives_exactly_the_base_logits(tiny_dir_config, tiny_model_dir):
    base_logits = _logits(_base(tiny_dir_config, tiny_model_dir))
    model = _adapted(tiny_dir_config, tiny_model_dir, dropout=0.1)
    assert isinstance(model, PeftModel)
    assert torch.equal(_logits(model), base_logits)  # B = 0, dropout off in eval: bit-identical


def test_lora_trains_only_the_adapter(tiny_dir_config, tiny_model_dir, tiny_batch):
    model = _adapted(tiny_dir_config, tiny_model_dir)
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == PROJECTIONS  # all-linear: every projection, not peft's q/v default, not lm_head
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert count_parameters(model)[0] == sum(p.numel() for p in trainable.values()) == 2 * (  # layers
        4 * 4 * (64 + 64) + 3 * 4 * (64 + 128))  # r * (in + out): 4 attention, 3 MLP projections
    frozen = _frozen_snapshot(model)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = _train(model, tiny_batch)
    assert losses[-1] < losses[0] - 0.1, losses
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items()), "base weights must be bit-identical"
    assert all(not torch.equal(after[n], v) for n, v in before.items() if "lora_B" in n)


def test_target_module_that_matches_nothing_lists_the_linear_layers(tiny_dir_config, tiny_model_dir):
    base = _base(tiny_dir_config, tiny_model_dir)
    with pytest.raises(SlimtuneError) as err:
        apply_adapter(base, AdapterConfig(target_modules=["q_proj", "q_porj"]), False)
    msg = str(err.value)
    assert "adapter.target_modules" in msg and "'q_porj'" in msg and "'q_proj'" not in msg
    for name in sorted(PROJECTIONS) + ["lm_head"]:
        assert name in msg
    with pytest.raises(SlimtuneError, match="adapter.modules_to_save.*'lm_haed'"):
        apply_adapter(base, AdapterConfig(modules_to_save=["lm_haed"]), False)


def test_lora_target_list_and_modules_to_save(tiny_dir_config, tiny_model_dir, tiny_batch):
    model = _adapted(tiny_dir_config, tiny_model_dir, target_modules=["q_proj", "v_proj"],
                     modules_to_save=["norm"], use_rslora=True)
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())
    assert any("norm" in k for k in trainable_state_dict(model))


# --------------------------------------------------------------------------------------------------- QLoRA
def test_qlora_base_is_nf4_double_quant_bf16_and_trains(tiny_dir_config, tiny_model_dir, tiny_batch):
    import bitsandbytes as bnb

    model = _adapted(tiny_dir_config, tiny_model_dir, quantized=True, gc=True)
    bases = {n: m.base_layer for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    assert len(bases) == 14 and {n.split(".")[-1] for n in bases} == PROJECTIONS
    for layer in bases.values():
        assert isinstance(layer, bnb.nn.Linear4bit)
        state = layer.weight.quant_state
        assert (state.quant_type, state.nested, layer.compute_dtype) == ("nf4", True, torch.bfloat16)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    frozen = _frozen_snapshot(model)
    losses = _train(model, tiny_batch)  # with (non-reentrant) gradient checkpointing on
    assert losses[-1] < losses[0] - 0.1, losses
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())



def test_qlora_evaluation_between_steps_changes_neither_training_nor_eval_numerics(tiny_dir_config, tiny_model_dir,
                                                                                  tiny_batch):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel in eval on AVX512-BF16 CPUs, after which no
    gradient flows through the base layer (offload/bnb_compat.keep_training_layout). With the weights unchanged, the
    gradients after an eval must equal those before it, and the eval loss the training-mode loss (no dropout)."""
    model = _adapted(tiny_dir_config, tiny_model_dir, quantized=True, dropout=0.0)
    _randomize_lora(model)  # B != 0: the first layers' LoRA gradients go through the base layers above

    def gradients():
        model.train()
        loss = model(**tiny_batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    train_loss, before = gradients()
    model.eval()
    with torch.no_grad():
        eval_loss = model(**tiny_batch).loss.item()
    _, after = gradients()
    assert any(".layers.0." in n for n in before) and all(g.abs().sum() > 0 for g in before.values())
    for name, grad in before.items():
        assert torch.equal(after[name], grad), name
    assert eval_loss == train_loss  # eval runs training's kernel

# --------------------------------------------------------------------------------------------------- full FT
def test_full_fine_tuning_trains_every_parameter(tiny_dir_config, tiny_model_dir, tiny_batch):
    model = apply_adapter(_base(tiny_dir_config, tiny_model_dir), AdapterConfig(type="none"), False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    trainable, total = count_parameters(model)
    assert trainable == total
    losses = _train(model, tiny_batch, steps=3, lr=1e-3)
    assert losses[-1] < losses[0], losses
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_full_fine_tuning_refuses_a_4bit_base(tiny_dir_config, tiny_model_dir):
    base = _base(tiny_dir_config, tiny_model_dir, quantized=True)
    with pytest.raises(SlimtuneError, match="adapter.type none.*4-bit.*qlora"):
        apply_adapter(base, AdapterConfig(type="none"), True)


# --------------------------------------------------------------------------------------------------- state dicts
def test_trainable_state_dict_round_trip(tiny_dir_config, tiny_model_dir):
    trained = _adapted(tiny_dir_config, tiny_model_dir)
    _randomize_lora(trained)
    sd = trainable_state_dict(trained)
    assert sd and all("lora_" in k for k in sd) and len(sd) == 2 * 14
    fresh = _adapted(tiny_dir_config, tiny_model_dir)
    assert not torch.equal(_logits(fresh), _logits(trained))
    load_trainable_state_dict(fresh, {k: v.clone() for k, v in sd.items()})
    assert torch.equal(_logits(fresh), _logits(trained))
    # strict: a missing key, an extra key, a different rank are all errors
    one = next(iter(sd))
    with pytest.raises(CheckpointError, match="missing 1"):
        load_trainable_state_dict(fresh, {k: v for k, v in sd.items() if k != one})
    with pytest.raises(CheckpointError, match="unexpected 1"):
        load_trainable_state_dict(fresh, {**sd, "base_model.model.extra.weight": torch.zeros(1)})
    other_rank = apply_adapter(_base(tiny_dir_config, tiny_model_dir), AdapterConfig(r=8), False)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_trainable_state_dict(other_rank, sd)


def test_trainable_state_dict_round_trip_full(tiny_dir_config, tiny_model_dir, tiny_batch):
    trained = apply_adapter(_base(tiny_dir_config, tiny_model_dir), AdapterConfig(type="none"), False)
    _train(trained, tiny_batch, steps=2, lr=1e-3)
    sd = trainable_state_dict(trained)
    fresh = apply_adapter(_base(tiny_dir_config, tiny_model_dir), AdapterConfig(type="none"), False)
    load_trainable_state_dict(fresh, sd)
    assert torch.equal(_logits(fresh), _logits(trained))


# --------------------------------------------------------------------------------------------------- saving
def test_saved_adapter_loads_with_peft(tmp_path, tiny_dir_config, tiny_model_dir, tiny_tokenizer, tiny_batch):
    model = _adapted(tiny_dir_config, tiny_model_dir)
    _train(model, tiny_batch, steps=3)
    out = tmp_path / "adapter"
    save_adapter(model, out, tiny_tokenizer)
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "slimtune.json"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "slimtune.json").read_text())
    assert meta["adapter_type"] == "lora" and meta["quantized"] is False
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-6, rtol=0)
    # and through our loader, which finds the base from adapter_config.json
    loaded, tok = load_for_inference(out, "cpu")
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    # a base that moved: a clear error, and an explicit base fixes it
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(SlimtuneError, match="base model of adapter.*gone.*base="):
        load_for_inference(out, "cpu")
    loaded, _ = load_for_inference(out, "cpu", base=str(tiny_model_dir))
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)
    # saving again replaces the directory atomically (no temp dirs left behind)
    save_adapter(model, out, tiny_tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_saved_full_model_loads_for_inference(tmp_path, tiny_dir_config, tiny_model_dir, tiny_tokenizer, tiny_batch):
    model = apply_adapter(_base(tiny_dir_config, tiny_model_dir), AdapterConfig(type="none"), False)
    _train(model, tiny_batch, steps=2, lr=1e-3)
    save_adapter(model, tmp_path / "run" / "final", tiny_tokenizer)
    loaded, _ = load_for_inference(tmp_path / "run", "cpu")  # a run dir: finds its one result
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- merging
def test_merge_lora_equals_the_adapter_model(tmp_path, tiny_dir_config, tiny_model_dir, tiny_tokenizer):
    model = _adapted(tiny_dir_config, tiny_model_dir)
    _randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", tiny_tokenizer)
    merged_dir = merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # streamed: a local safetensors base
    assert (merged_dir / "model.safetensors.index.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter_logits = _logits(model)
    assert (adapter_logits - _logits(_base(tiny_dir_config, tiny_model_dir))).abs().max() > 0.05  # B != 0
    torch.testing.assert_close(_logits(merged), adapter_logits, atol=1e-5, rtol=0)
    with pytest.raises(SlimtuneError, match="already exists"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    with pytest.raises(SlimtuneError, match="nothing to merge"):
        merge_adapter(merged_dir, tmp_path / "merged2")


def test_merge_qlora_matches_what_was_trained(tmp_path, tiny_dir_config, tiny_model_dir, tiny_tokenizer):
    model = _adapted(tiny_dir_config, tiny_model_dir, quantized=True)
    _randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", tiny_tokenizer)
    meta = json.loads((tmp_path / "adapter" / "slimtune.json").read_text())
    assert meta["adapter_type"] == "qlora" and meta["quantized"] is True
    assert meta["quantization"] == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}

    # the inference loader rebuilds the 4-bit base the adapter was trained against
    loaded, _ = load_for_inference(tmp_path / "adapter", "cpu")
    assert loaded.get_base_model().is_loaded_in_4bit
    trained_logits = _logits(model)
    torch.testing.assert_close(_logits(loaded), trained_logits, atol=1e-6, rtol=0)

    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(tmp_path / "adapter", tmp_path / "merged"))
    assert not getattr(merged, "is_loaded_in_4bit", False) and merged.dtype == torch.float32
    merged_err = (_logits(merged) - trained_logits).abs().max().item()
    # the naive merge: the same delta on the original fp32 base (never what the adapter saw)
    naive = PeftModel.from_pretrained(_base(tiny_dir_config, tiny_model_dir), tmp_path / "adapter").merge_and_unload()
    naive_err = (_logits(naive) - trained_logits).abs().max().item()
    scale = trained_logits.abs().max().item()
    assert merged_err < 0.02 * scale, (merged_err, scale)  # bf16 compute rounding only
    assert merged_err < naive_err / 3, (merged_err, naive_err)  # the caveat, measured


# --------------------------------------------------------------------------------------------------- generation
def test_generate_returns_new_text_and_stops_at_eos(tiny_model_dir, tiny_dir_config, tiny_tokenizer):
    model = _base(tiny_dir_config, tiny_model_dir)
    prompt = "Instruction: name a colour."
    three = generate(model, tiny_tokenizer, prompt, max_new_tokens=3)
    assert isinstance(three, str) and three and not three.startswith(prompt)
    # force eos as the 4th generated token: generation must stop there and return exactly the first 3 tokens
    calls = []

    def eos_on_fourth(module, args, output):
        calls.append(1)
        if len(calls) == 4:
            output = output.clone()
            output[..., -1, tiny_tokenizer.eos_token_id] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(eos_on_fourth)
    try:
        stopped = generate(model, tiny_tokenizer, prompt, max_new_tokens=20)
    finally:
        handle.remove()
    assert len(calls) == 4 and stopped == three
    # sampling is seeded
    a = generate(model, tiny_tokenizer, prompt, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    b = generate(model, tiny_tokenizer, prompt, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    assert a == b
