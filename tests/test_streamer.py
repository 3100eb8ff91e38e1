"""Block streaming of frozen weights (offload/stream/streamer.py): a streamed model trains and generates exactly like
the in-memory one, the prefetch window bounds what is resident, and swap files do not outlive the engine."""

from __future__ import annotations

import glob
import os
import warnings

import pytest
import torch

from slimtune.finetune.adapters import apply_adapter
from slimtune.finetune.model import build_base_model, load_model
from slimtune.finetune.recipe import AdapterConfig, ModelConfig
from slimtune.offload.blocks import model_blocks
from slimtune.offload.stream.streamer import BlockStreamer

LAYERS = 4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer, tiny_arch):
    config = ModelConfig(architecture=tiny_arch(num_hidden_layers=LAYERS), tokenizer_vocab_size=320)
    return build_base_model(config, tiny_tokenizer, seed=0, save_dir=tmp_path_factory.mktemp("stream-base"))


def lora_model(base_dir, quantized: bool = False):
    torch.manual_seed(0)
    config = ModelConfig(name_or_path=str(base_dir), load_in_4bit=quantized)
    model = load_model(config, base_dir, torch.device("cpu"), quantized, False)
    adapter = AdapterConfig(type="qlora" if quantized else "lora", r=4, alpha=8, dropout=0.1)
    return apply_adapter(model, adapter, quantized)


def train(model, batch, steps: int = 3):
    """A few AdamW steps (dropout on), then an eval loss and a greedy generation; returns everything observed."""
    torch.manual_seed(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        eval_loss = model(**batch).loss.item()
        generated = model.generate(input_ids=batch["input_ids"][:1, :5], max_new_tokens=6, do_sample=False)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, eval_loss, generated.tolist(), trained


@pytest.mark.parametrize("home,quantized,prefetch", [("cpu", False, 1), ("nvme", False, 2), ("cpu", True, 1),
                                                      ("nvme", True, 1)])
def test_streamed_training_equals_in_memory(base_dir, tiny_batch, tmp_path, home, quantized, prefetch):
    expected = train(lora_model(base_dir, quantized), tiny_batch)
    model = lora_model(base_dir, quantized)
    frozen = sum(p.numel() * p.element_size() for block in model_blocks(model)[1:-1] for _, p in block.params
                 if not p.requires_grad)
    streamer = BlockStreamer(model, home, "cpu", prefetch=prefetch, nvme_dir=str(tmp_path))
    assert streamer.home_bytes() >= frozen  # every frozen layer weight (4-bit codes included) left the device
    assert all(p.numel() == 0 for layer in streamer.layers for p in layer.params)  # placeholders until bound
    got = train(model, tiny_batch)
    assert got[:3] == expected[:3]  # losses, eval loss and generated tokens: bit-identical
    for name, value in expected[3].items():
        assert torch.equal(got[3][name], value), name
    # the window: the layer computing + `prefetch` layers in flight, never more (engine's own accounting)
    assert streamer.peak_bound == prefetch + 1
    assert streamer.stats["fetches"] >= 2 * LAYERS  # really streamed: forward and backward fetched layers
    streamer.close()
    assert not glob.glob(str(tmp_path / "*.swap"))


def test_cpu_home_fetches_leave_torch_thread_pool_to_the_training_thread(base_dir, tiny_batch, monkeypatch):
    """A fetch from a CPU home runs on an I/O thread; a ``Tensor.copy_`` there would open an OpenMP region beside
    the training thread's (measured: a QLoRA step 1.43x slower on 2 cores). It is a plain memmove instead: no torch
    copy runs off the main thread, and the streamed run still equals the in-memory one."""
    import threading

    from slimtune.offload.store.memory import host_copy

    expected = train(lora_model(base_dir), tiny_batch)
    model = lora_model(base_dir)
    streamer = BlockStreamer(model, "cpu", "cpu", prefetch=1)
    threads, real = set(), torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: (threads.add(threading.current_thread().name),
                                                                      real(self, *a, **k))[1])
    got = train(model, tiny_batch)
    monkeypatch.undo()
    assert streamer.stats["fetches"] >= 2 * LAYERS
    assert threads <= {threading.main_thread().name}
    assert got[:3] == expected[:3]
    streamer.close()
    a, b = torch.arange(10, dtype=torch.int16), torch.zeros(5, dtype=torch.int32)
    host_copy(b, a)
    assert torch.equal(b.view(torch.int16), a)
    with pytest.raises(ValueError, match="bytes"):
        host_copy(torch.zeros(3), a)


