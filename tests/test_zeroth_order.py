"""MeZO (optimizers/zeroth_order.py): SPSA math on a quadratic, bit-equality with the official protocol, n-SPSA,
weight-decay groups, a tiny Llama + LoRA trained forward-only, exact resume, LR schedulers."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from slimtune.optimizers.base import allocated_state_bytes
from slimtune.optimizers.zeroth_order import (
    MeZO,
    mezo_param_groups,
    noise_generators,
    noise_like,
    perturb_,
    projected_gradient,
)

D = 8


def quadratic(dtype=torch.float64):
    """f(θ) = ½ θᵀAθ − bᵀθ with A SPD; returns (A, b, θ0)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(D, D, generator=g, dtype=torch.float64)
    a = (m @ m.T / D + torch.eye(D, dtype=torch.float64)).to(dtype)
    b = torch.randn(D, generator=g, dtype=torch.float64).to(dtype)
    theta = torch.randn(D, generator=g, dtype=torch.float64).to(dtype)
    return a, b, theta


def f(a, b, theta):
    return 0.5 * theta @ a @ theta - b @ theta


def regen_z(seed, params):
    """z regenerated the documented way: one generator per device seeded with the step seed, params in order."""
    gen = noise_generators(seed)
    return [noise_like(p, gen(p.device)) for p in params]


def last(opt, key):
    anchor = opt.param_groups[0]["params"][0]
    return opt.state[anchor][key]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_step_is_bit_identical_to_the_official_protocol(dtype):
    """Official large_models/trainer.py with the same seed: torch.manual_seed + torch.normal per param, out-of-place
    p.data = p.data + s*z*eps, projected_grad = ((l1 - l2) / (2 eps)).item(), p - lr*(g*z) (no decay)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(37, 11, generator=gen).to(dtype)),
              torch.nn.Parameter(torch.randn(5, generator=gen).to(dtype))]
    ref = [p.detach().clone() for p in params]
    lr, eps = 1e-2, 1e-3
    opt = MeZO(params, lr=lr, eps=eps, seed=3)
    loss = opt.step(lambda: sum((p.float() ** 2).sum() for p in params))
    seed = int(last(opt, "seeds")[0])

    def official_perturb(s):
        torch.manual_seed(seed)
        for i, r in enumerate(ref):
            z = torch.normal(mean=0, std=1, size=r.size(), device=r.device, dtype=r.dtype)
            ref[i] = r + s * z * eps

    def official_loss():
        return sum((r.float() ** 2).sum() for r in ref)

    official_perturb(1)
    l1 = official_loss()
    official_perturb(-2)
    l2 = official_loss()
    official_perturb(1)
    g = ((l1 - l2) / (2 * eps)).item()
    torch.manual_seed(seed)
    for i, r in enumerate(ref):
        z = torch.normal(mean=0, std=1, size=r.size(), device=r.device, dtype=r.dtype)
        ref[i] = r - lr * (g * z)
    assert torch.equal(loss, l1)
    assert float(last(opt, "projected_grads")[0]) == g
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r)


def test_projected_gradient_single_seed_is_the_central_difference():
    a, b, theta0 = quadratic()
    theta = torch.nn.Parameter(theta0.clone())
    eps = 1e-3
    seen = []
    opt = MeZO([theta], lr=0.0, eps=eps, seed=5)

    def closure():
        seen.append(theta.detach().clone())
        return f(a, b, theta)

    opt.step(closure)
    (z,) = regen_z(int(last(opt, "seeds")[0]), [theta])
    plus = theta0 + z * eps  # the protocol's points: θ+εz, then (θ+εz) − 2εz
    minus = plus - z * (2 * eps)
    assert torch.equal(seen[0], plus) and torch.equal(seen[1], minus)
    g = float(last(opt, "projected_grads")[0])
    assert g == float((f(a, b, plus) - f(a, b, minus)) / (2 * eps))
    # Against the ideal θ−εz and the directional derivative zᵀ∇f (exact for a quadratic up to rounding).
    ideal = float((f(a, b, theta0 + eps * z) - f(a, b, theta0 - eps * z)) / (2 * eps))
    assert g == pytest.approx(ideal, rel=1e-9)
    assert g == pytest.approx(float(z @ (a @ theta0 - b)), rel=1e-6)


def test_projected_gradient_times_z_is_unbiased_for_the_gradient():
    a, b, theta0 = quadratic()
    theta = torch.nn.Parameter(theta0.clone())
    opt = MeZO([theta], lr=0.0, eps=1e-3, seed=11)
    samples, seeds = [], []
    for _ in range(3000):
        opt.step(lambda: f(a, b, theta))
        seeds.append(int(last(opt, "seeds")[0]))
        (z,) = regen_z(seeds[-1], [theta])
        samples.append(float(last(opt, "projected_grads")[0]) * z)
    est = torch.stack(samples)
    grad = a @ theta0 - b
    stderr = est.std(dim=0) / len(samples) ** 0.5
    assert torch.all((est.mean(dim=0) - grad).abs() < 5 * stderr), (est.mean(0), grad, stderr)
    assert stderr.max() < 0.1 * grad.norm()  # the check above has power: errors of 10% of |∇f| would fail
    assert len(set(seeds)) == len(seeds)  # a fresh seed every step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_perturbation_restore(dtype):
    """+ε, −2ε, +ε restores θ to within 2 ulp; not bit-exactly, even in float64 (as the official code)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    p = x.clone()
    eps = 1e-3
    for scale in (eps, -2 * eps, eps):
        perturb_(p, 7, scale)
    (z,) = regen_z(7, [p])
    ulp = torch.finfo(dtype).eps
    bound = 2 * ulp * (x.abs() + 2 * eps * z.abs())
    assert torch.all((p - x).abs() <= bound)
    assert not torch.equal(p, x)  # documents the inexact restore; MeZO inherits it from the official protocol


