"""OffloadedUpdates: full-parameter training with fp32 masters, grads and optimizer state on CPU or NVMe.

Every run is compared with the plain in-memory run (the same optimizer over the model's own parameters, autograd's
gradient accumulation, ``optimizer.step()``), on a tiny Llama built from a config, fp32 on CPU, 2 micro-batches per
optimizer step.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.offload.store import nvme as nvme_module
from slimtune.offload.store.nvme import NvmeStoreError
from slimtune.offload.updates.offloaded_updates import OffloadedUpdates
from slimtune.optimizers import allocated_state_bytes, build_optimizer

VOCAB = 256
HPARAMS = {
    "adamw": {"lr": 1e-2, "weight_decay": 0.1},
    # refresh every 2 steps: the runs below cross projector refreshes
    "galore": {"lr": 1e-2, "weight_decay": 0.1, "rank": 4, "update_proj_gap": 2},
    "frugal": {"lr": 1e-2, "weight_decay": 0.1, "update_gap": 2, "density": 0.5},
    # sparse momentum re-drawn before every reset (delta_t 2): state changes shape, finish_step pages state in
    "spam": {"lr": 1e-2, "weight_decay": 0.1, "delta_t": 2, "warmup_steps": 1, "grad_accu_steps": 1,
             "density": 0.5},
}


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).float()


def block_names(model) -> list[list[str]]:
    """embed, layers.0 .. layers.L-1, final norm: the engine's blocks (tied LM head = the embedding)."""
    blocks: dict[int, list[str]] = {}
    for name, p in model.named_parameters():
        key = int(name.split(".")[2]) + 1 if ".layers." in name else (0 if "embed" in name else 10**6)
        blocks.setdefault(key, []).append(name)
    return [blocks[k] for k in sorted(blocks)]


def micro_batches(steps: int, accumulation: int = 2) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randint(0, VOCAB, (2, 12), generator=gen) for _ in range(accumulation)] for _ in range(steps)]


def make_builder(name: str, **overrides):
    return lambda named: build_optimizer(name, named, per_layer=True, **{**HPARAMS[name], **overrides})


def backward(model, group, engine=None) -> float:
    """One optimizer step's micro-batches, each loss scaled by its share (the trainer's token weighting)."""
    total = 0.0
    for i, ids in enumerate(group):
        if engine is not None:
            engine.final = i == len(group) - 1
        loss = model(input_ids=ids, labels=ids).loss / len(group)
        loss.backward()
        total += loss.item()
    return total


def in_memory_run(name: str, data, clip: float = 0.0, **overrides):
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_builder(name, **overrides)(list(model.named_parameters()))
    losses, norms = [], []
    for group in data:
        losses.append(backward(model, group))
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}, optimizer


def new_engine(model, name: str, tier: str, tmp_path, overlap: bool = True, threads: int = 1,
               **overrides) -> OffloadedUpdates:
    return OffloadedUpdates(list(model.named_parameters()), block_names(model), make_builder(name, **overrides),
                            state_tier=tier, nvme_dir=str(tmp_path) if tier == "nvme" else None, overlap=overlap,
                            threads=threads)


def offloaded_steps(model, engine, data, clip: float = 0.0):
    losses, norms = [], []
    for group in data:
        losses.append(backward(model, group, engine))
        assert all(p.grad is None for p in model.parameters())  # every gradient left the device in its hook
        norms.append(engine.step(clip))
    return losses, norms


def assert_same(name, got_losses, got_model, ref_losses, ref_weights):
    weights = {n: p.detach() for n, p in got_model.named_parameters()}
    if name == "adamw":  # the same elementwise per-tensor code on the same fp32 values: bit for bit
        assert got_losses == ref_losses
        assert all(torch.equal(weights[n], ref_weights[n]) for n in ref_weights)
    else:  # SVD / matmuls in a worker thread: allow for a BLAS that picks its kernel by thread
        assert got_losses == pytest.approx(ref_losses, rel=1e-6)
        for n in ref_weights:
            torch.testing.assert_close(weights[n], ref_weights[n], rtol=1e-6, atol=1e-7)


def swap_files(directory) -> list[str]:
    return [f for f in os.listdir(directory) if f.endswith(".swap")]


def reference_runs():
    """Five steps of in-memory AdamW and GaLore (the references the offloaded runs are compared with)."""
    data = micro_batches(5)
    return data, {name: in_memory_run(name, data) for name in ("adamw", "galore")}


@pytest.fixture(scope="module")
def references():
    return reference_runs()


