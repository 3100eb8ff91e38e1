"""AdamW with 8-bit moments (``state_bits=8``): bitsandbytes' AdamW8bit bit for bit (the reference), sliced updates,
32-bit vectors, exact state bytes, and the offloaded optimizer (NVMe, row chunks) equal to the in-memory run with
half the bytes per step. Helpers: tests/test_offloaded_updates.py."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from test_offloaded_updates import block_names, micro_batches, offloaded_steps
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune.optimizers.blockwise8 as blockwise8
from slimtune.offload.updates.offloaded_updates import OffloadedUpdates
from slimtune.optimizers import AdamW, allocated_state_bytes, build_optimizer, elementwise_params

HP = {"lr": 1e-2, "weight_decay": 0.1}


@pytest.mark.parametrize("shape", [(300, 512), (37, 100)], ids=["block-rows", "unaligned"])
def test_matches_bitsandbytes_adamw8bit_bit_for_bit_in_small_slices(monkeypatch, shape):
    """bitsandbytes.optim.AdamW8bit (blockwise, min_8bit_size 0) is the reference: weights and 8-bit codes equal
    after every step, with the kernel run over 512-value slices (so several slices, and a last partial block), and
    the run stays near fp32 torch.optim.AdamW (the 8-bit error is small, not zero)."""
    monkeypatch.setattr(blockwise8, "SLICE", 512)
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ours, ref, full = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    opts = [AdamW([ours], **HP, state_bits=8), bnb.optim.AdamW8bit([ref], **HP, min_8bit_size=0),
            torch.optim.AdamW([full], **HP)]
    for _ in range(6):
        g = torch.randn(shape)
        for p, opt in zip((ours, ref, full), opts):
            p.grad = g.clone()
            opt.step()
        assert torch.equal(ours, ref)
        state, bnb_state = opts[0].state[ours], opts[1].state[ref]
        assert torch.equal(state["exp_avg"], bnb_state["state1"]) and torch.equal(state["exp_avg_sq"],
                                                                                   bnb_state["state2"])
        assert torch.equal(state["exp_avg_absmax"], bnb_state["absmax1"])
    drift = (ours - full).abs().max()
    assert 0 < drift < 0.1 * 6 * HP["lr"]  # six steps of at most ~lr each, off by the 8-bit rounding only


def test_vectors_keep_32bit_moments_and_state_bytes_are_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.LayerNorm(300), torch.nn.Linear(300, 7))
    opt = build_optimizer("adamw", list(model.named_parameters()), **HP, state_bits=8)
    ref = torch.optim.AdamW([model[1].weight.detach().clone().requires_grad_()], lr=HP["lr"], weight_decay=0.0)
    model(torch.randn(5, 64)).square().mean().backward()
    ref.param_groups[0]["params"][0].grad = model[1].weight.grad.clone()
    opt.step()
    ref.step()
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            assert state["exp_avg"].dtype == (torch.uint8 if p.dim() == 2 else torch.float32)
            assert allocated_state_bytes(opt, p) == opt.state_bytes(p, group)
    assert torch.equal(model[1].weight, ref.param_groups[0]["params"][0])  # a norm (no decay): torch AdamW exactly
    w = model[0].weight
    assert opt.state_bytes(w, opt.param_groups[0]) == 4 + 2 * w.numel() + 8 * -(-w.numel() // 256)


def wide_llama() -> LlamaForCausalLM:
    """Rows of 256 values: every matrix's rows are whole quantization blocks, so all of them may be chunked."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).float()


