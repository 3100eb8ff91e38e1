"""Zeroth-order block streaming (offload/stream/zo_stream.py): ZOStream reproduces in-memory MeZO(noise="per_tensor")
bit for bit (losses, weights, optimizer state, eval after flush), resident or streamed from CPU / NVMe, full-parameter
or LoRA on a streamed frozen base, tied or untied embeddings; each streamed layer crosses the link once per step."""

from __future__ import annotations

import glob
import io

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.offload.stream.streamer import BlockStreamer
from slimtune.offload.stream.zo_stream import ZOStream
from slimtune.optimizers.zeroth_order import MeZO, mezo_param_groups

LAYERS, STEPS = 3, 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box (the results match with 2 threads too)
    yield
    torch.set_num_threads(threads)


def make_model(tied: bool, lora: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, initializer_range=0.1)
    model = LlamaForCausalLM(config)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,  # dropout off: eval mode
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, p in model.named_parameters():  # peft zero-inits lora_B: make the adapters non-trivial
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    model.train()
    return model


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding: the 4-D attention mask is split with the batch
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_optimizer(model, wd: float, n_samples: int, seed: int = 0):
    opt = MeZO(mezo_param_groups(model.named_parameters(), wd), lr=2e-2, eps=1e-2, weight_decay=wd,
               n_samples=n_samples, seed=seed, noise="per_tensor")
    # lr changes every step: a deferred update must use the lr of the step that computed it
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def closure_for(model, batch):
    """The trainer's closure (finetune/trainer.py zeroth_order_step, one micro-batch)."""
    def closure():
        if int((batch["labels"][:, 1:] != -100).sum()) == 0:
            return 0.0
        return float(model(**batch).loss)
    return closure


def in_memory(tied, lora, wd, n_samples, batches):
    model = make_model(tied, lora)
    opt, sched = make_optimizer(model, wd, n_samples)
    model.eval()
    losses = []
    for batch in batches:
        losses.append(float(opt.step(closure_for(model, batch))))
        sched.step()
    with torch.no_grad():
        eval_loss = float(model(**batches[0]).loss)
    return losses, eval_loss, dict(model.named_parameters()), opt


def state_of(opt):
    return opt.state[opt.param_groups[0]["params"][0]]


def assert_same_state(a, b):
    for key in ("step", "noise", "seed_rng", "seeds", "projected_grads"):
        assert torch.equal(state_of(a)[key], state_of(b)[key]), key


CASES = {  # name: (tied, lora, weight decay, n_samples, home)
    "resident-untied-n2": (False, False, 0.1, 2, None),
    "resident-tied": (True, False, 0.0, 1, None),
    "cpu-tied-n2-full": (True, False, 0.1, 2, "cpu"),
    "nvme-untied-full": (False, False, 0.1, 1, "nvme"),
    "cpu-lora-n2": (True, True, 0.1, 2, "cpu"),
    "nvme-lora": (False, True, 0.0, 1, "nvme"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_steps_equal_in_memory_mezo(case, tmp_path):
    tied, lora, wd, n_samples, home = CASES[case]
    batches = [make_batch(seed) for seed in range(1, STEPS + 1)]
    ref_losses, ref_eval, ref_params, ref_opt = in_memory(tied, lora, wd, n_samples, batches)

    model = make_model(tied, lora)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    streamer = None
    if home is not None:
        streamer = BlockStreamer(model, home, "cpu", prefetch=1, nvme_dir=str(tmp_path),
                                 stream_trainable=not lora, writeback=not lora)
        assert all(p.numel() == 0 for layer in streamer.layers for p in layer.params)  # really streamed
        if not lora:
            assert all(p.requires_grad for layer in streamer.layers for p in layer.params)
    opt, sched = make_optimizer(model, wd, n_samples)
    zo = ZOStream(model, opt, streamer)
    losses, fetches, writes = [], [], []
    for batch in batches:
        before = dict(streamer.stats) if streamer else {}
        losses.append(zo.step(batch))
        sched.step()
        if streamer:
            fetches.append(streamer.stats["fetches"] - before["fetches"])
            writes.append(streamer.stats["bytes_to_home"] - before["bytes_to_home"])
    assert model.training  # step() restores the mode it found
    assert losses == ref_losses  # bit-identical, every step
    assert_same_state(opt, ref_opt)
    if streamer:
        # once per step per layer (+ the first step's prefetch of layer 0 for the next step); full-parameter
        # layers are written back once per step, LoRA's frozen base never
        assert fetches == [LAYERS + 1] + [LAYERS] * (STEPS - 1)
        layer_bytes = sum(layer.nbytes for layer in streamer.layers)
        assert writes == [0 if lora else layer_bytes] * STEPS
        assert streamer.peak_bound <= 2
    assert zo.pending
    if case != "resident-tied":  # (resident-tied: a plain forward applies the pending updates by itself)
        zo.flush()
        assert not zo.pending
    model.eval()
    with torch.no_grad():
        eval_loss = float(model(**batches[0]).loss)
    assert eval_loss == ref_eval and not zo.pending
    zo.detach()
    if streamer:
        streamer.detach()
        assert not glob.glob(str(tmp_path / "*.swap"))  # swap file removed with the engine
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), name  # the frozen base is never touched


def test_a_loaded_model_switched_to_train_mode_still_runs_every_perturbed_forward(tmp_path):
    """transformers 5 kernelizes models from ``from_pretrained`` when ``kernels`` is installed and re-kernelizes on
    train()/eval(), replacing the forward of the final norm that ZOStream wraps (blocks.keep_torch_forwards). A
    loaded model in train mode (as the trainer holds it) must still match in-memory MeZO bit for bit."""
    batches = [make_batch(seed) for seed in range(1, STEPS + 1)]
    ref_losses, _, ref_params, _ = in_memory(False, False, 0.0, 1, batches)
    make_model(False, False).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).train()
    opt, sched = make_optimizer(model, 0.0, 1)
    zo = ZOStream(model, opt, None)
    assert not getattr(model, "use_kernels", False)
    losses = []
    for batch in batches:
        losses.append(zo.step(batch))
        sched.step()
    zo.detach()
    assert losses == ref_losses
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name

