"""The chunked causal-LM loss (finetune/chunked_loss.py): the model's own loss and gradients across decoder families,
with prompt masking and padding, without ever keeping a (tokens x vocab) tensor for backward; refused where it would
not be the model's loss; the trainer's runs match the model's loss."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from zoo import FAMILIES, VOCAB, _configs

import slimtune.finetune.chunked_loss as chunked
from slimtune.finetune.chunked_loss import causal_lm_loss, chunked_loss_supported


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs(VOCAB, 0, 1, 2)[family]).float().eval()  # no dropout draws
    for p in model.get_output_embeddings().parameters():
        p.requires_grad_(False)  # a frozen head, as with LoRA / QLoRA (tied embeddings freeze with it)
    return model


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt is not supervised
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])
def test_equals_the_models_own_loss_and_gradients_in_small_chunks(monkeypatch, family):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * VOCAB * 7)  # 7 tokens per chunk: several chunks and a short one
    model, batch = _model(family), _batch()
    assert chunked_loss_supported(model) is None
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, params)
    ours = causal_lm_loss(model, batch)
    grads = torch.autograd.grad(ours, params)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert model.get_output_embeddings().forward.__self__ is model.get_output_embeddings()  # the head is restored


def test_backward_never_keeps_the_whole_logits():
    """Autograd's saved tensors: the model's own loss keeps a (tokens x vocab) tensor, the chunked one at most one
    chunk's."""
    model, batch = _model("llama"), _batch()
    tokens = int((batch["labels"][:, 1:] != -100).sum())

    def largest_saved(loss_fn) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn()
        return max(sizes)

    assert largest_saved(lambda: model(**batch).loss) >= tokens * VOCAB
    per_chunk = chunked.CHUNK_BYTES // (4 * VOCAB)
    assert largest_saved(lambda: causal_lm_loss(model, batch)) < min(tokens, per_chunk) * VOCAB


def test_refused_where_it_would_not_be_the_models_loss():
    assert "final_logit_softcapping" in chunked_loss_supported(_model("gemma2"))
    trainable = _model("llama")
    trainable.get_output_embeddings().weight.requires_grad_(True)
    assert "head trains" in chunked_loss_supported(trainable)


def test_nothing_supervised_gives_a_zero_in_the_graph():
    model, batch = _model("llama"), _batch()
    batch["labels"][:] = -100
    loss = causal_lm_loss(model, batch)
    loss.backward()
    assert float(loss) == 0.0


def test_it_pays_off_only_above_one_chunk_of_logits(monkeypatch):
    model, batch = _model("llama"), _batch()
    logit_bytes = batch["input_ids"].numel() * VOCAB * 4
    monkeypatch.setattr(chunked, "CHUNK_BYTES", logit_bytes)
    assert not chunked.pays_off(model, batch)  # one chunk would hold it all: the model's own loss is as lean
    monkeypatch.setattr(chunked, "CHUNK_BYTES", logit_bytes - 1)
    assert chunked.pays_off(model, batch)