def test_perturb_with_int_seed_equals_generator_stream():
    p, q = torch.zeros(3, 5), torch.zeros(3, 5)
    perturb_(p, 42, 0.5)
    perturb_(q, torch.Generator().manual_seed(42), 0.5)
    assert torch.equal(p, q) and torch.equal(p, 0.5 * torch.randn(3, 5, generator=torch.Generator().manual_seed(42)))
    r, z = torch.zeros(3, 5), torch.randn(3, 5, generator=torch.Generator().manual_seed(42))
    perturb_(r, z, 0.5)  # a z drawn once (ZO streaming): the same values, z itself left as drawn
    assert torch.equal(r, p) and torch.equal(z, torch.randn(3, 5, generator=torch.Generator().manual_seed(42)))
    with pytest.raises(TypeError, match="Generator, an int seed or a drawn z tensor"):
        perturb_(p, 1.5, 0.5)


def test_update_matches_float64_formula_with_weight_decay_groups():
    a, b, _ = quadratic()
    gen = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(D, D, generator=gen, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(D, generator=gen, dtype=torch.float64))
    w0, b0 = w.detach().clone(), bias.detach().clone()
    lr, wd = 0.05, 0.1
    opt = MeZO(mezo_param_groups([("fc.weight", w), ("fc.bias", bias)], wd), lr=lr, eps=1e-3, seed=9)
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
    opt.step(lambda: f(a, b, w @ bias) + 0.5 * (bias ** 2).sum())
    zw, zb = regen_z(int(last(opt, "seeds")[0]), [w, bias])
    g = float(last(opt, "projected_grads")[0])
    assert torch.allclose(w, w0 - lr * (g * zw + wd * w0), rtol=0, atol=1e-13)
    assert torch.allclose(bias, b0 - lr * (g * zb), rtol=0, atol=1e-13)
    assert not torch.allclose(w, w0 - lr * (g * zw), rtol=0, atol=1e-6)  # decay really applied


