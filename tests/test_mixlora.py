"""MixLoRA: identity at init, routing and the load-balance loss against float64 transcriptions of the published
formulas, save/load in the official format (both ways with the official ``mixlora`` package), 4-bit base, training
through the trainer with every optimizer, checkpoints and metrics."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from slimtune.finetune import recipe_from_dict, train
from slimtune.finetune.adapters import (
    ADAPTERS,
    apply_adapter,
    aux_loss,
    load_trainable_state_dict,
    router_load,
    save_adapter,
    trainable_state_dict,
)
from slimtune.finetune.adapters.mixlora import MixLoraFFN, mixlora_layers
from slimtune.finetune.build import prepare
from slimtune.finetune.errors import RecipeError, SlimtuneError
from slimtune.finetune.evaluate import supervised_tokens
from slimtune.finetune.export import generate, load_for_inference, merge_adapter
from slimtune.finetune.metrics import read_metrics
from slimtune.finetune.model import load_model
from slimtune.finetune.recipe import AdapterConfig
from slimtune.finetune.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import losses, run_killed_at, tiny  # noqa: E402

IDS = torch.tensor([[1, 17, 42, 99, 250, 3, 77, 5, 8, 120, 64, 31], [1, 200, 13, 7, 7, 90, 41, 2, 0, 0, 0, 0]])
MASK = torch.tensor([[1] * 12, [1] * 8 + [0] * 4])  # the second row is right-padded, as the collator pads
E, K = 4, 2  # experts, top-k of the small adapters below


def _base(cfg, path, quantized=False, gc=False, dtype=None):
    if dtype is not None:
        cfg = cfg.model_copy(update={"dtype": dtype})
    return load_model(cfg, path, "cpu", quantized=quantized, gradient_checkpointing=gc)


def _mixlora(cfg, path, quantized=False, gc=False, dtype=None, **adapter):
    fields = dict(type="mixlora", r=4, alpha=8, dropout=0.0, num_experts=E, top_k=K)
    fields.update(adapter)
    torch.manual_seed(0)
    return apply_adapter(_base(cfg, path, quantized, gc, dtype), AdapterConfig(**fields), quantized)


def _randomize(model, b_scale=0.3, router_scale=0.5, seed=123):
    """Stand-in for a trained adapter: nonzero B everywhere and a router with clear preferences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
            elif "moe_gate" in name:
                p.copy_(torch.randn(p.shape, generator=g) * router_scale)


@torch.no_grad()
def _logits(model, ids=IDS, mask=MASK):
    model.eval()
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()


# --------------------------------------------------------------------------------------------------- structure
def test_identity_at_init_is_exact_and_only_lora_and_routers_train(tiny_dir_config, tiny_model_dir):
    assert "mixlora" in ADAPTERS
    base = _logits(_base(tiny_dir_config, tiny_model_dir))
    model = _mixlora(tiny_dir_config, tiny_model_dir, dropout=0.1, jitter_noise=0.2)
    assert torch.equal(_logits(model), base)  # B = 0: bit-identical, not just close
    model.train()  # dropout on the LoRA input changes nothing while B = 0; jitter is a training-only perturbation
    with torch.no_grad():
        assert not torch.equal(model(input_ids=IDS, attention_mask=MASK).logits, base)
    model.eval()
    assert torch.equal(_logits(model), base)  # jitter never at inference
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n or "moe_gate" in n) and p.dtype == torch.float32 for n, p in trainable.items())
    r, hidden, inner = 4, 64, 128
    per_layer = 4 * r * (hidden + hidden) + E * (2 * r * (hidden + inner) + r * (inner + hidden)) + E * hidden
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer
    assert all(isinstance(layer.mlp, MixLoraFFN) for layer in model.model.layers)


