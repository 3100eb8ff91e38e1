"""Rows → token ids with prompt-masked labels, and the tokenized training set in Arrow, cached across runs.

Tokenization follows the common SFT recipe (Alpaca, LLaMA-Factory, TRL's ``completion_only_loss``): bos, prompt
(labels -100), response, eos (trained). Labels are aligned with ``input_ids``; the model shifts them. A training set
is tokenized through ``datasets`` (:func:`tokenize_dataset`: ``Dataset.map``, batched, in processes) into int32
Arrow columns, named by a fingerprint of the rows, the tokenizer and the settings, so a second run loads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable

import datasets

from .errors import DataError
from .recipe import DataConfig
from .templates import segments

__all__ = ["IGNORE_INDEX", "TOKENIZED", "TOKENIZATION_VERSION", "prompt_ids", "tokenize_examples", "tokenize_rows",
           "check_tokenizer", "tokenizer_identity", "tokenization_fingerprint", "tokenize_dataset"]

IGNORE_INDEX = -100  # label of tokens without loss (torch cross_entropy's default ignore_index)


def _encode(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """Token ids of a prompt exactly as :func:`tokenize_rows` encodes it (bos, then the text): for generation."""
    ids = _encode(prompt, tokenizer)
    bos = _bos(tokenizer)
    return ids if ids[:1] == bos else bos + ids  # a chat template may already render the bos token


def _tokenize(rows: list[dict], cfg: DataConfig, tokenizer, on_prompt: bool) -> list[tuple[list, list, int]]:
    """(ids, labels, index of the first trained token) of each row: bos + prompt + response + eos, not yet cut to
    ``max_length``. Every piece of every row is encoded in one tokenizer call (the fast tokenizers batch in Rust),
    which gives the ids of encoding each piece on its own."""
    bos, eos = _bos(tokenizer), tokenizer.eos_token_id
    pieces = [segments(row, cfg, tokenizer) for row in rows]
    texts = [text for row_pieces in pieces for text, _ in row_pieces if text]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for row_pieces in pieces:
        ids, labels, first_response = [], [], None
        for n, (text, trained) in enumerate(row_pieces):
            piece = (list(next(encoded)) if text else []) + ([eos] if n == len(row_pieces) - 1 else [])
            if not ids and bos and piece[:1] != bos:  # a chat template may already render the bos token
                ids, labels = list(bos), [IGNORE_INDEX]
            if trained and first_response is None:
                first_response = len(ids)
            ids += piece
            labels += piece if (trained or on_prompt) else [IGNORE_INDEX] * len(piece)
        if bos and ids[:1] == bos:
            labels[0] = IGNORE_INDEX  # bos is never a useful target (nothing precedes it)
        out.append((ids, labels, first_response))
    return out


def tokenize_examples(rows: list[dict], cfg: DataConfig, tokenizer, train_on_prompt: bool | None = None
                      ) -> list[dict | None]:
    """The example of each row (see :func:`tokenize_rows`) cut to ``cfg.max_length``; None where the response is
    cut away entirely. One tokenizer call for all the rows."""
    on_prompt = cfg.train_on_prompt if train_on_prompt is None else train_on_prompt
    limit = cfg.max_length
    return [{"input_ids": ids[:limit], "labels": labels[:limit]} if first < limit else None
            for ids, labels, first in _tokenize(rows, cfg, tokenizer, on_prompt)]


def _kept(rows: list[dict], cfg: DataConfig, tokenizer, on_prompt: bool) -> list[dict]:
    return [e for e in tokenize_examples(rows, cfg, tokenizer, on_prompt) if e is not None]


def _check_kept(kept: int, total: int, cfg: DataConfig, name: str) -> None:
    """One warning with the count of dropped examples; an error when none is left."""
    if total and not kept:
        raise DataError(f"{name}: every one of the {total} examples has a prompt longer than data.max_length "
                        f"({cfg.max_length}) tokens, so none has a response left to train on; raise "
                        "data.max_length")
    if kept < total:
        warnings.warn(f"dropped {total - kept} of {total} examples: their response starts after data.max_length "
                      f"({cfg.max_length}) tokens of prompt; raise data.max_length or shorten those prompts",
                      stacklevel=3)


def tokenize_rows(rows: Iterable[dict], cfg: DataConfig, tokenizer, train_on_prompt: bool | None = None,
                  name: str = "data.path") -> list[dict]:
    """Each row → ``{"input_ids", "labels"}`` as Python lists: bos + prompt + response + eos, labels -100 except on
    responses (every assistant turn for multi-turn ``messages``; every token for ``text``; every token but bos with
    ``train_on_prompt``). Examples are cut to ``cfg.max_length`` keeping the start; an example whose response is
    cut away entirely is dropped (one warning with the count; none left is an error naming ``name``).

    For a few rows (generation prompts, tests). A training set goes through :func:`tokenize_dataset`: the same
    examples, in Arrow (about 8 bytes per token instead of some 70 as Python ints), cached across runs.
    ``cfg.packing`` does not change the examples: :func:`.batches.collate` packs each micro-batch.
    """
    check_tokenizer(tokenizer)
    on_prompt = cfg.train_on_prompt if train_on_prompt is None else train_on_prompt
    examples, total, chunk = [], 0, []
    for row in rows:
        chunk.append(row)
        if len(chunk) == 1000:
            examples += _kept(chunk, cfg, tokenizer, on_prompt)
            total, chunk = total + len(chunk), []
    examples += _kept(chunk, cfg, tokenizer, on_prompt) if chunk else []
    _check_kept(len(examples), total + len(chunk), cfg, name)
    return examples


def check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer without eos (responses end with it)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token: responses must end with one so the model learns to stop "
                        "(set tokenizer.eos_token)")


TOKENIZED = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                               "labels": datasets.Sequence(datasets.Value("int32"))})
TOKENIZATION_VERSION = 1  # raise when _tokenize's output changes: cached tokenizations are then not reused
AUTO_NUM_PROC_ROWS = 50_000  # data.num_proc unset: tokenize in one process below this many rows


def tokenizer_identity(tokenizer) -> str:
    """What makes a tokenizer encode as it does: its vocabulary and rules (``tokenizer.json``), special tokens
    and chat template. Hashed into the tokenization cache's fingerprint."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return json.dumps([type(tokenizer).__name__, rules, tokenizer.bos_token_id, tokenizer.eos_token_id,
                       tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None)])


