"""Evaluation: token-weighted eval loss and the task metric (exact match of greedy answers).

The eval loss is the mean negative log-likelihood over every supervised (label != -100) token of the eval set,
so it does not depend on the eval batch size. The task metric generates greedily for each eval prompt, with left
padding so a batch of prompts decodes together, and compares the answer (up to EOS) with the reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .batches import collate, take
from .data import exact_match
from .tokens import prompt_ids


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the compute device (a no-op context when disabled)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the causal shift (the model predicts token t+1 from t)."""
    return int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def eval_loss(model, examples: list[dict], batch_size: int, pad_id: int, device: torch.device, bf16: bool) -> float:
    """Mean NLL per supervised token over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(take(examples, range(start, min(start + batch_size, len(examples)))), pad_id)
        n = supervised_tokens(batch["labels"])
        if n == 0:
            continue
        with autocast(device, bf16):
            out = model(**{k: v.to(device) for k, v in batch.items()})
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device,
                   bf16: bool) -> list[str]:
    """Greedy answers for ``prompts`` (left-padded batch), each cut at EOS."""
    encoded = [prompt_ids(p, tokenizer) for p in prompts]  # exactly as training encoded them
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    was_training = model.training
    model.eval()
    with autocast(device, bf16):
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def exact_match_score(model, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int, batch_size: int,
                      device: torch.device, bf16: bool, on_batch: Callable[[], None] | None = None
                      ) -> tuple[float, list[tuple[str, str, str]]]:
    """Fraction of ``(prompt, reference)`` pairs answered exactly; also returns (prompt, reference, answer)."""
    samples = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        answers = generate_batch(model, tokenizer, [p for p, _ in chunk], max_new_tokens, device, bf16)
        samples += [(p, ref, ans) for (p, ref), ans in zip(chunk, answers)]
        if on_batch is not None:
            on_batch()
    score = sum(exact_match(ans, ref) for _, ref, ans in samples) / max(len(samples), 1)
    return score, samples
