"""The unit of placement: a transformer block (docs/offload-design.md, rules 2 and 22).

A decoder-only Hugging Face model (bare, or wrapped by peft) is three kinds of block, in execution order:

* ``embed``: everything before the decoder layers (the token embedding; rotary tables have no parameters),
* ``layers.{i}``: each decoder layer,
* ``head``: everything after them (final norm, LM head; a tied LM head weight belongs to ``embed``, where
  ``named_parameters()`` lists it first).

Found from the model's own structure (the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries), so no model
code changes and any Llama-family decoder (Llama, Mistral, Qwen2, Gemma, OPT, ...) works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UnsupportedModel


@dataclass
class Block:
    """One block: its name, the module that runs it (a decoder layer; None for embed/head) and its parameters."""

    name: str
    module: nn.Module | None
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    def nbytes(self, trainable: bool | None = None) -> int:
        """Bytes of the block's parameters in their storage dtype (all, or only trainable/frozen ones)."""
        return sum(p.numel() * p.element_size() for _, p in self.params
                   if trainable is None or p.requires_grad == trainable)


def keep_torch_forwards(model: nn.Module) -> int:
    """Switch transformers' hub kernels off on ``model`` (and models inside it); returns how many were on.

    transformers 5 kernelizes every model ``from_pretrained`` loads when the ``kernels`` package (one of its own
    dependencies) is installed, and kernelizes again on each ``train()`` / ``eval()``: the ``forward`` of decorated
    modules (RMSNorm, rotary embedding, attention helpers) is replaced then. That drops wrappers installed on those
    modules: zeroth-order streaming wraps the final norm, and after a ``train()`` its perturbed forwards silently ran
    unperturbed (measured: MeZO streamed drifted from MeZO in memory from step 1). On a machine that reaches the Hub
    it would also download and run kernel code no recipe asked for. slimtune runs the model's own torch code.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "_use_kernels", False) and isinstance(getattr(type(module), "use_kernels", None), property):
            module.use_kernels = False  # transformers' setter: reset_kernels(), torch forwards back, no re-kernelize
            changed += 1
    return changed

def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    return config


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder layers: the largest ModuleList whose length is
    ``config.num_hidden_layers``. Raises ValueError naming the model class when there is none."""
    config = _config(model)
    n = getattr(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and n]
    if not found:
        raise UnsupportedModel(
            f"{type(model).__name__} cannot be offloaded: it has no nn.ModuleList of config.num_hidden_layers={n} "
            "decoder layers, the unit the engine streams and places (decoder-only transformers models have one); "
            "keep every tensor on the device (offload.params and offload.optimizer_state gpu, no offload budgets)")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def model_blocks(model: nn.Module) -> list[Block]:
    """The model's blocks in execution order: embed, layers.0 .. layers.{L-1}, head (each parameter in one block)."""
    prefix, layers = decoder_layers(model)
    blocks = [Block("embed", None)] + [Block(f"layers.{i}", layer) for i, layer in enumerate(layers)] \
        + [Block("head", None)]
    seen_layers = False
    for name, p in model.named_parameters():  # deduplicated: a tied weight is listed once, at its first owner
        if name.startswith(prefix + "."):
            index = int(name[len(prefix) + 1:].split(".", 1)[0])
            blocks[1 + index].params.append((name, p))
            seen_layers = True
        else:
            blocks[-1 if seen_layers else 0].params.append((name, p))
    return blocks


def tied_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters reachable under more than one module name (e.g. a tied embedding / LM head)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return [p for p in {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}.values()
            if seen[id(p)] > 1]


def flat_layout(tensors: list[torch.Tensor], align: int = 64, total_align: int = 4096) -> tuple[list[int], int]:
    """Byte offsets of ``tensors`` packed one after another (each ``align``-aligned) and the total size rounded up to
    ``total_align`` (O_DIRECT needs whole aligned blocks)."""
    offsets, end = [], 0
    for t in tensors:
        end = -(-end // align) * align
        offsets.append(end)
        end += t.numel() * t.element_size()
    return offsets, max(total_align, -(-end // total_align) * total_align)


def view_as(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view of ``buffer`` (flat uint8) at ``offset`` with ``like``'s dtype and shape."""
    n = like.numel() * like.element_size()
    return buffer[offset:offset + n].view(like.dtype).view(like.shape)
