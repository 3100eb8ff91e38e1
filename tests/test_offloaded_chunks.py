"""Bounded staging (offload.staging_chunk): the offloaded optimizer stages element-wise tensors in row chunks with
their own masters and state; runs equal the in-memory ones, staging RAM follows the chunk size, the planner counts
the same units, resume restores chunked state. Helpers and references: tests/test_offloaded_updates.py."""

from __future__ import annotations

import os

import pytest
import torch
from test_offloaded_updates import (
    HPARAMS,
    assert_same,
    block_names,
    in_memory_run,
    make_builder,
    micro_batches,
    offloaded_steps,
    reference_runs,
    tiny_llama,
)

from slimtune.offload.updates.offloaded_updates import OffloadedUpdates
from slimtune.optimizers import build_optimizer


@pytest.fixture(scope="module")
def references():
    return reference_runs()


CHUNK = 5000  # bytes of fp32 masters: 1250 values, i.e. 39 rows of the 256 x 32 embedding (6 chunks + one of 22)


def chunked_engine(model, tier: str, tmp_path, chunk: int | None = CHUNK, name: str = "adamw",
                   overlap: bool = True) -> OffloadedUpdates:
    """The engine over ``model`` with the chunk size, splitting the tensors the registry calls element-wise."""
    from slimtune.optimizers import elementwise_params

    named = list(model.named_parameters())
    return OffloadedUpdates(named, block_names(model), make_builder(name),
                            state_tier=tier, nvme_dir=str(tmp_path) if tier == "nvme" else None, overlap=overlap,
                            chunk_bytes=chunk, chunk_names=elementwise_params(name, named, HPARAMS[name]))


def assert_chunked(engine, chunk: int = CHUNK) -> None:
    """The embedding is staged as row chunks (an uneven last one), no unit is above the chunk size, and every
    parameter's rows are covered exactly once, in order."""
    embed = [blk.rows[0] for blk in engine.blocks if blk.names == ["model.embed_tokens.weight"]]
    assert [(r.start, r.stop) for r in embed] == [(a, min(a + 39, 256)) for a in range(0, 256, 39)]
    assert all(blk.master_bytes <= chunk for blk in engine.blocks)
    covered: dict[str, list] = {}
    for blk in engine.blocks:
        for name, rows, shape in zip(blk.names, blk.rows, blk.shapes):
            covered.setdefault(name, []).append((0, shape[0]) if rows is None else (rows.start, rows.stop))
    for gb in engine.grad_blocks:
        for name, shape in zip(gb.names, gb.shapes):
            spans = covered[name]
            assert spans[0][0] == 0 and spans[-1][1] == (shape[0] if len(shape) else 1)
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_chunked_adamw_equals_in_memory(tmp_path, tier, clip):
    """Tensors larger than chunk_bytes are updated as row chunks with their own state: with gradient accumulation
    (2 micro-batches) and with global-norm clipping (norm over whole-parameter gradients, as clip_grad_norm_), the
    run equals in-memory torch-numerics AdamW bit for bit, and the clipping norms are the same numbers."""
    data = micro_batches(4)
    ref_losses, ref_norms, ref_weights, _ = in_memory_run("adamw", data, clip=clip)
    model = tiny_llama()
    with chunked_engine(model, tier, tmp_path, overlap=not clip) as engine:
        assert_chunked(engine)
        losses, norms = offloaded_steps(model, engine, data, clip=clip)
        assert len(engine.blocks) > len(engine.grad_blocks)
    assert norms == (ref_norms if clip else [None] * len(data))
    assert_same("adamw", losses, model, ref_losses, ref_weights)