def test_detach_restores_an_ordinary_model(base_dir, tiny_batch, tmp_path):
    model = lora_model(base_dir)
    with torch.no_grad():
        before = model(**tiny_batch).logits
    streamer = BlockStreamer(model, "nvme", "cpu", nvme_dir=str(tmp_path))
    with torch.no_grad():
        streamed = model(**tiny_batch).logits
    streamer.detach()
    assert not glob.glob(str(tmp_path / "*.swap"))
    assert all(p.numel() > 0 for p in model.parameters())
    assert "forward" not in model_blocks(model)[1].module.__dict__  # hooks removed
    with torch.no_grad():
        after = model(**tiny_batch).logits
    assert torch.equal(before, streamed) and torch.equal(before, after)


def test_swap_file_lives_only_while_the_engine_does(base_dir, tmp_path):
    streamer = BlockStreamer(lora_model(base_dir), "nvme", "cpu", nvme_dir=str(tmp_path))
    files = glob.glob(str(tmp_path / "*.swap"))
    assert len(files) == 1 and os.path.getsize(files[0]) >= streamer.home_bytes()
    del streamer
    import gc

    gc.collect()
    assert not glob.glob(str(tmp_path / "*.swap"))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_buffered_fallback_when_o_direct_is_refused(base_dir, tiny_batch, tmp_path, monkeypatch):
    """A filesystem that refuses O_DIRECT (forced here) falls back to buffered I/O with a warning; results equal."""
    import slimtune.offload.store.nvme as nvme

    monkeypatch.setattr(nvme, "_O_DIRECT", 0)
    expected = train(lora_model(base_dir), tiny_batch, steps=2)
    model = lora_model(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streamer = BlockStreamer(model, "nvme", "cpu", nvme_dir=str(tmp_path))
    assert any("O_DIRECT" in str(w.message) for w in caught)
    assert streamer.store.direct is False
    assert train(model, tiny_batch, steps=2)[:3] == expected[:3]
    streamer.close()


def test_bad_arguments_are_refused(base_dir):
    model = lora_model(base_dir)
    with pytest.raises(ValueError, match="nvme_dir"):
        BlockStreamer(model, "nvme", "cpu")
    with pytest.raises(ValueError, match="prefetch"):
        BlockStreamer(model, "cpu", "cpu", prefetch=0)
    with pytest.raises(ValueError, match="home"):
        BlockStreamer(model, "disk", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: copy stream, events, pinned homes (GPU only)")
@pytest.mark.parametrize("home", ["cpu", "nvme"])
def test_cuda_streams_equal_in_memory(base_dir, tiny_batch, tmp_path, home):
    """On a GPU the fetches run on a copy stream into device slots from pinned homes; results must not change."""
    def on_cuda(model):
        return model.to("cuda")

    batch = {k: v.cuda() for k, v in tiny_batch.items()}
    expected = train(on_cuda(lora_model(base_dir)), batch)
    model = on_cuda(lora_model(base_dir))
    streamer = BlockStreamer(model, home, "cuda", prefetch=1, nvme_dir=str(tmp_path))
    got = train(model, batch)
    assert got[:3] == expected[:3] and streamer.peak_bound == 2
    streamer.close()


def test_write_home_writes_an_nvme_layer_once_complete_and_merges_partial_ones_at_release(base_dir, tmp_path):
    """What the offloaded optimizer does with a layer it updates in several units: values (fp32 masters) are cast
    into the home, a layer goes to disk once all its trainable tensors arrived, and a layer only partly updated
    (some unit got no gradient) is merged with its home's other tensors at release_all."""
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path=str(base_dir)), base_dir, torch.device("cpu"), False, False)
    for p in model.parameters():
        p.requires_grad_(True)
    streamer = BlockStreamer(model, "nvme", "cpu", nvme_dir=str(tmp_path), stream_trainable=True)
    try:
        before = [[v for _, v in streamer.layer_tensors(i)] for i in (0, 1)]
        new = [[torch.randn(v.shape, dtype=torch.float32) for v in layer] for layer in before]
        n = len(new[0])
        streamer.write_home(0, {k: new[0][k] for k in range(n) if k % 2 == 0})  # half of layer 0's tensors
        streamer.write_home(1, {k: new[1][k] for k in range(n) if k % 2 == 0})  # all of layer 1's, in two calls
        streamer.write_home(1, {k: new[1][k] for k in range(n) if k % 2 == 1})
        now = [[v for _, v in streamer.layer_tensors(i)] for i in (0, 1)]
        assert all(torch.equal(a, b) for a, b in zip(now[0], before[0]))  # incomplete: not on disk yet
        assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(now[1], new[1]))  # complete: written, cast
        streamer.release_all()
        merged = [v for _, v in streamer.layer_tensors(0)]
        assert all(torch.equal(merged[k], (new[0][k].to(merged[k].dtype) if k % 2 == 0 else before[0][k]))
                   for k in range(n))
    finally:
        streamer.close()