@pytest.mark.parametrize("name", ["adamw", "galore"])
@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("overlap", [True, False])
def test_offloaded_equals_in_memory(tmp_path, references, name, tier, overlap):
    data, refs = references
    ref_losses, _, ref_weights, ref_opt = refs[name]
    model = tiny_llama()
    with new_engine(model, name, tier, tmp_path, overlap=overlap) as engine:
        losses, norms = offloaded_steps(model, engine, data)
        assert norms == [None] * len(data)
        assert_same(name, losses, model, ref_losses, ref_weights)
        if tier == "nvme":  # between steps no optimizer state is left in RAM
            assert not any(engine.optimizer.state.values())
            assert len(swap_files(tmp_path)) == 1
        else:  # the same state as the in-memory optimizer's, held in RAM
            masters = [m for blk in engine.blocks for m in blk.masters]
            assert sum(allocated_state_bytes(engine.optimizer, m) for m in masters) == \
                sum(allocated_state_bytes(ref_opt, p) for g in ref_opt.param_groups for p in g["params"]) > 0
    assert swap_files(tmp_path) == []  # close() removed the swap file


def test_two_update_workers_equal_in_memory(tmp_path, references):
    """threads=2: two blocks update at once, in a ring of 4 staging buffers."""
    data, refs = references
    ref_losses, _, ref_weights, _ = refs["adamw"]
    model = tiny_llama()
    with new_engine(model, "adamw", "nvme", tmp_path, threads=2) as engine:
        assert len(engine.swapper.slots) == 4
        losses, _ = offloaded_steps(model, engine, data)
    assert_same("adamw", losses, model, ref_losses, ref_weights)


def test_state_that_outgrows_its_prediction_moves_to_a_new_region(tmp_path):
    """FRUGAL blockwise activates other tensors at each refresh, so a block's state grows past what state_bytes
    predicted at the start: the block moves to a bigger region, and the run still equals the in-memory one."""
    data = micro_batches(6)
    blockwise = {"proj_type": "blockwise", "density": 0.34}
    ref_losses, _, ref_weights, _ = in_memory_run("frugal", data, **blockwise)
    model = tiny_llama()
    with new_engine(model, "frugal", "nvme", tmp_path, **blockwise) as engine:
        losses, _ = offloaded_steps(model, engine, data)
        assert engine.swapper.moves > 0
        assert engine.swapper.store.reserved_bytes > engine.predicted_resident_bytes()["nvme"]
    assert_same("frugal", losses, model, ref_losses, ref_weights)
    assert swap_files(tmp_path) == []


def test_on_updated_routes_the_new_weights(tmp_path, references):
    """With ``on_updated`` set the engine leaves the device params alone and hands each updated block over (what a
    streamer with a home buffer needs); copying them into the model reproduces the in-memory run."""
    data, refs = references
    ref_losses = refs["adamw"][0]
    model = tiny_llama()
    params = dict(model.named_parameters())
    calls = []

    def route(block: int, updated) -> None:
        calls.append((block, [name for name, _, _ in updated]))
        assert all(rows is None for _, _, rows in updated)  # no chunk size: whole parameters
        with torch.no_grad():
            for name, master, _ in updated:
                params[name].copy_(master)

    with new_engine(model, "adamw", "nvme", tmp_path) as engine:
        engine.on_updated = route
        losses, _ = offloaded_steps(model, engine, data[:2])
        assert engine.stats()["param_bytes_to_device"] == 0
        names = block_names(model)
    assert sorted(calls) == sorted([(b, names[b]) for b in range(len(names))] * 2)
    assert losses == ref_losses[:2]
    stepped = in_memory_run("adamw", data[:2])[2]
    assert all(torch.equal(params[n].detach(), stepped[n]) for n in stepped)


def test_updates_start_during_backward_only_with_overlap(tmp_path):
    """overlap=True: when the embedding's gradient (the last one backward produces) arrives, every other block's
    update has been handed to the worker; overlap=False: none has, they wait for step()."""
    data = micro_batches(1, accumulation=1)
    for overlap in (True, False):
        model = tiny_llama()
        with new_engine(model, "adamw", "nvme", tmp_path, overlap=overlap) as engine:
            seen = []
            embed = model.model.embed_tokens.weight  # registered after the engine's hook: runs right after it
            embed.register_post_accumulate_grad_hook(lambda _, seen=seen: seen.append(len(engine._submitted)))
            offloaded_steps(model, engine, data)
            assert seen == [len(engine.blocks) if overlap else 0]
            lanes = {lane for lane, *_ in engine.last_step["timeline"]}
            assert lanes == {"update", "nvme read", "nvme write", "grad copy"}
            assert all(0 <= start <= end <= engine.last_step["step_seconds"]
                       for _, start, end, _ in engine.last_step["timeline"])


