"""The causal-LM training loss without the whole logits tensor: the LM head and cross-entropy run on chunks of the
supervised tokens, and each chunk's logits are recomputed in backward instead of kept.

A Hugging Face causal LM computes ``logits = lm_head(h)`` for every token, upcasts them to fp32 and takes the
cross-entropy: with batch 4 x 256 tokens and a 32k vocabulary that is 65 MiB of bf16 logits, 131 MiB in fp32, as much
again for the log-softmax autograd keeps and for its gradient, the largest transient of a LoRA/QLoRA step (measured
on bench/peers.py's 220M model: the streamed QLoRA step's peak RSS). Here the model runs with its output head
replaced by the identity (so its "logits" are the final hidden states), the positions whose label is -100 are
dropped (the prompt of an instruction row costs nothing), and the rest go through ``head`` + ``cross_entropy`` in
chunks of at most :data:`CHUNK_BYTES` of fp32 logits, each under activation checkpointing (Chen et al. 2016,
arXiv 1604.06174), so at most one chunk's logits exist at a time. The mean over supervised tokens is the one
``transformers``' ``ForCausalLMLoss`` returns (same shift, same ignore index), summed in another order: equal to
float rounding. The same idea as Liger Kernel's fused linear cross-entropy and unsloth's chunked loss, in plain torch.

Only where it is the same function of the model: the head must be frozen (LoRA/QLoRA/MixLoRA; a trainable head would
collect one gradient per chunk, which full fine-tuning's per-gradient hooks must not see) and the model must not
post-process its logits (:data:`LOGIT_POSTPROCESSING`: Gemma-2/3 soft-capping, Cohere's and Granite's scales):
otherwise the model's own loss is used (:func:`chunked_loss_supported` says why).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .model import base_config

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk
# config keys of transformers models that change the logits after the head (Gemma-2/3/4 soft-capping, Cohere's
# logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier): the model's own loss runs for those
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def chunked_loss_supported(model: torch.nn.Module) -> str | None:
    """None when :func:`causal_lm_loss` computes ``model``'s own loss, else the reason it does not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings (get_output_embeddings() is None)"
    if any(p.requires_grad for p in head.parameters()):
        return "the LM head trains (its gradient would accumulate once per chunk)"
    config = base_config(model)
    for key in LOGIT_POSTPROCESSING:
        if getattr(config, key, None) not in (None, 1.0):
            return f"the model post-processes its logits (config.{key})"
    return None


def pays_off(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the model's own loss would hold more than one chunk of fp32 logits for ``batch`` (every position,
    as it computes them): below that chunking saves no memory and costs the head's recompute (measured on the
    quickstart model, vocab 1024, 2048 tokens: 42 ms per step chunked vs 38 ms for HF's Trainer)."""
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    return batch["input_ids"].numel() * vocab * 4 > CHUNK_BYTES


@contextmanager
def _head_as_identity(head: torch.nn.Module):
    """``head`` returns its input while the block runs (hooks on it still run); its forward is restored after."""
    saved = head.__dict__.get("forward")
    head.forward = lambda hidden, *args, **kwargs: hidden
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def _chunk_loss(head_forward, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_forward(hidden).float(), targets, reduction="sum")


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``batch`` (``labels`` with -100 where nothing is supervised),
    computed chunk by chunk (see the module docstring). The caller checked :func:`chunked_loss_supported`."""
    head = model.get_output_embeddings()
    head_forward = head.forward  # the real one (an accelerate hook's wrapper included)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with _head_as_identity(head):
        hidden = model(**inputs).logits  # the final hidden states: the head was the identity
    targets = labels[:, 1:].reshape(-1).to(hidden.device)  # token t predicts t + 1 (ForCausalLMLoss's shift)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    count = targets.numel()
    if count == 0:
        return hidden.sum() * 0.0  # nothing supervised: a zero that still belongs to the graph
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    per_chunk = max(1, CHUNK_BYTES // (4 * vocab))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, per_chunk):
        stop = min(start + per_chunk, count)
        total = total + checkpoint(_chunk_loss, head_forward, hidden[start:stop], targets[start:stop],
                                   use_reentrant=False)
    return total / count