def test_staging_ram_follows_the_chunk_size_not_the_largest_tensor(tmp_path):
    """NVMe tier: the staging ring is 3 buffers of the largest unit. Whole tensors: the embedding's masters + AdamW
    state; chunks: a chunk's. The measured peak stays within the engine's prediction in both cases."""
    data = micro_batches(2)
    measured = {}
    for chunk in (None, CHUNK):
        model = tiny_llama()
        with chunked_engine(model, "nvme", tmp_path, chunk=chunk) as engine:
            offloaded_steps(model, engine, data)
            io = engine.swapper.io_bytes
            largest = max(io(lay.nbytes) for lay in engine.layouts)
            assert engine.swapper.staging_bytes == 3 * largest
            assert engine.peak_resident_bytes()["cpu"] <= engine.predicted_resident_bytes()["cpu"]
            measured[chunk] = engine.swapper.staging_bytes
    embedding = 256 * 32 * (4 + 8)  # fp32 master + two fp32 moments
    assert measured[None] >= 3 * embedding
    assert measured[CHUNK] <= 3 * io(3 * CHUNK + 256) < measured[None] / 4  # a chunk: masters + moments


def test_plan_counts_chunked_units_like_the_engine(tmp_path):
    """The planner's staging estimate (block_sizes' units -> the plan's NVMe regions and CPU staging) equals the
    engine's own prediction for the same model, with chunks and without (a chunk above every tensor)."""
    from test_train import tiny
    from transformers import AutoModelForCausalLM

    from slimtune.finetune.offloading import _NOT_MEASURED, offloaded_updates
    from slimtune.finetune.planning import plan_recipe
    from slimtune.finetune.recipe import recipe_from_dict
    from slimtune.finetune.sizing import model_config

    staging = {}
    for chunk in ("5000", "1GiB"):
        recipe = recipe_from_dict(tiny(tmp_path, "adapter.type=none", "training.max_grad_norm=0",
                                       "offload.params=gpu", "offload.gradients=cpu", "offload.optimizer_state=nvme",
                                       f"offload.nvme_dir={tmp_path}", f"offload.staging_chunk={chunk}"))
        config = model_config(recipe)
        plan = plan_recipe(recipe, config=config, bandwidths=_NOT_MEASURED, runtime_bytes=0)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float()
        builder = lambda named: build_optimizer("adamw", named, per_layer=True, lr=1e-3, weight_decay=0.0)  # noqa
        engine, _ = offloaded_updates(model, builder, "nvme", str(tmp_path), overlap=True,
                                      chunk_bytes=recipe.offload.staging_chunk)
        with engine:
            predicted = engine.predicted_resident_bytes()
            grads = sum(blk.master_bytes for blk in engine.blocks)
            assert plan.breakdown["cpu"]["buffers"] == predicted["cpu"] - grads  # ring + a first update's state
            assert plan.breakdown["nvme"]["master"] + plan.breakdown["nvme"]["state"] == predicted["nvme"]
            staging[chunk] = engine.swapper.staging_bytes
            if chunk == "5000":
                assert len(engine.blocks) > len(engine.grad_blocks)
    assert staging["5000"] * 4 < staging["1GiB"]


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_chunked_resume_equals_uninterrupted(tmp_path, tier):
    """Save after step 2 with chunked state (one file per unit, rows in offload.json), load into a fresh model and
    engine, continue: bit for bit the in-memory run. A different chunk size is refused, naming the setting."""
    data = micro_batches(4)
    ref_losses, _, ref_weights, _ = in_memory_run("adamw", data)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model = tiny_llama()
    with chunked_engine(model, tier, tmp_path / "a") as engine:
        first, _ = offloaded_steps(model, engine, data[:2])
        engine.save(tmp_path / "ckpt")
        units = len(engine.blocks)
    assert len([f for f in os.listdir(tmp_path / "ckpt") if f.startswith("block-")]) == units
    with chunked_engine(tiny_llama(), tier, tmp_path / "b", chunk=2 * CHUNK) as other, \
            pytest.raises(ValueError, match="staging_chunk"):
        other.load(tmp_path / "ckpt")
    fresh = tiny_llama()
    torch.nn.init.normal_(fresh.model.embed_tokens.weight)  # whatever the fresh weights are, load() replaces them
    with chunked_engine(fresh, tier, tmp_path / "b") as engine:
        engine.load(tmp_path / "ckpt")
        assert engine.steps == 2
        rest, _ = offloaded_steps(fresh, engine, data[2:])
    assert_same("adamw", first + rest, fresh, ref_losses, ref_weights)