def test_a_projector_refresh_step_runs_its_updates_one_at_a_time(tmp_path, monkeypatch):
    """GaLore refreshing its projectors (steps 0 and 2 at update_proj_gap 2): backward waits for each block's
    update, so the SVD's scratch never meets more than that block's gradients; other steps keep the overlap (with
    slow updates, several blocks' gradients are held at once). The run still equals the in-memory one."""
    import time

    from slimtune.optimizers.galore import GaLoreAdamW

    real = GaLoreAdamW.update_param
    monkeypatch.setattr(GaLoreAdamW, "update_param", lambda self, p, group: (time.sleep(0.02), real(self, p, group)))
    data = micro_batches(4, accumulation=1)
    model = tiny_llama()
    held, most = [0], []
    with new_engine(model, "galore", "cpu", tmp_path) as engine:
        pool = engine._grad_pool
        take, give = pool.take, pool.give
        monkeypatch.setattr(pool, "take", lambda blk, dtype: (held.__setitem__(0, held[0] + 1),
                                                              most.__setitem__(-1, max(most[-1], held[0])),
                                                              take(blk, dtype)))
        monkeypatch.setattr(pool, "give", lambda blk: (held.__setitem__(0, held[0] - 1), give(blk)))
        for group in data:
            most.append(0)
            backward(model, group, engine)
            engine.step()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = engine.optimizer
    assert [any(opt.refreshes(s, g) for g in opt.param_groups) for s in range(4)] == [True, False, True, False]
    assert most[0] == most[2] == 1
    assert most[1] > 1 and most[3] > 1
    _, _, ref, _ = in_memory_run("galore", data)
    for n in ref:
        torch.testing.assert_close(weights[n], ref[n], rtol=1e-6, atol=1e-7)
    # a refresh without scratch (FRUGAL's column subsets) keeps the overlap; its SVD subspace does not
    for proj_type, alone in (("columns", False), ("svd", True)):
        with new_engine(tiny_llama(), "frugal", "cpu", tmp_path, proj_type=proj_type) as engine:
            assert any(engine.optimizer.refreshes(0, g) for g in engine.optimizer.param_groups)
            assert engine._refresh_step() is alone


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_clipping_equals_torch_clip_grad_norm(tmp_path, tier):
    data = micro_batches(4)
    ref_losses, ref_norms, ref_weights, _ = in_memory_run("adamw", data, clip=0.05)
    assert min(ref_norms) > 0.05  # the clip is active on every step
    model = tiny_llama()
    with new_engine(model, "adamw", tier, tmp_path, overlap=False) as engine:
        losses, norms = offloaded_steps(model, engine, data, clip=0.05)
    with new_engine(tiny_llama(), "adamw", "cpu", tmp_path) as overlapped, \
            pytest.raises(ValueError, match="overlap=False"):
        overlapped.step(1.0)
    assert norms == ref_norms
    assert_same("adamw", losses, model, ref_losses, ref_weights)