def test_timeline_shows_each_layers_forward_and_its_recompute_plus_backward(base_dir, tiny_batch, tmp_path):
    """The compute lane of the timeline (bench PNGs, overlap checks) covers backward too, one event per layer, in
    backward order and without overlap; the recompute's early stop (an exception inside checkpoint) loses none."""
    model = lora_model(base_dir)
    streamer = BlockStreamer(model, "nvme", "cpu", nvme_dir=str(tmp_path))
    model.train()
    for _ in range(2):
        streamer.timeline.clear()
        model(**tiny_batch).loss.backward()
        streamer.release_all()
    compute = [(a, b, label) for lane, a, b, label in streamer.timeline if lane == "compute"]
    labels = [label for _, _, label in compute]
    assert labels == ([f"layer {i}" for i in range(LAYERS)]
                      + [f"layer {i} (recompute + backward)" for i in reversed(range(LAYERS))])
    assert all(a < b <= c for (a, b, _), (c, _, _) in zip(compute, compute[1:]))  # ordered, never overlapping
    fetches = [label for lane, _, _, label in streamer.timeline if lane == "fetch"]
    assert len(fetches) >= 2 * LAYERS - 1  # forward and backward fetches are on the same clock
    streamer.close()


def test_heap_trims_every_k_layers_of_a_training_pass_change_nothing(base_dir, tiny_batch, monkeypatch):
    """``trim_every`` (the engine sets 4 for streamed layers without offloaded updates): ``malloc_trim`` after every
    k-th layer of a training forward and of its backward, none in eval or generation; the training is the same
    bit for bit."""
    import slimtune.offload.stream.streamer as streamer_module

    expected = train(lora_model(base_dir), tiny_batch)
    trims = []
    real = streamer_module.release_free_memory
    monkeypatch.setattr(streamer_module, "release_free_memory",
                        lambda: (trims.append(streamer_module.in_backward()), real()))
    model = lora_model(base_dir)
    streamer = BlockStreamer(model, "cpu", "cpu", prefetch=1)
    streamer.trim_every = 2
    trims.clear()  # building the homes trims once
    got = train(model, tiny_batch, steps=3)
    assert got[:3] == expected[:3]
    for name, value in expected[3].items():
        assert torch.equal(got[3][name], value), name
    # per step, forward: after the 2nd layer (after the last one the engine trims before backward anyway);
    # backward: when layer 2's input gradient arrives (layer 0's input, the frozen embedding's output, has none)
    assert trims == [False, True] * 3  # in_backward() at each trim
    streamer.close()