def test_mezo_param_groups_by_name():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.lora_A.default.weight",
             "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
             "model.norm.weight", "encoder.layer_norm.weight", "fc.bias", "score.scale", "frozen.weight"]
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in names]
    params[-1].requires_grad_(False)
    groups = mezo_param_groups(list(zip(names, params)), 0.01)
    name_of = {id(p): n for n, p in zip(names, params)}
    decay = {name_of[id(p)] for p in groups[0]["params"]}
    no_decay = {name_of[id(p)] for p in groups[1]["params"]}
    # The rule is by name only (official): 1-D "score.scale" decays, embeddings decay.
    assert decay == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.lora_A.default.weight",
                     "score.scale"}
    assert no_decay == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                        "model.norm.weight", "encoder.layer_norm.weight", "fc.bias"}
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert mezo_param_groups([("fc.bias", params[6])], 0.01) == [{"params": [params[6]], "weight_decay": 0.0}]


def test_n_samples_is_the_average_of_the_per_seed_updates():
    a, b, _ = quadratic()
    gen = torch.Generator().manual_seed(6)
    w = torch.nn.Parameter(torch.randn(D, generator=gen, dtype=torch.float64))
    nb = torch.nn.Parameter(torch.randn(D, generator=gen, dtype=torch.float64))
    w0, nb0 = w.detach().clone(), nb.detach().clone()
    lr, wd, eps, n = 0.05, 0.2, 1e-3, 3
    opt = MeZO([{"params": [w], "weight_decay": wd}, {"params": [nb]}], lr=lr, eps=eps, n_samples=n, seed=1)
    calls = []

    def closure():
        calls.append(1)
        return f(a, b, w + nb)

    opt.step(closure)
    seeds, grads = last(opt, "seeds").tolist(), last(opt, "projected_grads").tolist()
    assert len(calls) == 2 * n and len(set(seeds)) == n and len(grads) == n
    zs = [regen_z(s, [w, nb]) for s in seeds]
    grad = a @ (w0 + nb0) - b
    for (zw, zn), g in zip(zs, grads):  # each sample's g is its own central difference (quadratic: exact zᵀ∇f)
        assert g == pytest.approx(float((zw + zn) @ grad), rel=1e-6)
    # Eq. (4): θ − lr ((1/n) Σ g_k z_k + wd θ), decay once.
    expect_w = w0 - lr * (sum(g * zw for (zw, _), g in zip(zs, grads)) / n + wd * w0)
    expect_nb = nb0 - lr * (sum(g * zn for (_, zn), g in zip(zs, grads)) / n)
    assert torch.allclose(w, expect_w, rtol=0, atol=1e-13)
    assert torch.allclose(nb, expect_nb, rtol=0, atol=1e-13)


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threading only adds overhead on a shared 2-core box
    yield
    torch.set_num_threads(threads)


def test_tiny_llama_lora_loss_decreases_forward_only(one_thread):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.eval()  # deterministic closure (the official zo_forward does the same)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = MeZO(mezo_param_groups(model.named_parameters(), 0.0), lr=3e-2, eps=1e-2, seed=0)
    grad_modes, losses = [], []

    def closure():
        grad_modes.append(torch.is_grad_enabled())
        out = model(**batch)
        assert out.loss.grad_fn is None and not out.loss.requires_grad
        return out.loss

    with torch.no_grad():
        clean_before = float(model(**batch).loss)
    for _ in range(200):
        losses.append(float(opt.step(closure)))
    with torch.no_grad():
        clean_after = float(model(**batch).loss)
    assert len(grad_modes) == 400 and not any(grad_modes)
    assert all(p.grad is None for p in model.parameters())
    first, final = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert final < first - 0.02, (first, final)
    assert clean_after < clean_before - 0.02, (clean_before, clean_after)
    for n, p in model.named_parameters():  # frozen base weights untouched, bit for bit
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def make_run(seed=0):
    a, b, _ = quadratic(torch.float32)
    gen = torch.Generator().manual_seed(8)
    w = torch.nn.Parameter(torch.randn(D, D, generator=gen))
    v = torch.nn.Parameter(torch.randn(D, generator=gen))
    opt = MeZO(mezo_param_groups([("w.weight", w), ("v.bias", v)], 0.05), lr=0.01, eps=1e-3, n_samples=2, seed=seed)
    return [w, v], opt, lambda: f(a, b, w @ v)


