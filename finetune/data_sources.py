"""Where the training examples come from: one dataset (``data.path``) or a weighted mixture (``data.sources``).

Each source is loaded and validated on its own (its errors name ``data.sources[i].path`` and the file's line),
tokenized on its own (sources may differ in format and columns: an alpaca file beside ShareGPT conversations), and
the tokenized examples are then interleaved with ``datasets.interleave_datasets``: each example is drawn from
source i with probability ``weight_i / sum(weights)``, seeded, until ``data.mix_stop``. This is LLaMA-Factory's
``mix_strategy: interleave_under`` (first_exhausted) / ``interleave_over`` (all_exhausted).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from itertools import chain, islice
from typing import Iterator

import datasets

from .data import load_records, loaded_format, open_stream, record_texts
from .recipe import DataConfig
from .streaming import MixedStream, TokenStream
from .tokens import check_tokenizer, tokenize_dataset

SOURCE_FIELDS = ("path", "format", "split", "subset", "columns")  # what a source may set for itself


@dataclass
class Source:
    """One source's rows: ``key`` names it in errors, ``cfg`` is the data config its rows read with (sharegpt rows
    are messages rows once loaded), ``weight`` its share of a mixture."""

    key: str
    cfg: DataConfig
    weight: float
    train: datasets.Dataset | None  # None: data.eval_path, a source of eval rows only
    eval: datasets.Dataset | None
    eval_key: str = ""              # names the eval rows in errors


def source_configs(cfg: DataConfig) -> list[tuple[str, DataConfig, float]]:
    """(recipe key of its path, the data config of that source, weight) of each source: ``data`` itself when it
    names one path, else each of ``data.sources`` with data's settings for the keys it leaves unset."""
    if cfg.sources is None:
        return [("data.path", cfg, 1.0)]
    out = []
    for i, source in enumerate(cfg.sources):
        update = {name: getattr(source, name) for name in SOURCE_FIELDS if getattr(source, name) is not None}
        out.append((f"data.sources[{i}].path", cfg.model_copy(update={**update, "sources": None}), source.weight))
    return out


def load_sources(cfg: DataConfig, seed: int) -> list[Source]:
    """Every source's validated (train, eval) rows. ``data.val_size`` is split off each source; ``data.eval_path``
    is read with data's own format and columns, as a source of eval rows only. ``data.max_samples`` caps a single
    dataset's rows here, a mixture's examples after mixing (:func:`mixed_examples`)."""
    if cfg.eval_path and cfg.val_size and (cfg.streaming or cfg.sources is not None):  # else load_records says it
        warnings.warn(f"data.eval_path is set, so data.val_size {cfg.val_size:g} is ignored", stacklevel=2)
    if cfg.streaming:
        return _stream_sources(cfg, seed)
    if cfg.sources is None:
        train, evaluation = load_records(cfg, seed)
        eval_key = f"data.eval_path {cfg.eval_path}" if cfg.eval_path else f"the data.val_size rows of {cfg.path}"
        return [Source(f"data.path {cfg.path}", loaded_format(cfg), 1.0, train, evaluation, eval_key)]
    loaded = []
    for key, source_cfg, weight in source_configs(cfg):
        read = source_cfg.model_copy(update={"max_samples": None, "eval_path": None,
                                             "val_size": 0.0 if cfg.eval_path else cfg.val_size})
        train, evaluation = load_records(read, seed, key=key)
        named = f"{key} {source_cfg.path}"
        loaded.append(Source(named, loaded_format(source_cfg), weight, train, evaluation,
                             f"the data.val_size rows of {named}"))
    return loaded + ([_eval_file(cfg, seed)] if cfg.eval_path else [])


def _eval_file(cfg: DataConfig, seed: int) -> Source:
    """``data.eval_path`` beside a mixture or a stream: read whole, with data's own format and columns, as a source
    of eval rows only."""
    read = cfg.model_copy(update={"path": cfg.eval_path, "eval_path": None, "val_size": 0.0, "max_samples": None,
                                  "sources": None, "streaming": False})
    rows, _ = load_records(read, seed, key="data.eval_path")
    return Source(f"data.eval_path {cfg.eval_path}", loaded_format(read), 0.0, None, rows,
                  f"data.eval_path {cfg.eval_path}")


def _stream_sources(cfg: DataConfig, seed: int) -> list[Source]:
    """``data.streaming``: each source's rows as a validated stream; eval rows from data.eval_path, or each
    stream's first data.val_size rows (then not trained on)."""
    loaded = []
    for key, source_cfg, weight in source_configs(cfg):
        rows, named = open_stream(source_cfg, key=key), f"{key} {source_cfg.path}"
        evaluation, eval_key = None, ""
        if cfg.val_size and not cfg.eval_path:
            evaluation = datasets.Dataset.from_list(list(rows.take(int(cfg.val_size))))
            rows, eval_key = rows.skip(int(cfg.val_size)), f"the first data.val_size rows of {named}"
        read = source_cfg if cfg.sources is None else source_cfg.model_copy(update={"max_samples": None})
        loaded.append(Source(named, loaded_format(read), weight, rows, evaluation, eval_key))
    return loaded + ([_eval_file(cfg, seed)] if cfg.eval_path else [])


STREAM_TOKENIZER_ROWS = 10_000  # an inline model's tokenizer learns from this many rows of a stream


def training_texts(sources: list[Source]) -> Iterator[str]:
    """The full text of every training row of every source (a stream's first rows), to train a tokenizer for an
    inline model."""
    return chain.from_iterable(
        record_texts(islice(s.train, STREAM_TOKENIZER_ROWS) if isinstance(s.train, datasets.IterableDataset)
                     else s.train, s.cfg) for s in sources if s.train is not None)


def tokenized(sources: list[Source], tokenizer, split: str) -> list:
    """Each source's ``split`` ("train" or "eval") tokenized (Arrow, cached: :func:`.tokens.tokenize_dataset`), or
    a stream's as a :class:`~.streaming.TokenStream` (tokenized as it is read)."""
    out = []
    for s in sources:
        rows = getattr(s, split)
        if isinstance(rows, datasets.IterableDataset):
            check_tokenizer(tokenizer)
            out.append(TokenStream(rows, s.cfg, tokenizer, s.cfg.shuffle_buffer, s.cfg.max_samples))
        elif rows is not None:
            name = s.key if split == "train" else s.eval_key
            out.append(tokenize_dataset(rows, s.cfg, tokenizer, name=name))
    return out


def mixed_examples(cfg: DataConfig, sources: list[Source], examples: list, seed: int
                   ) -> datasets.Dataset | TokenStream | MixedStream:
    """The training examples (``examples``: :func:`tokenized` train splits): one source's as they are, or the
    sources' interleaved by weight (seeded) and cut to ``data.max_samples``."""
    if cfg.sources is None:
        return examples[0]
    weights = [s.weight for s in sources if s.train is not None]
    if cfg.streaming:
        return MixedStream(examples, weights, cfg.max_samples)
    mixed = datasets.interleave_datasets(examples, probabilities=[w / sum(weights) for w in weights], seed=seed,
                                         stopping_strategy=cfg.mix_stop)
    if cfg.max_samples is not None and cfg.max_samples < len(mixed):
        mixed = mixed.select(range(cfg.max_samples))
    return mixed


def concatenated(examples: list[datasets.Dataset]) -> datasets.Dataset | None:
    """The sources' eval examples, one after another (None: no eval data)."""
    return datasets.concatenate_datasets(examples) if examples else None