def test_chunkable_parameters_are_those_whose_rows_are_whole_blocks():
    named = list(torch.nn.Sequential(torch.nn.Linear(256, 8), torch.nn.Linear(8, 256)).named_parameters())
    assert elementwise_params("adamw", named, {"state_bits": 32}) == {n for n, _ in named}
    assert elementwise_params("adamw", named, {"state_bits": 8}) == {"0.weight", "0.bias", "1.bias"}


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_offloaded_8bit_state_in_row_chunks_equals_in_memory_with_fewer_bytes(tmp_path, tier):
    """Masters and 8-bit state on NVMe (or CPU), the embedding and MLP staged as row chunks: every loss and weight
    equals the in-memory AdamW(state_bits=8) run bit for bit; on NVMe the bytes per step are well under the 32-bit
    state's (4 + 2 instead of 4 + 8 bytes per value, plus the absmax)."""
    data = micro_batches(3)
    reference = wide_llama()
    opt = build_optimizer("adamw", list(reference.named_parameters()), per_layer=True, **HP, state_bits=8)
    ref_losses = []
    for group in data:
        ref_losses.append(sum((l_ := reference(input_ids=ids, labels=ids).loss / len(group)).backward() or l_.item()
                              for ids in group))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def engine(model, bits):
        named = list(model.named_parameters())
        (tmp_path / str(bits)).mkdir()
        return OffloadedUpdates(named, block_names(model),
                                lambda n: build_optimizer("adamw", n, per_layer=True, **HP, state_bits=bits),
                                state_tier=tier, nvme_dir=str(tmp_path / str(bits)) if tier == "nvme" else None,
                                chunk_bytes=64 * 256 * 4, chunk_names=elementwise_params("adamw", named,
                                                                                        {"state_bits": bits}))

    model = wide_llama()
    with engine(model, 8) as eight:
        assert len(eight.blocks) > len(eight.grad_blocks)  # really chunked
        losses, _ = offloaded_steps(model, eight, data)
        bytes8 = eight.last_step.get("nvme_bytes_written", 0)
    assert losses == ref_losses
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    if tier == "nvme":
        model32 = wide_llama()
        with engine(model32, 32) as full:
            offloaded_steps(model32, full, data)
            bytes32 = full.last_step["nvme_bytes_written"]
        assert bytes8 < 0.6 * bytes32


# --------------------------------------------------------------------------------------- SPAM and FRUGAL
def _round_trip(optimizer) -> None:
    """The reference's 8-bit storage: every matrix's moments replaced by their blockwise 8-bit round trip."""
    from slimtune.optimizers.blockwise8 import dequantize_blockwise, quantize_blockwise

    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if p.dim() >= 2 and "exp_avg" in state:
                for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                    state[key] = dequantize_blockwise(*quantize_blockwise(state[key], signed), signed)


@pytest.mark.parametrize("name, hparams", [
    ("spam", {"delta_t": 3, "warmup_steps": 1, "grad_accu_steps": 1, "threshold": 1.5}),
    ("spam", {"delta_t": 3, "warmup_steps": 1, "grad_accu_steps": 1, "density": 0.5}),
    ("frugal", {"proj_type": "columns", "update_gap": 3, "density": 0.5}),
    ("frugal", {"proj_type": "blockwise", "update_gap": 2, "density": 0.5}),
], ids=["spam-dense-clipping", "spam-density-redraws", "frugal-columns", "frugal-blockwise"])
def test_spam_and_frugal_8bit_equal_their_32bit_math_on_round_tripped_moments(monkeypatch, name, hparams):
    """8-bit SPAM / FRUGAL (moments of matrices as blockwise codes, updated in 512-value slices) equal the 32-bit
    optimizer whose matrix moments are replaced by their 8-bit round trip after every step: the same math on the
    same stored values, across resets, spike clipping, mask re-draws and subspace refreshes. Exact state bytes."""
    monkeypatch.setattr(blockwise8, "SLICE", 512)
    torch.manual_seed(0)
    shapes = [(64, 40), (48, 64), (64,)]
    inits = [torch.randn(s) for s in shapes]
    models = [[torch.nn.Parameter(w.clone()) for w in inits] for _ in range(2)]
    named = [[(f"mlp.w{i}" if p.dim() == 2 else f"norm{i}", p) for i, p in enumerate(ps)] for ps in models]
    hp = {**HP, **hparams, "target_modules": ["mlp"]}
    eight = build_optimizer(name, named[0], **hp, state_bits=8)
    ref = build_optimizer(name, named[1], **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        grads = [torch.randn(s, generator=gen) * (1 + 20 * (torch.rand(s, generator=gen) > 0.97)) for s in shapes]
        for ps, opt in zip(models, (eight, ref)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        _round_trip(ref)
        for p, q in zip(*models):
            assert torch.equal(p, q)
    for group in eight.param_groups:
        for p in group["params"]:
            state = eight.state[p]
            if "exp_avg" in state:
                assert state["exp_avg"].dtype == (torch.uint8 if p.dim() == 2 else torch.float32)
            assert allocated_state_bytes(eight, p) == eight.state_bytes(p, group)
    assert any(s.get("exp_avg") is not None and s["exp_avg"].dtype == torch.uint8 for s in eight.state.values())