@pytest.mark.parametrize("name, tier", [("galore", "nvme"), ("spam", "nvme"), ("frugal", "cpu")])
def test_resume_equals_uninterrupted(tmp_path, name, tier):
    """Save after step 2, build a fresh model and engine, load, continue: the same as never stopping (across a
    GaLore/FRUGAL refresh and a SPAM mask re-draw; SPAM's counters live in a param group)."""
    data = micro_batches(4)
    ref_losses, _, ref_weights, _ = in_memory_run(name, data)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model = tiny_llama()
    with new_engine(model, name, tier, tmp_path / "a") as engine:
        first, _ = offloaded_steps(model, engine, data[:2])
        engine.save(tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == [f"block-0000{b}.safetensors" for b in range(4)] + ["groups.safetensors", "offload.json"]
    fresh = tiny_llama()
    torch.nn.init.normal_(fresh.model.embed_tokens.weight)  # whatever the fresh weights are, load() replaces them
    with new_engine(fresh, name, tier, tmp_path / "b") as engine:
        engine.load(tmp_path / "ckpt")
        assert engine.steps == 2
        rest, _ = offloaded_steps(fresh, engine, data[2:])
    assert_same(name, first + rest, fresh, ref_losses, ref_weights)
    assert swap_files(tmp_path / "a") == swap_files(tmp_path / "b") == []


def test_nvme_bytes_per_step_match_the_layout(tmp_path):
    data = micro_batches(3)
    model = tiny_llama()
    with new_engine(model, "adamw", "nvme", tmp_path) as engine:
        io = engine.swapper.io_bytes
        masters_only = sum(io(blk.master_bytes) for blk in engine.blocks)
        planned = engine.predicted_resident_bytes()["nvme"]  # from the optimizer's state_bytes
        per_step = []
        for group in data:
            offloaded_steps(model, engine, [group])
            per_step.append((engine.last_step["nvme_bytes_read"], engine.last_step["nvme_bytes_written"]))
        layout = sum(io(lay.nbytes) for lay in engine.layouts)
        # step 1 reads the masters written at construction, then every step reads and writes masters + state
        assert per_step == [(masters_only, layout), (layout, layout), (layout, layout)]
        assert layout == planned == engine.swapper.store.reserved_bytes
        assert engine.swapper.moves == 0
        total = sum(p.numel() for p in model.parameters())
        assert layout >= 3 * 4 * total  # fp32 master + two fp32 moments per parameter


def test_peak_ram_is_grads_plus_staging_not_masters_plus_state(tmp_path):
    """NVMe tier: the engine's RAM (its own byte accounting: grad buffers, staging ring, state a first update
    allocates before packing) stays within its prediction and below the in-memory masters + AdamW state."""
    layers = 8  # RAM is grads + a ring of 3 blocks, so the saving shows once there are more than a few blocks
    data = micro_batches(2)  # accumulation: every block's gradient buffer is held between the micro-batches
    model = tiny_llama(layers)
    reference = tiny_llama(layers)
    ref_opt = make_builder("adamw")(list(reference.named_parameters()))
    backward(reference, data[0])
    ref_opt.step()
    in_memory = sum(allocated_state_bytes(ref_opt, p) + 4 * p.numel() for p in reference.parameters())
    grads = 4 * sum(p.numel() for p in model.parameters())
    with new_engine(model, "adamw", "nvme", tmp_path) as engine:
        offloaded_steps(model, engine, data)
        peak, predicted = engine.peak_resident_bytes()["cpu"], engine.predicted_resident_bytes()["cpu"]
        assert grads + engine.swapper.staging_bytes <= peak <= predicted < in_memory
        assert engine.resident_bytes()["nvme"] >= in_memory  # what left RAM is on disk
        assert all(gb.grad_flat is None for gb in engine.grad_blocks)  # every buffer back in the pool after step()
    cpu_model = tiny_llama(layers)
    with new_engine(cpu_model, "adamw", "cpu", tmp_path) as engine:  # cpu tier: the prediction is exact
        offloaded_steps(cpu_model, engine, data)
        assert engine.peak_resident_bytes()["cpu"] == engine.predicted_resident_bytes()["cpu"] == in_memory + grads


def test_refusals(tmp_path):
    model = tiny_llama()
    named, blocks = list(model.named_parameters()), block_names(model)
    with pytest.raises(ValueError, match="zeroth-order"):
        OffloadedUpdates(named, blocks, lambda nm: build_optimizer("mezo", nm, lr=1e-3, weight_decay=0.0))
    with pytest.raises(ValueError, match="per_layer=True"):
        OffloadedUpdates(named, blocks, lambda nm: build_optimizer("adamw", nm, lr=1e-3, weight_decay=0.0))
    with pytest.raises(ValueError, match="missing"):
        OffloadedUpdates(named, blocks[:-1], make_builder("adamw"))
    with pytest.raises(ValueError, match="nvme_dir is required"):
        OffloadedUpdates(named, blocks, make_builder("adamw"), state_tier="nvme")
    with pytest.raises(ValueError, match="state_tier must be one of"):
        OffloadedUpdates(named, blocks, make_builder("adamw"), state_tier="gpu")
    with pytest.raises(NvmeStoreError, match="does not exist"):
        OffloadedUpdates(named, blocks, make_builder("adamw"), state_tier="nvme", nvme_dir=str(tmp_path / "nope"))
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())  # none left behind


def test_disk_too_small_fails_before_training(tmp_path, monkeypatch):
    """Capacity is reserved from state_bytes up front: a disk that cannot hold it fails in the constructor."""
    model = tiny_llama()
    with new_engine(model, "adamw", "nvme", tmp_path) as engine:
        needed = engine.swapper.store.capacity_bytes
        assert needed >= engine.predicted_resident_bytes()["nvme"]
    real = os.statvfs

    class Small:
        def __init__(self, st):
            self.f_bavail, self.f_frsize = (needed - 1) // st.f_frsize, st.f_frsize

    monkeypatch.setattr(nvme_module.os, "statvfs", lambda d: Small(real(d)))
    with pytest.raises(NvmeStoreError, match="offload.nvme_dir"):
        new_engine(tiny_llama(), "adamw", "nvme", tmp_path)
    assert swap_files(tmp_path) == []


