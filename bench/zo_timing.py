"""Seconds per in-memory MeZO step vs per streamed ZOStream step on the same model and batch (the ZO2 comparison
that bench/offload.py's MeZO rows make). Bench code: the library's ZOStream is what it times."""

from __future__ import annotations

import time

import torch
from torch import nn

from slimtune.offload.blocks import decoder_layers
from slimtune.offload.stream.streamer import BlockStreamer
from slimtune.offload.stream.zo_stream import ZOStream
from slimtune.optimizers.zeroth_order import MeZO, mezo_param_groups


def time_zo_step(model: nn.Module, batch: dict, *, home: str | None = "cpu", device: str | torch.device = "cpu",
                 nvme_dir: str | None = None, prefetch: int = 1, steps: int = 2, rounds: int = 3, lr: float = 1e-6,
                 eps: float = 1e-3, n_samples: int = 1, weight_decay: float = 0.0) -> dict:
    """Bench helper (bench/offload.py, MeZO rows): seconds per in-memory ``MeZO.step`` vs per streamed
    :meth:`ZOStream.step` on the same model and batch (``home=None``: ZOStream with everything resident; trainable
    layer weights are streamed when the layers hold any). ``rounds`` alternate the two (``steps`` timed steps each,
    after one untimed step) and the medians are reported, so a load change on a shared machine hits both. The model
    ends as it began: resident on ``device``, weights changed by the steps."""
    if steps < 1 or rounds < 1:
        raise ValueError(f"steps and rounds must be >= 1, got {steps}, {rounds}")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    batch = {k: v.to(device) for k, v in batch.items()}
    trainable = any(p.requires_grad for layer in decoder_layers(model)[1] for p in layer.parameters())
    opt = MeZO(mezo_param_groups(model.named_parameters(), weight_decay), lr=lr, eps=eps, weight_decay=weight_decay,
               n_samples=n_samples, noise="per_tensor")
    times: dict[str, list[float]] = {"in_memory": [], "streamed": []}
    counters: dict[str, float] = {}

    def timed(step, key, streamer=None) -> None:
        step()  # untimed: first-touch allocations, the first fetches
        before = dict(streamer.counters()) if streamer is not None else {}
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times[key].append(time.perf_counter() - t)
        for k, value in (streamer.counters() if streamer is not None else {}).items():
            counters[k] = counters.get(k, 0) + value - before[k]

    model.eval()
    for _ in range(rounds):
        timed(lambda: opt.step(lambda: float(model(**batch).loss)), "in_memory")
        streamer = None
        if home is not None:
            streamer = BlockStreamer(model, home, device, prefetch=prefetch, nvme_dir=nvme_dir,
                                     stream_trainable=trainable, writeback=trainable)
        zo = ZOStream(model, opt, streamer)  # continues the same optimizer's trajectory
        try:
            timed(lambda: zo.step(batch), "streamed", streamer)
        finally:
            zo.detach()
            if streamer is not None:
                streamer.detach()
    median = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    out = {"in_memory_s": median["in_memory"], "streamed_s": median["streamed"],
           "ratio": median["streamed"] / median["in_memory"]}
    for key in ("fetches", "bytes_to_device", "bytes_to_home", "wait_s"):  # per timed streamed step
        if key in counters:
            out[f"{key}_per_step"] = counters[key] / (rounds * steps)
    return out
