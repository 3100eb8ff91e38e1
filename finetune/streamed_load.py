"""Load a base model that does not fit: decoder layers go from the checkpoint's shards straight into their homes.

:func:`slimtune.finetune.model.load_model` (``from_pretrained``) holds the whole model on the device before the
offload engine takes over, so a base larger than the device or the host cannot even start. When the plan streams
the decoder layers (``offload.params`` cpu/nvme), :func:`load_streamed` builds the model instead as
``from_pretrained`` would, but one layer at a time:

1. the **skeleton** on the meta device (``accelerate.init_empty_weights``: parameters shape-only, buffers such as
   rotary tables computed as usual), in ``model.dtype``; for QLoRA transformers' own bitsandbytes quantizer turns
   the linear layers into ``Linear4bit`` (``HfQuantizer.preprocess_model``, the call ``from_pretrained`` makes);
2. everything outside the decoder layers (embeddings, final norm, LM head) **materialized** from the checkpoint on
   the device, weights tied again (``tie_weights``);
3. a **fill function** the block streamer calls per layer while it builds the homes
   (:class:`~slimtune.offload.stream.streamer.BlockStreamer` ``fill=``): the layer's tensors are read from the
   shards (:class:`~slimtune.offload.stream.shards.CheckpointShards`, transformers' key renames), cast to
   ``model.dtype``, 4-bit quantized with bitsandbytes' ``Params4bit`` exactly as transformers' ``Bnb4bitQuantize``
   does (cast first, then quantize: the codes and ``quant_state`` equal ``from_pretrained(load_in_4bit)``'s), put on
   the device, packed into the layer's home by the streamer and dropped. Host memory holds one layer at a time.

What still differs from ``from_pretrained``: a checkpoint without safetensors, a pre-quantized checkpoint, and an
architecture whose tensors need a multi-tensor converter are refused with the reason (``offload.params gpu`` loads
them whole); missing weights are refused rather than initialized randomly.
"""

from __future__ import annotations

from pathlib import Path

import torch

import slimtune.offload.stream.bnb_compat  # noqa: F401  (bitsandbytes without the kernel hub, before transformers')

# isort: split
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from slimtune.offload.blocks import decoder_layers, keep_torch_forwards
from slimtune.offload.stream.bnb_compat import keep_training_layout
from slimtune.offload.stream.shards import CheckpointError, CheckpointShards

from .errors import SlimtuneError
from .recipe import ModelConfig


class StreamedModel:
    """A model whose decoder layers are still on the meta device, and the :meth:`fill` that loads one of them."""

    def __init__(self, model: PreTrainedModel, shards: CheckpointShards, device: torch.device, dtype: torch.dtype,
                 quantizer):
        self.model, self.shards, self.device, self.dtype, self.quantizer = model, shards, device, dtype, quantizer
        self.prefix, self.layers = decoder_layers(model)

    def fill(self, i: int) -> None:
        """Materialize decoder layer ``i`` on the device from the checkpoint (the streamer then moves it home)."""
        names = [f"{self.prefix}.{i}.{n}" for n, _ in self.layers[i].named_parameters()]
        self.shards.check(names)
        for name in names:  # one tensor at a time: its shard is mapped only while it is read
            self._set(name, self.shards.read([name])[name])

    def _set(self, name: str, value: torch.Tensor) -> None:
        module_name, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        old = getattr(module, leaf)
        if tuple(value.shape) != tuple(old.shape) and not hasattr(old, "quant_state"):
            raise CheckpointError(f"{self.shards.directory}: checkpoint tensor for {name} has shape "
                                  f"{tuple(value.shape)}, the model expects {tuple(old.shape)}")
        if self.quantizer is not None and self.quantizer.param_needs_quantization(self.model, name):
            import bitsandbytes as bnb
            from transformers.pytorch_utils import Conv1D

            value = value.to(self.dtype)  # transformers casts to the model dtype first, then quantizes
            if issubclass(getattr(module, "source_cls", type(None)), Conv1D):
                value = value.T  # GPT-2's Conv1D stores (in, out): transposed as transformers' Bnb4bitQuantize does
            module._parameters[leaf] = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(self.device)
            return
        # the dtype the skeleton gave it; the modules bitsandbytes swapped in were built in fp32 (a Linear4bit's
        # bias), which from_pretrained casts to the model dtype as it loads them
        quantized_module = hasattr(getattr(module, "weight", None), "quant_state")
        dtype = (self.dtype if quantized_module else old.dtype) if old.is_floating_point() else None
        set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=dtype)


def checkpoint_dir(cfg: ModelConfig, source: Path | str) -> Path:
    """The local directory holding ``source``'s checkpoint (a hub id is fetched as safetensors + json files only)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=cfg.revision, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # network, auth, unknown repo: one line naming the key
        raise SlimtuneError(f"model.name_or_path: cannot fetch {str(source)!r} for a streamed load: {exc}") from None


def load_streamed(cfg: ModelConfig, source: Path | str, device: torch.device, quantization_config=None,
                  gradient_checkpointing: bool = True) -> StreamedModel:
    """The model of ``source`` with every weight outside the decoder layers loaded on ``device`` and the layers on
    meta, to be filled one at a time by :meth:`StreamedModel.fill` (see the module docstring)."""
    from accelerate import init_empty_weights

    from .model import DTYPES

    directory = checkpoint_dir(cfg, source)
    kwargs: dict = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    config = AutoConfig.from_pretrained(str(directory), **kwargs)
    if getattr(config, "quantization_config", None) is not None:
        raise SlimtuneError(f"model.name_or_path: {source} is a quantized checkpoint; the streamed load reads "
                            "full-precision ones. Use the full-precision model, or offload.params gpu")
    dtype = DTYPES[cfg.dtype]
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.config.name_or_path = str(source)  # as from_pretrained: peft records it as base_model_name_or_path
    quantizer = None
    if quantization_config is not None:
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device}, checkpoint_files=None)
    try:
        shards = CheckpointShards(directory, model)
        loaded = StreamedModel(model, shards, device, dtype, quantizer)
        layer_prefix = loaded.prefix + "."
        outside = [n for n in model.state_dict() if not n.startswith(layer_prefix)]
        present = [n for n in outside if n in shards.keys]
        shards.check([n for n in shards.missing(outside) if not tied_away(model, n)])
        shards.check([n for n in model.state_dict() if n.startswith(layer_prefix)])  # before any layer is read
        for name in present:  # one tensor at a time, as the layers
            loaded._set(name, shards.read([name])[name])
    except CheckpointError as exc:
        raise SlimtuneError(f"model.name_or_path: {exc}") from None
    model.tie_weights()
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.eval()  # as from_pretrained
    keep_torch_forwards(model)
    if quantizer is not None:
        keep_training_layout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return loaded


def tied_away(model: PreTrainedModel, name: str) -> bool:
    """Whether ``name`` is a weight ``tie_weights`` sets from another one (the LM head of a tied model)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return name in tied
