"""Reading and rewriting the homes of a :class:`~.streamer.BlockStreamer`'s layers: checkpoints, exports and the
offloaded optimizer's updates go through these, never through the ring.

A home is a layer's streamed tensors packed in one aligned byte region: a CPU buffer (``cpu_homes[i]``) or a region
of the NVMe store (``store``, key ``i``). :class:`HomeAccess` is the part of the streamer that reads a home back
(:meth:`~HomeAccess.layer_tensors`), replaces it (:meth:`~HomeAccess.write_layer`), or rewrites some of its tensors
or rows while the layer may be bound (:meth:`~HomeAccess.write_home`, the offloaded optimizer's updates during
backward); NVMe homes are written once per layer, when every trainable row has arrived or at
:meth:`~HomeAccess.flush_home_writes`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..store.nvme import aligned_empty


class HomeAccess:
    """Mixin of :class:`~.streamer.BlockStreamer`: uses its ``layers``, ``home``, ``cpu_homes``, ``store``, ``lock``
    and ``stats``; owns the NVMe layers whose rewrite is in progress."""

    _home_pending: dict[int, tuple[torch.Tensor, dict[int, list]]]

    def _pending(self) -> dict[int, tuple[torch.Tensor, dict[int, list]]]:
        """NVMe layers in progress (write_home): layer -> (its aligned buffer, rows written per tensor)."""
        if not hasattr(self, "_home_pending"):
            self._home_pending = {}
        return self._home_pending

    def read_home(self, layer) -> torch.Tensor:
        """The layer's current bytes (a CPU tensor), from its home."""
        layer.home_ready.result()
        if self.home == "cpu":
            return self.cpu_homes[layer.index]
        buf = aligned_empty(layer.nbytes)
        self.store.read(layer.index, buf).result()
        return buf

    def layer_tensors(self, i: int) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, CPU copy of its current value) for layer ``i``: checkpoints and exports read through this."""
        layer = self.layers[i]
        buf = self.read_home(layer)
        return [(p, self._home_view(buf, layer, k).clone()) for k, p in enumerate(layer.params)]

    def reader(self) -> HomeReader:
        """Values of streamed parameters from their homes, one layer read at a time (see :class:`HomeReader`)."""
        return HomeReader(self)

    def write_layer(self, i: int, values: list[torch.Tensor]) -> None:
        """Replace layer ``i``'s streamed tensors (in ``self.layers[i].params`` order) in its home, e.g. after an
        optimizer update or a checkpoint load. The layer must not be bound."""
        layer = self.layers[i]
        if layer.slot is not None:
            raise RuntimeError(f"layer {i} is bound; release it before rewriting its home")
        layer.home_ready.result()
        buf = self.cpu_homes[i] if self.home == "cpu" else aligned_empty(layer.nbytes).zero_()
        for k, value in enumerate(values):
            self._home_view(buf, layer, k).copy_(value)
        if self.home == "nvme":
            self.store.write(i, buf).result()
        self.stats["bytes_to_home"] += layer.nbytes

    def write_home(self, i: int, values: dict[int, torch.Tensor], rows: dict[int, slice] | None = None) -> None:
        """Rewrite some of layer ``i``'s tensors (position in ``layers[i].params`` -> new value, cast to the param's
        dtype here) in its home, from any thread, while the layer may still be bound (an optimizer update running
        during backward). The bound copy is left alone (backward may still read it); the caller must
        :meth:`release_all` once every update of the step has landed, so the next forward fetches the new values.
        ``rows`` (position -> dim-0 slice): the value holds only those rows of the tensor (the offloaded optimizer's
        row chunks); its other rows are left as they are.

        A CPU home is written in place. An NVMe home is written once per layer, not once per call: the values are
        cast straight into an aligned buffer of the layer, which goes to disk when every row of every trainable
        tensor of the layer has arrived (the offloaded optimizer updates a layer in several units), or at
        :meth:`release_all` merged with the home's other tensors and rows."""
        layer, rows = self.layers[i], rows or {}
        with self.lock:
            layer.home_ready.result()
            if self.home == "cpu":
                buf = self.cpu_homes[i]
            else:
                pending = self._pending()
                if i not in pending:  # (not setdefault: its default would allocate a layer on every call)
                    pending[i] = (aligned_empty(layer.nbytes).zero_(), {})
                buf, got = pending[i]
        for k, value in values.items():
            view = self._home_view(buf, layer, k)
            (view if rows.get(k) is None else view[rows[k]]).copy_(value)
        with self.lock:
            self.stats["bytes_to_home"] += sum(v.numel() * layer.shapes[k][1].itemsize for k, v in values.items())
            if self.home == "cpu":
                return
            for k in values:
                got.setdefault(k, []).append(rows.get(k))
            complete = all(not _missing_rows(got.get(k), _n_rows(layer.shapes[k][0]))
                           for k, p in enumerate(layer.params) if p.requires_grad)
            if complete:
                del self._pending()[i]
        if complete:
            self.store.write(i, buf).result()

    @staticmethod
    def _home_view(buf: torch.Tensor, layer, k: int) -> torch.Tensor:
        """Tensor ``k`` of ``layer`` as a typed, shaped view into the layer's flat bytes ``buf``."""
        shape, dtype = layer.shapes[k]
        off = layer.offsets[k]
        return buf[off:off + shape.numel() * dtype.itemsize].view(dtype).view(shape)

    def flush_home_writes(self) -> None:  # caller holds self.lock
        """Write the NVMe homes some of whose tensors were rewritten (the others, and the rows of a tensor no
        chunk rewrote, read back from the home first)."""
        pending, self._home_pending = self._pending(), {}
        for i, (buf, got) in pending.items():
            layer = self.layers[i]
            home = self.read_home(layer)
            for k, (shape, dtype) in enumerate(layer.shapes):
                if k not in got:
                    off, n = layer.offsets[k], shape.numel() * dtype.itemsize
                    buf[off:off + n].copy_(home[off:off + n])
                    continue
                for part in _missing_rows(got[k], _n_rows(shape)):
                    self._home_view(buf, layer, k)[part].copy_(self._home_view(home, layer, k)[part])
            self.store.write(i, buf).result()


