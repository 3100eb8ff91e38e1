"""Tokenized examples → micro-batches: padded or padding-free (packed), in a seeded order per epoch."""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import datasets
import torch

from .tokens import IGNORE_INDEX

__all__ = ["take", "collate", "input_tokens", "num_batches", "batches"]


def take(examples, indices: Iterable[int]) -> list[dict]:
    """The examples at ``indices`` (a list, or a tokenized Dataset: one Arrow gather) as ``{"input_ids",
    "labels"}`` rows."""
    indices = list(indices)
    if isinstance(examples, datasets.Dataset):
        columns = examples[indices]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]
    return [examples[i] for i in indices]


def collate(batch: list[dict], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with ``pad_id``, labels with -100, attention_mask 0 on pads.

    ``packed`` (``data.packing``): padding-free instead, the examples side by side in one row of their total
    length, with ``position_ids`` restarting at 0 for each and no attention_mask: transformers then builds a causal
    mask that never crosses from one example to another (``masking_utils.find_packed_sequence_indices``; the
    model must run with ``use_cache=False``, see :func:`.model.check_packing`). Each example's first label is
    -100: nothing of it precedes its first token, just as in a padded row (the model's shift never scores a
    row's first token), so the loss, a mean over the same supervised tokens, is the padded batch's."""
    if packed:
        ids = [t for e in batch for t in e["input_ids"]]
        labels = [t for e in batch for t in [IGNORE_INDEX, *e["labels"][1:]]]
        positions = [i for e in batch for i in range(len(e["input_ids"]))]
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long)}
    width = max(len(e["input_ids"]) for e in batch)
    out = {"input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
           "labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
           "attention_mask": torch.zeros((len(batch), width), dtype=torch.long)}
    for r, e in enumerate(batch):
        n = len(e["input_ids"])
        out["input_ids"][r, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        out["labels"][r, :n] = torch.tensor(e["labels"], dtype=torch.long)
        out["attention_mask"][r, :n] = 1
    return out


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of a collated batch (not counting padding)."""
    mask = batch.get("attention_mask")
    return int(batch["input_ids"].numel() if mask is None else mask.sum())


def num_batches(n_examples: int, batch_size: int) -> int:
    """Batches per epoch (the last one may be short: drop_last=False)."""
    return math.ceil(n_examples / batch_size)


def batches(examples: list[dict], batch_size: int, seed: int, epoch: int, pad_id: int, shuffle: bool = True,
            skip: int = 0, packed: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of one epoch (``packed``: see :func:`collate`). The order depends only on (seed, epoch), so
    a resumed run passes ``skip`` = batches already consumed this epoch and continues with exactly the next one."""
    if shuffle:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(len(examples)))
    for start in range(skip * batch_size, len(order), batch_size):
        yield collate(take(examples, order[start:start + batch_size]), pad_id, packed)
