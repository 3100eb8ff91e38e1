"""The loss of a step, shared by slimtune's loop (:mod:`.trainer`) and the Hugging Face route (:mod:`.hf`), so both
compute the same numbers from the same micro-batches.

A step's loss is token-weighted over its micro-batches: micro-batch ``i`` with ``n_i`` supervised tokens contributes
``(mean token loss_i + router aux loss_i) * n_i / sum_j n_j``, so gradient accumulation computes the gradient of one
large batch (transformers #34191).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from .adapters import aux_loss
from .chunked_loss import causal_lm_loss, pays_off
from .evaluate import autocast, supervised_tokens


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], share: float, device: torch.device,
                     bf16: bool, chunked: bool, wrapped: torch.nn.Module | None = None) -> torch.Tensor:
    """``(LM loss + MixLoRA's router term) * share`` of one micro-batch already on ``device``. ``chunked``: the LM
    head and cross-entropy in chunks where it pays off (:mod:`.chunked_loss`). ``wrapped``: a wrapper of ``model``
    that must run the forward (DDP: its forward prepares the gradient all-reduce); it takes the model's own loss."""
    with autocast(device, bf16):
        if wrapped is not None:
            lm_loss = wrapped(**batch).loss
        elif chunked and pays_off(model, batch):
            lm_loss = causal_lm_loss(model, batch)
        else:
            lm_loss = model(**batch).loss
    return (lm_loss + aux_loss(model, batch.get("attention_mask"))) * share


def backward_step(model: torch.nn.Module, group: list[dict[str, torch.Tensor]], engine, device: torch.device,
                  bf16: bool, chunked: bool, total: float | None = None, scale: float = 1.0,
                  backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                  around: Callable[[bool], AbstractContextManager] | None = None,
                  wrapped: torch.nn.Module | None = None) -> float:
    """Forward and backward of every micro-batch of a step through ``engine`` (its per-layer or offloaded updates
    run in the backward of the last micro-batch with supervised tokens); micro-batch ``i`` weighs
    ``n_i * scale / total`` (``total``: the step's supervised tokens, by default this group's). Returns the sum of
    the weighted losses. Several processes (:mod:`.hf`) pass the tokens of all ranks as ``total`` and the number of
    ranks as ``scale`` (DDP averages the ranks' gradients), their ``backward``, ``around(last)`` (DDP's no_sync
    before the last backward) and the DDP-``wrapped`` model."""
    counts = [supervised_tokens(b["labels"]) for b in group]
    total = sum(counts) if total is None else total
    last = max((i for i, n in enumerate(counts) if n), default=-1)
    loss_sum = 0.0
    for i, (batch, n) in enumerate(zip(group, counts)):
        if n == 0:
            continue  # nothing supervised: no loss, no backward
        engine.begin_micro_batch(final=i == last)
        on_device = {k: v.to(device) for k, v in batch.items()}
        with around(i == last) if around is not None else nullcontext():
            loss = micro_batch_loss(model, on_device, n * scale / total, device, bf16, chunked, wrapped)
            engine.before_backward()
            backward(loss)
        loss_sum += float(loss.detach())
    return loss_sum


@torch.no_grad()
def zeroth_order_loss(model: torch.nn.Module, group: list[dict[str, torch.Tensor]], device: torch.device,
                      bf16: bool) -> float:
    """A zeroth-order (MeZO) closure's value: the token-weighted loss over every micro-batch of the step, so
    gradient accumulation means a larger batch for the SPSA estimate (the official code asserts accumulation 1)."""
    total = sum(supervised_tokens(b["labels"]) for b in group)
    loss = 0.0
    for batch in group:
        n = supervised_tokens(batch["labels"])
        if n:
            with autocast(device, bf16):
                out = model(**{k: v.to(device) for k, v in batch.items()})
            loss += float(out.loss + aux_loss(model, batch.get("attention_mask"))) * n / total
    return loss