def test_staging_groups_split_blocks_into_runs_no_larger_than_the_largest_tensor():
    from slimtune.offload.updates.offloaded_blocks import staging_groups

    blocks = [[("embed", 100)], [("q", 30), ("k", 30), ("v", 30), ("o", 30), ("mlp", 80), ("norm", 1)],
              [("head_norm", 1), ("head", 100)]]
    units = staging_groups(blocks)
    assert units == [(0, ["embed"]), (1, ["q", "k", "v"]), (1, ["o"]), (1, ["mlp", "norm"]),
                     (2, ["head_norm"]), (2, ["head"])]
    # every tensor exactly once, in order, never across blocks, and no unit above the largest tensor
    assert [n for _, names in units for n in names] == [n for block in blocks for n, _ in block]
    size = {n: k for block in blocks for n, k in block}
    assert all(sum(size[n] for n in names) <= 100 for _, names in units)


def test_bf16_model_one_micro_batch_equals_fp32_master_adamw_with_bf16_gradient_buffers(tmp_path):
    """The trainer's full fine-tuning of a bf16 model with state on NVMe (offloading.offloaded_updates: units of at
    most the largest tensor, one micro-batch, overlap): the CPU gradient buffers hold bf16 (half of fp32) and the run
    equals, bit for bit, mixed-precision AdamW in memory (fp32 masters, bf16 gradients widened, weights = masters
    cast to bf16); the staging ring is sized by the largest unit, not by a decoder layer."""
    from slimtune.finetune.offloading import offloaded_updates
    from slimtune.offload.updates.state_layout import align_up, planned_block_bytes

    data = micro_batches(4, accumulation=1)
    builder = make_builder("adamw")
    reference = tiny_llama(4).to(torch.bfloat16)
    masters = [(n, p.detach().float().requires_grad_(True)) for n, p in reference.named_parameters()]
    ref_opt = builder(masters)
    ref_losses = []
    for (ids,) in data:
        loss = reference(input_ids=ids, labels=ids).loss
        loss.backward()
        ref_losses.append(loss.item())
        with torch.no_grad():
            for (_, m), p in zip(masters, reference.parameters()):
                m.grad = p.grad.float()
            ref_opt.step()
            for (_, m), p in zip(masters, reference.parameters()):
                p.copy_(m)
                p.grad = None

    model = tiny_llama(4).to(torch.bfloat16)
    engine, owners = offloaded_updates(model, builder, "nvme", str(tmp_path), overlap=True)
    dtypes = set()
    take = engine._grad_pool.take
    engine._grad_pool.take = lambda blk, dtype: (dtypes.add(dtype), take(blk, dtype))[1]
    with engine:
        losses = []
        for (ids,) in data:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
            engine.step()
        assert dtypes == {torch.bfloat16}
        assert len(owners) > len(set(owners))  # some block is updated in more than one unit
        regions = [align_up(planned_block_bytes(blk.master_bytes, engine._planned_state(u)), 4096)
                   for u, blk in enumerate(engine.blocks)]
        per_block = [sum(r for r, o in zip(regions, owners) if o == b) for b in set(owners)]
        assert engine.swapper.staging_bytes == 3 * max(regions) < 3 * max(per_block)
    assert losses == ref_losses
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: gradients leave on a copy stream (GPU only)")
@pytest.mark.parametrize("accumulate", [False, True], ids=["one-micro-batch", "accumulated"])
def test_cuda_gradients_leave_on_a_copy_stream_and_equal_in_memory(tmp_path, accumulate):
    """On CUDA the hook queues each gradient's copy on the mover's stream into pinned memory (no synchronizing
    .to("cpu") in backward); straight into the buffer for a single micro-batch, through pinned staging summed by a
    worker when micro-batches accumulate. Same weights as AdamW in memory on the card."""
    data = [[ids.cuda() for ids in group] for group in micro_batches(3)]
    if not accumulate:
        data = [group[:1] for group in data]
    ref = tiny_llama().cuda()
    optimizer = make_builder("adamw")(list(ref.named_parameters()))
    for group in data:
        backward(ref, group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model = tiny_llama().cuda()
    with new_engine(model, "adamw", "nvme", tmp_path) as engine:
        offloaded_steps(model, engine, data)
        assert engine.grad_mover.stream is not None and all(gb.grad_flat is None for gb in engine.grad_blocks)
        assert (engine.grad_mover.staging_bytes > 0) == accumulate
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