def test_state_dict_weights_only_round_trip_and_exact_resume():
    params, opt, closure = make_run()
    for _ in range(5):
        opt.step(closure)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_params = [p.detach().clone() for p in params]
    for _ in range(5):
        opt.step(closure)
    expected = [p.detach().clone() for p in params]

    params2, opt2, closure2 = make_run(seed=123)  # a different seed: the loaded state must win
    with torch.no_grad():
        for p, s in zip(params2, saved_params):
            p.copy_(s)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert int(last(opt2, "step")) == 5
    # torch casts floating-point params' state to the param dtype; the counters must survive it exactly.
    assert last(opt2, "seed_rng").dtype == torch.uint8 and last(opt2, "seeds").dtype == torch.int64
    saved_seeds = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["state"][0]["seeds"]
    assert torch.equal(last(opt2, "seeds"), saved_seeds)
    assert last(opt2, "projected_grads").dtype == torch.float64
    for _ in range(5):
        opt2.step(closure2)
    assert all(torch.equal(p, e) for p, e in zip(params2, expected))
    assert int(last(opt2, "step")) == 10
    assert torch.equal(last(opt2, "seeds"), last(opt, "seeds"))
    assert all(isinstance(v, torch.Tensor) for s in opt2.state_dict()["state"].values() for v in s.values())


def test_lr_scheduler_drives_the_update():
    a, b, theta0 = quadratic()
    theta = torch.nn.Parameter(theta0.clone())
    lr = 0.1
    opt = MeZO([theta], lr=lr, eps=1e-3, seed=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()" would fail here
        for k in range(3):
            before = theta.detach().clone()
            opt.step(lambda: f(a, b, theta))
            (z,) = regen_z(int(last(opt, "seeds")[0]), [theta])
            g = float(last(opt, "projected_grads")[0])
            assert torch.allclose(theta, before - lr * 0.5 ** k * g * z, rtol=0, atol=1e-13)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr / 8)


def test_state_bytes_and_transient_bytes():
    params, opt, closure = make_run()
    opt.step(closure)
    anchor = params[0]
    assert opt.state_bytes() == opt.state_bytes(anchor) == allocated_state_bytes(opt, anchor)
    assert opt.state_bytes() < 6000  # counters only: no moments, no gradients
    assert opt.state_bytes(params[1]) == allocated_state_bytes(opt, params[1]) == 0
    assert opt.transient_bytes() == D * D * 4


def test_argument_and_closure_validation():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="needs a closure"):
        MeZO([p]).step()
    with pytest.raises(ValueError, match="scalar loss"):
        MeZO([p]).step(lambda: torch.zeros(2))
    with pytest.raises(ValueError, match="float or a 0-dim tensor"):
        MeZO([p]).step(lambda: "1.0")
    for kwargs, match in [({"eps": 0.0}, "eps"), ({"lr": -1.0}, "lr"), ({"n_samples": 0}, "n_samples"),
                          ({"n_samples": 1.5}, "n_samples"), ({"weight_decay": -0.1}, "weight_decay"),
                          ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=match):
            MeZO([p], **kwargs)
    assert projected_gradient(2.0, 1.0, 0.25) == 2.0


# ---- noise="per_tensor" (block streaming's noise) -------------------------------------------------------------