def tokenization_fingerprint(rows: datasets.Dataset, cfg: DataConfig, tokenizer, on_prompt: bool) -> str:
    """The cache key of a tokenization: the rows (datasets' fingerprint, which follows the data files and every
    transform since loading: validation, split, ``max_samples``), the tokenizer, the format and its columns,
    ``max_length``, ``train_on_prompt`` and :data:`TOKENIZATION_VERSION`."""
    from datasets.fingerprint import Hasher

    settings = cfg.model_dump(include={"format", "columns", "max_length"})
    return Hasher.hash([rows._fingerprint, tokenizer_identity(tokenizer), settings, on_prompt,
                        TOKENIZATION_VERSION])


def tokenize_dataset(rows: datasets.Dataset, cfg: DataConfig, tokenizer, train_on_prompt: bool | None = None,
                     name: str = "data.path") -> datasets.Dataset:
    """:func:`tokenize_rows` for a whole dataset, through ``Dataset.map`` (batched, ``cfg.num_proc`` processes):
    the examples live in an Arrow file, memory-mapped, and the trainer reads them from there. The file is named by
    :func:`tokenization_fingerprint`, so a second run on the same data, tokenizer and settings loads it at once
    instead of tokenizing again (rows loaded in memory, e.g. from a hub stream, are tokenized in memory)."""
    check_tokenizer(tokenizer)
    on_prompt = cfg.train_on_prompt if train_on_prompt is None else train_on_prompt
    fingerprint = tokenization_fingerprint(rows, cfg, tokenizer, on_prompt)
    on_disk = bool(rows.cache_files)
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "slimtune-tokenized" / f"{fingerprint}.arrow"
    if on_disk:
        cache.parent.mkdir(parents=True, exist_ok=True)
    workers = cfg.num_proc if cfg.num_proc is not None else (min(os.cpu_count() or 1, 8)
                                                             if len(rows) >= AUTO_NUM_PROC_ROWS else 1)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        rows_of_batch = [dict(zip(batch, values)) for values in zip(*batch.values())]
        kept = _kept(rows_of_batch, cfg, tokenizer, on_prompt)
        return {"input_ids": [e["input_ids"] for e in kept], "labels": [e["labels"] for e in kept]}

    with _quiet_progress(len(rows) < AUTO_NUM_PROC_ROWS):
        examples = rows.map(tokenize, batched=True, batch_size=1000, remove_columns=rows.column_names,
                            features=TOKENIZED, num_proc=workers if workers > 1 else None,
                            new_fingerprint=fingerprint, keep_in_memory=not on_disk,
                            cache_file_name=str(cache) if on_disk else None, desc="tokenizing")
    _check_kept(len(examples), len(rows), cfg, name)
    return examples


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    """datasets' progress bars off for small datasets (a run on a few hundred rows prints no tokenizing bar)."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    was = is_progress_bar_enabled()
    if quiet and was:
        disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was:
            enable_progress_bar()
