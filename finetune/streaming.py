"""Streamed training data (``data.streaming``): examples tokenized as the trainer reaches them, resumable exactly.

The rows come from ``datasets``' ``IterableDataset`` (:func:`.data.open_stream`: local files or the hub, validated
as they are read). Each epoch reads them through a seeded shuffle buffer (``datasets``' ``shuffle(seed,
buffer_size)`` with ``set_epoch``: the same seed and epoch give the same order), and tokenizes a few rows at a time
with the in-memory path's function, so a streamed example is the example the Arrow path would give.

The data position is the number of rows of the epoch's shuffled stream read so far (examples whose response is cut
away by ``max_length`` count: they were read). A checkpoint stores it; a resumed run rebuilds the same shuffled
stream, skips that many rows without tokenizing them, and goes on with exactly the next example.

A streamed mixture (:class:`MixedStream`, ``data.sources`` with ``data.streaming``) draws each example's source
with a seeded generator (probability weight / sum of weights) until the first source runs out; its position is
``[draws, rows read of source 0, rows read of source 1, ...]``, and a resumed run replays the draws and skips each
source's rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import datasets
import numpy as np
import torch

from .batches import collate
from .errors import DataError
from .recipe import DataConfig
from .tokens import tokenize_examples

TOKENIZE_ROWS = 64  # rows tokenized per tokenizer call while streaming


class Stream:
    """Training examples that are read, not held: :class:`TokenStream` (one source) or :class:`MixedStream`."""

    name: str = "the stream"

    def examples(self, seed: int, epoch: int, start=0) -> Iterator[tuple[Any, dict]]:
        """(position after the example, example) for each example of epoch ``epoch`` from ``start`` (a position
        this method yielded; 0: the epoch's beginning). Positions are JSON values (a checkpoint stores them)."""
        raise NotImplementedError


@dataclass
class TokenStream(Stream):
    """The training examples of a stream. ``rows``: validated rows in the source's order (eval rows already taken
    off); ``cfg``: how they read (sharegpt rows read as messages); ``buffer``: the shuffle buffer (0: source order);
    ``max_rows``: ``data.max_samples`` (the same first rows every epoch)."""

    rows: datasets.IterableDataset
    cfg: DataConfig
    tokenizer: Any
    buffer: int
    max_rows: int | None = None
    dropped: int = 0  # examples whose response max_length cut away, so far (one warning)

    @property
    def name(self) -> str:
        return f"data.path {self.cfg.path}"

    def examples(self, seed: int, epoch: int, start: int = 0) -> Iterator[tuple[int, dict]]:
        """(rows read so far this epoch, example) for each example of epoch ``epoch`` after the first ``start``
        rows of its shuffled stream."""
        rows = self.rows.take(self.max_rows) if self.max_rows is not None else self.rows
        if self.buffer:
            rows = rows.shuffle(seed=seed, buffer_size=self.buffer)
        if start:
            rows = rows.skip(start)
        if self.buffer:  # on the dataset iterated (skip() makes a new one, at epoch 0): seed + epoch shuffles
            rows.set_epoch(epoch)
        position, chunk = start, []
        for row in rows:
            chunk.append(row)
            if len(chunk) == TOKENIZE_ROWS:
                yield from self._tokenized(chunk, position)
                position, chunk = position + len(chunk), []
        if chunk:
            yield from self._tokenized(chunk, position)

    def _tokenized(self, chunk: list[dict], position: int) -> Iterator[tuple[int, dict]]:
        for offset, example in enumerate(tokenize_examples(chunk, self.cfg, self.tokenizer)):
            if example is None:
                self.dropped += 1
                if self.dropped == 1:
                    warnings.warn(f"data.streaming: an example's response starts after data.max_length "
                                  f"({self.cfg.max_length}) tokens of prompt; such examples are skipped (raise "
                                  "data.max_length to keep them)", stacklevel=2)
                continue
            yield position + offset + 1, example


@dataclass
class MixedStream(Stream):
    """A mixture of streams: each example is drawn from source i with probability ``weights[i] / sum(weights)``
    (a generator seeded by (seed, epoch)), until a source runs out (``mix_stop: first_exhausted``: no example
    repeats) or ``max_draws`` examples (``data.max_samples``). Source i shuffles with seed + i."""

    sources: list[TokenStream]
    weights: list[float]
    max_draws: int | None = None

    @property
    def name(self) -> str:
        return "the streamed mixture of " + ", ".join(s.name for s in self.sources)

    def examples(self, seed: int, epoch: int, start=0) -> Iterator[tuple[list[int], dict]]:
        position = list(start) if start else [0] * (1 + len(self.sources))
        draws, rows = position[0], position[1:]
        cumulative = np.cumsum(np.asarray(self.weights, dtype=np.float64) / sum(self.weights))
        generator = np.random.default_rng([seed, epoch])
        generator.random(draws)  # the draws made before ``start``: one uniform each
        readers = [s.examples(seed + i, epoch, rows[i]) for i, s in enumerate(self.sources)]
        while self.max_draws is None or draws < self.max_draws:
            source = min(int(np.searchsorted(cumulative, generator.random(), side="right")), len(self.sources) - 1)
            draws += 1
            found = next(readers[source], None)
            if found is None:  # first_exhausted: the epoch ends with the first source that runs out
                return
            rows[source] = found[0]
            yield [draws, *rows], found[1]


def stream_batches(stream: Stream, batch_size: int, seed: int, epoch: int, pad_id: int, start=0,
                   packed: bool = False) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
    """(collated batch, the stream's position after it) from position ``start`` of epoch ``epoch`` on; the last
    batch of an epoch may be short. An epoch without a single example is an error."""
    group, position, yielded = [], start, 0  # a position: see Stream.examples
    for position, example in stream.examples(seed, epoch, start):
        group.append(example)
        yielded += 1
        if len(group) == batch_size:
            yield collate(group, pad_id, packed), position
            group = []
    if group:
        yield collate(group, pad_id, packed), position
    if not yielded and not start:
        raise DataError(f"{stream.name}: the stream has no example to train on (no rows, or every response is cut "
                        "away by data.max_length)")


def endless_batches(stream: Stream, batch_size: int, seed: int, pad_id: int, packed: bool = False, epoch: int = 0,
                    start=0) -> Iterator[tuple[dict[str, torch.Tensor], int, Any]]:
    """(batch, its epoch, the stream's position after it): :func:`stream_batches` of epoch after epoch, from
    position ``start`` of ``epoch`` on. The micro-batches ``slimtune train`` and :class:`StreamBatches` read."""
    while True:
        for batch, position in stream_batches(stream, batch_size, seed, epoch, pad_id, start, packed):
            yield batch, epoch, position
        epoch, start = epoch + 1, 0


class StreamBatches(torch.utils.data.IterableDataset):
    """The micro-batches of a stream, epoch after epoch without end, for a ``DataLoader(batch_size=None)``: the
    batches ``slimtune train`` reads (each epoch's last one may be short), for the Hugging Face route, which stops at
    ``max_steps`` and resumes by skipping the micro-batches already trained on (re-reading them).

    With several processes, every process reads the same seeded stream and process ``rank`` of ``world`` takes
    micro-batches rank, rank + world, ...: the ``world`` micro-batches of one round are those one process would run
    as ``world`` accumulation steps, and as the sequence never ends every process gets as many as the others."""

    def __init__(self, stream: Stream, batch_size: int, seed: int, pad_id: int, packed: bool = False,
                 rank: int = 0, world: int = 1):
        super().__init__()
        self.stream, self.batch_size, self.seed, self.pad_id, self.packed = stream, batch_size, seed, pad_id, packed
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = endless_batches(self.stream, self.batch_size, self.seed, self.pad_id, self.packed)
        for index, (batch, _, _) in enumerate(batches):
            if index % self.world == self.rank:
                yield batch