def test_per_tensor_noise_regenerates_each_tensor_alone():
    """z_j comes from its own generator seeded with tensor_seed(seed, j): each tensor's perturbation and update can
    be replayed alone, in any order, and the result is the protocol's (perturb +ε, −2ε, +ε, then Eq. (3))."""
    from slimtune.optimizers.zeroth_order import noise_source, tensor_seed

    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(7, 5, generator=gen)) for _ in range(3)]
    start = [p.detach().clone() for p in params]
    lr, eps = 0.1, 1e-2
    opt = MeZO(params, lr=lr, eps=eps, seed=5, noise="per_tensor")
    opt.step(lambda: sum((p * p).sum() for p in params))
    seed, g = int(last(opt, "seeds")[0]), float(last(opt, "projected_grads")[0])
    for j in (2, 0, 1):  # any order, each from nothing but (seed, j)
        z = torch.randn(7, 5, generator=torch.Generator().manual_seed(tensor_seed(seed, j)))
        assert torch.equal(z, noise_like(params[j], noise_source("per_tensor", seed)(j, params[j])))
        expected = start[j] + z * eps
        expected = expected + z * (-2 * eps)
        expected = expected + z * eps
        expected = expected - (z * g) * lr
        assert torch.equal(params[j].detach(), expected), j
    # same distribution, different draws: same-shape tensors get different z, unlike one shared stream re-seeded
    zs = [noise_like(p, noise_source("per_tensor", seed)(j, p)) for j, p in enumerate(params)]
    assert not torch.equal(zs[0], zs[1]) and not torch.equal(zs[1], zs[2])
    assert not torch.equal(zs[0], regen_z(seed, params[:1])[0])  # not the sequential stream


def test_tensor_seeds_are_distinct_for_the_cpu_generator():
    """The CPU generator (mt19937) keeps only the low 32 bits of a seed: they must differ within a step."""
    from slimtune.optimizers.zeroth_order import tensor_seed

    for seed in (0, 1, 999_999_999):
        low = {tensor_seed(seed, j) & 0xFFFFFFFF for j in range(20_000)}
        assert len(low) == 20_000
    assert tensor_seed(3, 0) != tensor_seed(4, 0)
    with pytest.raises(ValueError, match="tensor_seed"):
        tensor_seed(-1, 0)


def test_noise_mode_is_state_and_resume_keeps_it():
    p = torch.nn.Parameter(torch.zeros(3))
    assert MeZO([p]).noise == "sequential"  # default: the official stream
    with pytest.raises(ValueError, match="noise must be one of sequential, per_tensor"):
        MeZO([p], noise="gaussian")
    per = MeZO([torch.nn.Parameter(torch.zeros(3))], noise="per_tensor")
    per.step(lambda: 1.0)
    saved = torch.load(io.BytesIO(_saved(per)), weights_only=True)
    again = MeZO([torch.nn.Parameter(torch.zeros(3))], noise="per_tensor")
    again.load_state_dict(saved)
    assert again.noise == "per_tensor" and last(again, "noise").dtype == torch.int64
    with pytest.raises(ValueError, match="noise='per_tensor'"):
        MeZO([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(saved)  # would continue with other noise
    legacy = torch.load(io.BytesIO(_saved(MeZO([torch.nn.Parameter(torch.zeros(3))]))), weights_only=True)
    del legacy["state"][0]["noise"]  # written before the option existed: sequential
    MeZO([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(legacy)
    with pytest.raises(ValueError, match="noise='sequential'"):
        MeZO([torch.nn.Parameter(torch.zeros(3))], noise="per_tensor").load_state_dict(legacy)


def _saved(opt) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def test_noise_recipe_field_reaches_the_optimizer():
    from pydantic import ValidationError

    from slimtune.finetune.recipe_optimizers import MeZOConfig
    from slimtune.optimizers import build_optimizer

    assert MeZOConfig().noise == "sequential"
    config = MeZOConfig(noise="per_tensor")
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer("mezo", [("w.weight", w)], lr=1e-3, weight_decay=0.0, **config.model_dump(exclude={"name"}))
    assert opt.noise == "per_tensor"
    with pytest.raises(ValidationError, match="per_tensor"):
        MeZOConfig(noise="random")