def test_checkpoint_of_flushed_weights_and_optimizer_resumes_exactly(tmp_path):
    """Save after 2 streamed steps (flush, weights read through the streamer's homes, optimizer state_dict),
    resume in a fresh model + streamer + optimizer, 2 more steps == 4 uninterrupted steps."""
    batches = [make_batch(seed) for seed in range(1, 5)]
    _, _, ref_params, ref_opt = in_memory(True, False, 0.1, 2, batches)

    def streamed(model, seed):
        streamer = BlockStreamer(model, "cpu", "cpu", stream_trainable=True, writeback=True)
        opt, sched = make_optimizer(model, 0.1, 2, seed=seed)
        return streamer, opt, sched, ZOStream(model, opt, streamer)

    model = make_model(True, False)
    streamer, opt, sched, zo = streamed(model, 0)
    for batch in batches[:2]:
        zo.step(batch)
        sched.step()
    zo.flush()
    weights = {id(p): v for i in range(LAYERS) for p, v in streamer.layer_tensors(i)}
    saved = {n: weights.get(id(p), p.detach()).clone() for n, p in model.named_parameters()}
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    streamer.close()

    model = make_model(True, False)
    model.load_state_dict(saved, strict=False)  # lm_head.weight is the tied embedding
    streamer, opt, sched, zo = streamed(model, 7)  # another seed: the loaded state must win
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    for batch in batches[2:]:
        zo.step(batch)
        sched.step()
    zo.detach()
    streamer.detach()
    assert_same_state(opt, ref_opt)
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name


def test_batch_without_supervised_tokens_still_takes_the_perturbations():
    """The trainer's closure returns 0 without a forward; MeZO.step still perturbs and restores every tensor (not
    bit-exact) and applies the decay: the streamed step must do the same to stay on the trajectory."""
    empty = make_batch(1)
    empty["labels"][:] = -100
    batches = [empty, make_batch(2)]
    ref_losses, _, ref_params, _ = in_memory(False, False, 0.1, 1, batches)
    model = make_model(False, False)
    opt, sched = make_optimizer(model, 0.1, 1)
    zo = ZOStream(model, opt)
    losses = []
    for batch in batches:
        losses.append(zo.step(batch))
        sched.step()
    zo.detach()
    assert losses == ref_losses and losses[0] == 0.0
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name


def test_plain_forward_is_not_split_and_detach_restores_the_model():
    model = make_model(False, True)
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    opt, _ = make_optimizer(model, 0.0, 1)
    zo = ZOStream(model, opt)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # no step yet: the wrappers change nothing
    zo.detach()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_errors_name_what_to_change(tmp_path):
    model = make_model(False, False)
    with pytest.raises(ValueError, match="noise='per_tensor'"):
        ZOStream(model, MeZO(model.parameters(), noise="sequential"))
    with pytest.raises(ValueError, match="MeZO"):
        ZOStream(model, torch.optim.SGD(model.parameters(), lr=0.1))
    zo = ZOStream(model, make_optimizer(model, 0.0, 1)[0])
    with pytest.raises(ValueError, match="already wrapped"):
        ZOStream(model, make_optimizer(model, 0.0, 1)[0])
    with pytest.raises(ValueError, match="labels"):
        zo.step({"input_ids": make_batch()["input_ids"]})
    zo.detach()
    streamer = BlockStreamer(model, "cpu", "cpu", stream_trainable=True, writeback=False)
    with pytest.raises(ValueError, match="writeback=True"):
        ZOStream(model, make_optimizer(model, 0.0, 1)[0], streamer)
    streamer.detach()


def test_time_zo_step_reports_both_paths(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from zo_timing import time_zo_step

    model = make_model(False, False)
    out = time_zo_step(model, make_batch(), home="nvme", nvme_dir=str(tmp_path), steps=1, rounds=2)
    assert out["in_memory_s"] > 0 and out["streamed_s"] > 0
    assert out["ratio"] == pytest.approx(out["streamed_s"] / out["in_memory_s"])
    assert out["fetches_per_step"] == LAYERS  # steady state: each layer once per step
    assert all(p.numel() > 0 for p in model.parameters())  # detached: an ordinary model again
    assert not glob.glob(str(tmp_path / "*.swap"))