class HomeReader:
    """``reader(param)``: a streamed parameter's current value (a CPU copy) from its layer's home; ``param in
    reader``: whether it streams. The last layer read is kept, so reading parameters in layer order (a streamed
    save, a checkpoint, the optimizer's initial masters) reads each home once and holds one layer."""

    def __init__(self, homes: HomeAccess):
        self.homes = homes
        self.where = {id(p): (i, k) for i, layer in enumerate(homes.layers) for k, p in enumerate(layer.params)}
        self.layer: int | None = None
        self.values: list[torch.Tensor] = []

    def __contains__(self, param: nn.Parameter) -> bool:
        return id(param) in self.where

    def __call__(self, param: nn.Parameter) -> torch.Tensor:
        i, k = self.where[id(param)]
        if i != self.layer:
            self.values, self.layer = [], None  # the previous layer goes before the next one is read
            self.values, self.layer = [v for _, v in self.homes.layer_tensors(i)], i
        return self.values[k]


def _missing_rows(parts: list[slice | None] | None, n_rows: int) -> list[slice]:
    """The dim-0 row ranges of a tensor of ``n_rows`` rows that ``parts`` (written slices; None = all of it) miss."""
    if parts is None:
        return [slice(0, n_rows)]
    if any(p is None for p in parts):
        return []
    out, at = [], 0
    for p in sorted(parts, key=lambda p: p.start):
        if p.start > at:
            out.append(slice(at, p.start))
        at = max(at, p.stop)
    return out + ([slice(at, n_rows)] if at < n_rows else [])


def _n_rows(shape: torch.Size) -> int:
    """Dim-0 rows of a tensor of ``shape`` (a 0-d tensor is one row)."""
    return shape[0] if len(shape) else 1