def test_bf16_base_identity_and_fp32_router(tiny_dir_config, tiny_model_dir):
    base = _logits(_base(tiny_dir_config, tiny_model_dir, dtype="bfloat16"))
    model = _mixlora(tiny_dir_config, tiny_model_dir, dtype="bfloat16")
    assert torch.equal(_logits(model), base)
    ffn = model.model.layers[0].mlp
    assert ffn.moe_gate.weight.dtype == torch.float32 and ffn.base_layer.down_proj.weight.dtype == torch.bfloat16
    _randomize(model)
    _logits(model)
    assert ffn.router_logits.dtype == torch.float32


# --------------------------------------------------------------------------------------------------- float64
def _reference_ffn(ffn: MixLoraFFN, x: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The published MoE FFN in float64, token by token (arXiv 2404.15159, MoE-PEFT's MixLoRA): softmax router, top-k
    renormalised, expert e = frozen FFN + its LoRA on gate/up/down, W_down applied per expert."""
    d = torch.float64
    base = ffn.base_layer
    w_gate, w_up, w_down = (getattr(base, p).weight.to(d) for p in ("gate_proj", "up_proj", "down_proj"))
    router = ffn.moe_gate.weight.to(d)

    def lora(e, proj, v):
        pair = ffn.experts[e][proj]
        return scaling * pair.lora_B.weight.to(d) @ (pair.lora_A.weight.to(d) @ v)

    out, chosen = [], []
    for v in x.to(d).reshape(-1, x.shape[-1]):
        p = torch.softmax(router @ v, dim=0)
        top = torch.argsort(p, descending=True)[:ffn.top_k]
        chosen.append(top)
        y = torch.zeros(w_down.shape[0], dtype=d)
        for e, weight in zip(top.tolist(), p[top] / p[top].sum()):  # tensors: the router gets a gradient
            a = F.silu(w_gate @ v + lora(e, "gate_proj", v)) * (w_up @ v + lora(e, "up_proj", v))
            y += weight * (w_down @ a + lora(e, "down_proj", a))
        out.append(y)
    return torch.stack(out), torch.stack(chosen)


def test_routing_and_moe_ffn_match_a_float64_reference(tiny_dir_config, tiny_model_dir):
    model = _mixlora(tiny_dir_config, tiny_model_dir)
    _randomize(model)
    model.eval()
    ffn = model.model.layers[0].mlp
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = ffn(x).reshape(-1, 64)
    ref, chosen = _reference_ffn(ffn, x, scaling=8 / 4)
    # the premise: no near-tie between the k-th and (k+1)-th router probability (fp32 softmax is good to ~1e-7)
    probs = torch.softmax(ffn.moe_gate.weight.double() @ x.double().reshape(-1, 64).T, dim=0).T.sort(-1).values
    assert (probs[:, -K] - probs[:, -K - 1]).min() > 1e-6
    _, selected = torch.topk(ffn.router_logits, K, dim=-1)
    assert torch.equal(selected, chosen)
    assert (ref - ref.mean()).abs().max() > 0.1  # a real, nontrivial output
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-5)
    # several experts really receive tokens, and the LoRA matters (vs the frozen FFN alone)
    assert len(set(chosen.flatten().tolist())) == E
    with torch.no_grad():
        frozen = ffn.base_layer(x).reshape(-1, 64)
    assert (frozen - ours).abs().max() > 1e-2


@pytest.mark.parametrize("top_k", [2, 3])
def test_batched_experts_gradients_match_the_float64_per_expert_reference(tiny_dir_config, tiny_model_dir, top_k):
    """The experts' LoRA runs batched (stacked A, one-hot mask, B side by side) and the slots mix around the first
    slot's activation; its gradients for every LoRA matrix, the router and the input must be those of the
    token-by-token, expert-by-expert float64 formula (top-2 and the general top-k path)."""
    model = _mixlora(tiny_dir_config, tiny_model_dir, top_k=top_k)
    _randomize(model)
    model.train()
    ffn = model.model.layers[0].mlp
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    probe = torch.randn(24, 64, generator=torch.Generator().manual_seed(8))
    names = [n for n, p in ffn.named_parameters() if p.requires_grad]
    params = [p for n, p in ffn.named_parameters() if p.requires_grad]
    ours = torch.autograd.grad((ffn(x).reshape(-1, 64) * probe).sum(), [x, *params])
    ref_out, _ = _reference_ffn(ffn, x, scaling=8 / 4)
    ref = torch.autograd.grad((ref_out * probe.double()).sum(), [x, *params])
    assert any("moe_gate" in n for n in names) and sum("experts" in n for n in names) == E * 3 * 2
    for name, g, r in zip(["input", *names], ours, ref):
        assert r.abs().max() > 0, name  # every expert received tokens, so every LoRA matrix has a gradient
        assert (g.double() - r).abs().max() <= 1e-5 * r.abs().max(), name  # fp32 rounding, relative to the scale


def _reference_aux(layer_inputs: list[torch.Tensor], routers: list[torch.Tensor], mask: torch.Tensor | None,
                   coef: float) -> tuple[float, list[list[float]]]:
    """HF-Mixtral / MoE-PEFT load-balance loss in float64, written from MoE-PEFT's
    ``_mixtral_load_balancing_loss_func``: all layers' logits concatenated, f[slot, e] = share of (non-padding) tokens
    whose slot-th choice is e, P[e] = mean router probability, L = coef * E * sum f[slot, e] P[e]. Also each layer's
    share of the top-k assignments per expert."""
    logits = [x.double().reshape(-1, x.shape[-1]) @ w.double().T for x, w in zip(layer_inputs, routers)]
    keep = torch.ones(logits[0].shape[0], dtype=torch.float64) if mask is None else mask.reshape(-1).double()
    rows = [(torch.softmax(row, 0), k) for layer in logits for row, k in zip(layer, keep)]
    tokens = sum(k for _, k in rows)
    f = [[sum(k for p, k in rows if int(torch.argsort(p, descending=True)[slot]) == e) / tokens for e in range(E)]
         for slot in range(K)]
    prob = [sum(k * p[e] for p, k in rows) / tokens for e in range(E)]
    loss = coef * E * sum(f[slot][e] * prob[e] for slot in range(K) for e in range(E))
    shares = []
    for layer in logits:
        counts = [0.0] * E
        for row, k in zip(layer, keep):
            for e in torch.topk(row, K).indices.tolist():
                counts[e] += float(k)
        shares.append([c / sum(counts) for c in counts])
    return float(loss), shares


def test_aux_loss_and_router_load_match_a_float64_reference(tiny_dir_config, tiny_model_dir):
    coef = 0.5
    model = _mixlora(tiny_dir_config, tiny_model_dir, router_aux_loss_coef=coef)
    _randomize(model, router_scale=0.3)
    inputs = []
    hooks = [layer.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
             for layer in mixlora_layers(model)]
    model.train()
    model(input_ids=IDS, attention_mask=MASK)
    for h in hooks:
        h.remove()
    routers = [layer.moe_gate.weight.detach() for layer in mixlora_layers(model)]
    ours = aux_loss(model, MASK)
    expected, shares = _reference_aux(inputs, routers, MASK, coef)
    assert ours.requires_grad
    assert float(ours.detach()) == pytest.approx(expected, rel=1e-6)
    unmasked, _ = _reference_aux(inputs, routers, None, coef)
    assert abs(unmasked - expected) > 1e-4  # padding really is excluded (the 4 pads route like other tokens)
    assert float(aux_loss(model, None).detach()) == pytest.approx(unmasked, rel=1e-6)
    # the router load in metrics: per layer, each expert's share of the top-k picks of non-padding tokens (the
    # second aux_loss call above tallied the padded positions too: start over)
    router_load(model)
    aux_loss(model, MASK)
    load = router_load(model)
    for got, want in zip(load["router_load_per_layer"], shares):
        assert got == pytest.approx(want, abs=1e-5)
    assert load["router_load"] == pytest.approx([sum(c) / 2 for c in zip(*shares)], abs=1e-5)
    assert router_load(model) == {}  # reset after reading
    # the gradient of the aux term reaches every router
    model.zero_grad()
    aux_loss(model, MASK).backward()
    assert all(layer.moe_gate.weight.grad.abs().sum() > 0 for layer in mixlora_layers(model))


def test_trainer_adds_the_aux_loss_per_micro_batch_with_accumulation(tmp_path):
    recipe = recipe_from_dict(tiny(tmp_path, "adapter.type=mixlora", "adapter.num_experts=4", "adapter.dropout=0",
                                   "adapter.router_aux_loss_coef=0.5", "training.gradient_accumulation_steps=2",
                                   "training.per_device_train_batch_size=3", "training.max_grad_norm=0",
                                   "data.metric=none"))
    trainer = Trainer(recipe, prepare(recipe), progress=False)
    micro = trainer.micro_batches()
    group = [next(micro), next(micro)]
    counts = [supervised_tokens(b["labels"]) for b in group]
    model = trainer.model
    model.train()
    expected, aux_total = 0.0, 0.0
    with torch.no_grad():
        for batch, n in zip(group, counts):
            out = model(**batch)
            aux = float(aux_loss(model, batch["attention_mask"]))
            expected += (float(out.loss) + aux) * n / sum(counts)
            aux_total += aux
    assert aux_total > 0.5 * K * 2 * 0.99  # coef * (>= top_k) per micro-batch: a visible share of the loss
    loss, _, _ = trainer.optimizer_step(iter(group))
    assert loss == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------- training
def test_loss_falls_with_lora_only_trainable_params_and_gc_changes_nothing(tiny_dir_config, tiny_model_dir,
                                                                           tiny_batch):
    model = _mixlora(tiny_dir_config, tiny_model_dir, gc=True)
    plain = _mixlora(tiny_dir_config, tiny_model_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    plain.train()
    history = []
    for step in range(6):
        loss = model(**tiny_batch).loss + aux_loss(model, tiny_batch["attention_mask"])
        history.append(loss.item())
        loss.backward()
        if step == 0:  # gradient checkpointing recomputes the router: the gradients must not change
            (plain(**tiny_batch).loss + aux_loss(plain, tiny_batch["attention_mask"])).backward()
            ref = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
            for n, p in model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert history[-1] < history[0] - 0.3, history
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert any("experts" in n for n in changed) and any("self_attn" in n for n in changed)


class Payload:
    """Stands for an arbitrary pickled object in an adapter_model.bin."""


def test_train_resume_metrics_and_generate(tmp_path, capsys, monkeypatch):
    from slimtune.cli.main import main

    args = ("adapter.type=mixlora", "adapter.num_experts=4", "training.max_steps=8", "output.save_steps=4",
            "training.learning_rate=2e-2", "data.metric=none", "output.plots=true")
    full = train(recipe_from_dict(tiny(tmp_path / "full", *args)), progress=False)
    assert full.eval_after["eval_loss"] < full.eval_before["eval_loss"] - 0.2
    run = tmp_path / "full" / "run"
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(records) == 8 and (run / "router_load.png").is_file()
    for r in records:
        assert len(r["router_load"]) == 4 and sum(r["router_load"]) == pytest.approx(1, abs=1e-3)
        assert len(r["router_load_per_layer"]) == 2
    # killed after checkpoint-4, resumed: the same run bit for bit (trainable weights, routers, RNG, data position)
    run_killed_at(monkeypatch, 6, lambda: train(recipe_from_dict(tiny(tmp_path / "cut", *args)), progress=False))
    resumed = train(recipe_from_dict(tiny(tmp_path / "cut", *args, "training.resume_from_checkpoint=true")),
                    progress=False)
    assert resumed.resumed_from.name == "checkpoint-4"
    assert losses(tmp_path / "cut" / "run") == losses(run)
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the CLI generates with it; merge refuses with the reason
    assert main(["generate", str(run), "--instruction", "Repeat the last word.", "--input", "red green blue",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 2
    assert "cannot be merged into dense weights" in capsys.readouterr().err


OPTIMIZERS = {
    "adamw": (),
    "galore": ("optimizer.name=galore", "optimizer.rank=2", "optimizer.update_proj_gap=2", "training.max_grad_norm=0",
               "optimizer.per_layer=true"),
    "frugal": ("optimizer.name=frugal", "optimizer.update_gap=2", "optimizer.density=0.5"),
    "spam": ("optimizer.name=spam", "optimizer.delta_t=2", "optimizer.warmup_steps=1", "optimizer.density=0.5"),
    "mezo": ("optimizer.name=mezo", "training.learning_rate=1e-3"),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_the_adapter(tmp_path, name):
    recipe = recipe_from_dict(tiny(tmp_path, "adapter.type=mixlora", "adapter.num_experts=4", "training.max_steps=3",
                                   "data.metric=none", "data.val_size=4", *OPTIMIZERS[name]))
    trainer = Trainer(recipe, prepare(recipe), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.params}
    result = trainer.train()
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    moved = [n for n, p in trainer.params if not torch.equal(p, before[n])]
    assert any("moe_gate" in n for n in moved) and any("experts" in n for n in moved)
    if name in ("galore", "frugal", "spam"):  # targets: attention and expert LoRA; routers stay on AdamW
        key = {"galore": "rank", "frugal": "is_proj_params", "spam": "density"}[name]
        special = [g for g in trainer.optimizer.param_groups if g.get(key)]
        targeted = {id(p) for g in special for p in g["params"]}
        names = {n for n, p in trainer.params if id(p) in targeted}
        assert names and all("lora_" in n for n in names)
        assert any("experts" in n for n in names) and any("self_attn" in n for n in names)


# --------------------------------------------------------------------------------------------------- saving
def test_save_load_round_trip_and_official_files(tmp_path, tiny_dir_config, tiny_model_dir, tiny_tokenizer):
    model = _mixlora(tiny_dir_config, tiny_model_dir, dropout=0.05, jitter_noise=0.01, router_aux_loss_coef=0.01,
                     expert_lora={"r": 2, "alpha": 4})
    _randomize(model)
    out = tmp_path / "adapter"
    save_adapter(model, out, tiny_tokenizer)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MIXLORA" and config["routing_strategy"] == "mixlora"
    assert config["act_fn"] == "silu" and config["lora_alpha"] == 8 and isinstance(config["lora_alpha"], int)
    assert config["expert_lora"] == {"r": 2, "lora_alpha": 4, "lora_dropout": 0.05}
    assert config["router_aux_loss_coef"] == 0.01 and "jitter_noise" not in config
    assert json.loads((out / "slimtune.json").read_text())["mixlora"]["jitter_noise"] == 0.01
    st = load_file(out / "adapter_model.safetensors")
    pt = torch.load(out / "adapter_model.bin", weights_only=True)
    assert st.keys() == pt.keys() and all(torch.equal(st[k], pt[k]) for k in st)
    assert {"mixlora.layers.1.mlp.moe_gate.weight", "mixlora.layers.0.self_attn.q_proj.lora_A.weight",
            "mixlora.layers.0.mlp.down_proj.experts.3.lora_B.weight"} <= st.keys()
    assert st["mixlora.layers.0.mlp.gate_proj.experts.1.lora_A.weight"].shape == (2, 64)

    loaded, _ = load_for_inference(out, "cpu")
    assert loaded.mixlora_settings == model.mixlora_settings  # coef, jitter, expert r/alpha: nothing changed
    assert torch.equal(_logits(loaded), _logits(model))
    # safetensors is preferred; without it the .bin is read (weights_only)
    (out / "adapter_model.bin").write_bytes(b"not a pickle")
    assert torch.equal(_logits(load_for_inference(out, "cpu")[0]), _logits(model))
    (out / "adapter_model.safetensors").unlink()
    torch.save(pt, out / "adapter_model.bin")
    assert torch.equal(_logits(load_for_inference(out, "cpu")[0]), _logits(model))
    torch.save({**pt, "payload": Payload()}, out / "adapter_model.bin")  # any object: a pickle could run code
    with pytest.raises(SlimtuneError, match="refusing to unpickle"):
        load_for_inference(out, "cpu")
    with pytest.raises(SlimtuneError, match="MixLoRA adapter, which cannot be merged"):
        merge_adapter(out, tmp_path / "merged")
    # trainer checkpoints: trainable weights round-trip, strictly
    sd = trainable_state_dict(model)
    fresh = _mixlora(tiny_dir_config, tiny_model_dir, expert_lora={"r": 2, "alpha": 4})
    load_trainable_state_dict(fresh, {k: v.clone() for k, v in sd.items()})
    assert torch.equal(_logits(fresh), _logits(model))


def test_4bit_base_forward_backward_generate_and_reload(tmp_path, tiny_dir_config, tiny_model_dir, tiny_tokenizer):
    model = _mixlora(tiny_dir_config, tiny_model_dir, quantized=True, gc=True)
    assert torch.equal(_logits(model), _logits(_base(tiny_dir_config, tiny_model_dir, quantized=True)))  # identity
    calls = []

    def no_empty_input(module, args):
        calls.append(args[0].shape[0])
        assert args[0].numel() > 0, "a 4-bit layer got an empty input"  # bnb on CPU would kill the process

    hooks = [m.register_forward_pre_hook(no_empty_input) for m in model.modules()
             if type(m).__name__ == "Linear4bit" and not hasattr(m, "lora_A")]
    model.train()
    loss = model(**{"input_ids": IDS, "attention_mask": MASK, "labels": IDS}).loss + aux_loss(model, MASK)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "moe_gate" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    _randomize(model)
    model.eval()
    calls.clear()
    text = generate(model, tiny_tokenizer, "Instruction: name a colour.", max_new_tokens=6)
    assert isinstance(text, str) and calls.count(1) > 0  # one-token decode steps ran (experts left empty)
    empty = [layer for layer in mixlora_layers(model)
             if torch.bincount(layer.router_logits.topk(K).indices.flatten(), minlength=E).eq(0).any()]
    assert empty  # the last decode step left experts without tokens, and nothing crashed
    for h in hooks:
        h.remove()
    save_adapter(model, tmp_path / "adapter", tiny_tokenizer)
    loaded, _ = load_for_inference(tmp_path / "adapter", "cpu")
    assert loaded.is_loaded_in_4bit
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- recipe
@pytest.mark.parametrize("overrides, message", [
    (("adapter.num_experts=4",), "adapter.num_experts is only used by adapter.type mixlora"),
    (("adapter.type=mixlora", "adapter.top_k=5", "adapter.num_experts=4"), "adapter.top_k 5 exceeds"),
    (("adapter.type=mixlora", "adapter.target_modules=[q_proj,v_proj]"), "names no MLP projection"),
    (("adapter.type=mixlora", "adapter.modules_to_save=[lm_head]"), "modules_to_save with adapter.type mixlora"),
])
def test_recipe_refuses_what_mixlora_cannot_do(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(tiny(tmp_path, *overrides))


def test_recipe_4bit_mixlora_and_unknown_names(tmp_path, tiny_dir_config, tiny_model_dir):
    recipe = recipe_from_dict(tiny(tmp_path, "adapter.type=mixlora", "model.load_in_4bit=true"))
    assert recipe.quantized and recipe.model.quantization.quant_type == "nf4"
    assert not recipe_from_dict(tiny(tmp_path, "adapter.type=mixlora")).quantized
    with pytest.raises(SlimtuneError, match="'q_porj'.*valid: q_proj, k_proj, v_proj, o_proj, gate_proj"):
        _mixlora(tiny_dir_config, tiny_model_dir, target_modules=["q_porj", "down_proj"])
    with pytest.raises(SlimtuneError, match="adapter.act_fn 'swishy'"):
        _mixlora(tiny_dir_config, tiny_model_dir, act_fn="swishy")