def test_only_elementwise_parameters_are_chunked(tmp_path):
    """The registry decides per parameter: every AdamW tensor is element-wise; GaLore's unprojected ones (embedding,
    head, norms) run plain AdamW and are, its projected matrices are not (nor FRUGAL's or SPAM's, whose draws are
    seeded by parameter index); the planner's units follow."""
    from test_train import tiny

    from slimtune.finetune.recipe import recipe_from_dict
    from slimtune.finetune.sizing import block_sizes
    from slimtune.optimizers import ELEMENTWISE, elementwise_params

    assert ELEMENTWISE == {"adamw", "galore"}
    named = list(tiny_llama().named_parameters())
    assert elementwise_params("adamw", named, HPARAMS["adamw"]) == {n for n, _ in named}
    galore = elementwise_params("galore", named, HPARAMS["galore"])
    assert "model.embed_tokens.weight" in galore and not any("proj" in n for n in galore)
    assert elementwise_params("galore", named, {**HPARAMS["galore"], "state_bits": 8}) == set()
    assert elementwise_params("frugal", named, {}) == elementwise_params("spam", named, {}) == set()
    units = {}
    for name in ("adamw", "galore", "frugal"):
        for chunk in ("4096", "1GiB"):
            recipe = recipe_from_dict(tiny(tmp_path, "adapter.type=none", f"optimizer.name={name}",
                                           f"offload.staging_chunk={chunk}"))
            units[name, chunk] = [b.units for b in block_sizes(recipe)]
    assert units["frugal", "4096"] == units["frugal", "1GiB"]
    assert units["adamw", "4096"] != units["adamw", "1GiB"]
    assert max(n for block in units["adamw", "4096"] for n, _ in block) <= 1024
    # GaLore: the embedding is split in row chunks; the projected layer matrices stay whole units, above the chunk
    assert units["galore", "4096"][0] != units["galore", "1GiB"][0]
    assert max(n for n, _ in units["galore", "4096"][0]) <= 1024
    largest_matrix = max(p.numel() for n, p in named if "proj" in n)
    assert max(n for block in units["galore", "4096"][1:-1] for n, _ in block) == largest_matrix > 1024


def test_galore_chunks_its_unprojected_tensors_and_equals_in_memory(tmp_path, references):
    """GaLore through the engine with a tiny chunk: the embedding is staged in row chunks, every projected matrix
    whole, and the run equals the in-memory one."""
    data, refs = references
    ref_losses, _, ref_weights, _ = refs["galore"]
    model = tiny_llama()
    with chunked_engine(model, "nvme", tmp_path, name="galore") as engine:
        rows = {n: r for blk in engine.blocks for n, r in zip(blk.names, blk.rows)}
        assert rows["model.embed_tokens.weight"] is not None
        assert all(r is None for n, r in rows.items() if "proj" in n)
        losses, _ = offloaded_steps(model, engine, data)
    assert_same("galore", losses, model, ref_losses, ref_weights)


def test_streamed_full_training_with_chunks_equals_in_memory(tmp_path, monkeypatch):
    """`slimtune train`, full fine-tuning with params and state on NVMe and a tiny staging_chunk: streamed layers'
    weights are published row chunk by row chunk into their NVMe homes (write_home with rows) and the run equals
    the in-memory one (same tolerance as the whole-tensor test in test_offload_train.py)."""
    from test_offload_train import FULL, assert_same_run, train

    from slimtune.offload.stream.streamer import BlockStreamer

    original, seen = BlockStreamer.write_home, []

    def spy(self, i, values, rows=None):
        seen.append(bool(rows))
        return original(self, i, values, rows)

    opt = ("optimizer.name=adamw", "training.max_grad_norm=0")
    expected = train(tmp_path, "memory", *FULL, *opt)
    monkeypatch.setattr(BlockStreamer, "write_home", spy)
    got = train(tmp_path, "offload", *FULL, *opt, "offload.optimizer_state=nvme", "offload.params=nvme",
                f"offload.nvme_dir={tmp_path}", "offload.staging_chunk=4096")
    assert any(seen) and not all(seen)  # row chunks and whole tensors both reached the homes
    assert_same_run(expected, got, atol=2e-6)
