"""Save a fully fine-tuned model whose decoder layers live in the offload engine's homes, without materializing it.

``save_pretrained`` needs every weight in memory at once; for a model streamed from NVMe that is the RAM the offload
avoided. :func:`save_streamed` writes the same checkpoint -- the model's ``state_dict`` names (a tied LM head once,
under the embedding's name, as ``save_pretrained`` does), its dtypes, sharded safetensors with
``model.safetensors.index.json``, ``config.json`` and ``generation_config.json`` -- one shard at a time: resident
weights (embeddings, norms, head) come from the model, streamed ones from their layer's home
(:meth:`~slimtune.offload.stream.streamer.BlockStreamer.layer_tensors`), so host memory holds one shard (at most
about two layers) on top of the run. ``from_pretrained`` reloads it to the engine's weights exactly (the tests check).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimtune.offload.plan_phases import shard_bytes
from slimtune.offload.stream.shards import write_shards


def save_streamed(model: torch.nn.Module, streamer, directory: Path) -> list[Path]:
    """Write ``model`` (its streamed layers read from ``streamer``'s homes) as a sharded HF checkpoint."""
    shapes = {id(p): s for layer in streamer.layers for p, s in zip(layer.params, layer.shapes)}
    seen: set[int] = set()
    params: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict(keep_vars=True).items():  # a tied weight once, at its first name
        if id(p) not in seen:
            seen.add(id(p))
            params[name] = p
    saved_as = saved_names(model, {n: shapes.get(id(p), (p.shape, p.dtype)) for n, p in params.items()})
    params = {saved_as[n]: p for n, p in params.items()}
    entries = []
    for name, p in params.items():
        shape, dtype = shapes.get(id(p), (p.shape, p.dtype))
        entries.append((name, shape.numel() * dtype.itemsize))
    layer_bytes = max((layer.nbytes for layer in streamer.layers), default=0)
    reader = streamer.reader()  # shards follow the layer order: each home read once

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        return {n: reader(params[n]) if params[n] in reader else params[n].detach().cpu() for n in names}

    directory = Path(directory)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    return write_shards(directory, entries, fetch, shard_bytes(layer_bytes))


def saved_names(model: torch.nn.Module, shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, str]:
    """Model name -> the name ``save_pretrained`` writes it under: transformers reverts its load-time key renames
    (``core_model_loading.revert_weight_conversion``, e.g. GPT-NeoX's ``embed_out`` is saved as ``lm_head``). Run
    on shape-only tensors; an architecture whose save would *convert* tensors (fuse or split them) is refused."""
    from transformers.core_model_loading import revert_weight_conversion

    from .errors import SlimtuneError

    stand_ins = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in shapes.items()}
    reverted = revert_weight_conversion(model, dict(stand_ins))
    name_of = {id(t): n for n, t in stand_ins.items()}
    out = {name_of[id(t)]: saved for saved, t in reverted.items() if id(t) in name_of}
    if len(out) != len(stand_ins):
        raise SlimtuneError(f"{type(model).__name__}: save_pretrained converts (fuses or splits) some of its "
                            "tensors on save, which the streamed save cannot do layer by layer; keep the weights on "
                            "the device (offload.params gpu) for this architecture")
    return out

