"""A run that never holds the model whole, end to end: the streamed save writes a Hugging Face checkpoint that
``from_pretrained`` reloads to the engine's weights exactly, and a streamed run killed with SIGKILL resumes to the
same weights as the uninterrupted run (QLoRA base, full-parameter MeZO and full AdamW, all streamed from NVMe)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from test_offload_train import assert_same_run
from test_streamed_load import FAMILIES, _streamed
from test_train import tiny, write_recipe

from slimtune.finetune import load_recipe, train
from slimtune.finetune.streamed_save import save_streamed


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_save_reloads_to_the_engine_weights_exactly(sharded, tmp_path, family):
    from transformers import AutoModelForCausalLM

    model, streamer = _streamed(sharded(family), False, "nvme", tmp_path)
    try:
        gen = torch.Generator().manual_seed(1)
        for i, layer in enumerate(streamer.layers):  # new weights in every home, as training leaves them
            streamer.write_layer(i, [torch.randn(s, generator=gen).to(d) for s, d in layer.shapes])
        with torch.no_grad():
            model.get_input_embeddings().weight.add_(1.0)
        names = {id(p): n for n, p in model.named_parameters()}
        expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.numel()}
        for i in range(len(streamer.layers)):
            expected.update({names[id(p)]: v for p, v in streamer.layer_tensors(i)})
        out = tmp_path / "saved"
        out.mkdir()
        files = save_streamed(model, streamer, out)
    finally:
        streamer.close()
    assert files and (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    got = dict(reloaded.named_parameters())
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name].detach(), value), name
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("family", FAMILIES)
def test_training_after_a_streamed_load_equals_training_after_from_pretrained(sharded, tmp_path, family):
    """QLoRA with its 4-bit base streamed from NVMe (loaded layer by layer from 30 KB shards) against QLoRA on the
    base from_pretrained loads whole: the same losses and adapter weights (support_matrix.compare, atol 1e-5).
    The support matrix's lora_nvme / galore_nvme / mezo_nvme cells check the same for the other adapters."""
    import support_matrix as sm

    qlora = ("adapter.type=qlora", "training.max_steps=2")
    outcome = sm.compare(sharded(family), tmp_path, (*qlora, "offload.params=nvme"), qlora)
    assert outcome.status == "trains", outcome.detail


KILLED = textwrap.dedent("""
    import os, signal, sys
    from slimtune.finetune import load_recipe, train
    from slimtune.finetune.trainer import Trainer
    original, calls = Trainer.optimizer_step, {"n": 0}
    def dying_step(self, micro):
        calls["n"] += 1
        if calls["n"] == 4:  # checkpoint-2 is written, step 3 ran: die mid-run, nothing cleaned up
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, micro)
    Trainer.optimizer_step = dying_step
    train(load_recipe(sys.argv[1]), progress=False)
""")

STREAMED_RUNS = {
    "qlora": ("model.load_in_4bit=true", "adapter.type=qlora", "model.dtype=bfloat16"),
    "mezo": ("adapter.type=none", "optimizer.name=mezo", "optimizer.noise=per_tensor", "training.learning_rate=1e-3"),
    "adamw": ("adapter.type=none", "training.max_grad_norm=0", "offload.optimizer_state=nvme"),
}


@pytest.mark.parametrize("kind", list(STREAMED_RUNS))
def test_a_streamed_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(tmp_path, kind):
    args = (*STREAMED_RUNS[kind], "offload.params=nvme", f"offload.nvme_dir={tmp_path}", "training.max_steps=5",
            "output.save_steps=2", "data.metric=none")
    for name in ("full", "cut"):
        (tmp_path / name).mkdir()
    full = train(load_recipe(write_recipe(tmp_path / "full", tiny(tmp_path / "full", *args))), progress=False)
    recipe = write_recipe(tmp_path / "cut", tiny(tmp_path / "cut", *args))
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    proc = subprocess.run([sys.executable, str(script), str(recipe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    for swap in glob.glob(str(tmp_path / "*.swap")):  # what a killed process leaves: its swap file
        os.unlink(swap)
    checkpoint = tmp_path / "cut" / "run" / "checkpoints" / "checkpoint-2"
    if kind == "mezo":  # the streamed weights were checkpointed as shards, not one whole-model file
        assert (checkpoint / "streamed" / "model.safetensors.index.json").is_file()
        assert (checkpoint / "trainable.safetensors").stat().st_size < 64 * 1024
    resumed = train(load_recipe(recipe, ["training.resume_from_checkpoint=true"]), progress=False)
    assert resumed.resumed_from.name == "checkpoint-2"
    assert_same_run(full, resumed)
    if kind != "qlora":
        index = json.loads((resumed.adapter_dir / "model.safetensors.index.json").read_text())
        assert index["weight_map"], "the full model was saved by the streamed save"
