"""Base models: build a tiny inline Llama, load any causal LM (optionally 4-bit), count parameters.

QLoRA's 4-bit settings come from the recipe (``model.quantization``), whose defaults are the paper's: NF4, double
quantization, bf16 compute. ``BitsAndBytesConfig(load_in_4bit=True)`` alone would give fp4 with fp32 compute
(the QLoRA paper, arXiv 2305.14314, and artidoro/qlora's ``qlora.py``), so every field is passed explicitly here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from slimtune.offload.blocks import keep_torch_forwards
from slimtune.offload.stream.bnb_compat import keep_training_layout

from .errors import SlimtuneError, first_line
from .paths import is_local_model
from .recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → cuda when available, else cpu. Asking for cuda on a machine without it is a user error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SlimtuneError(f"offload.device is {name!r} but CUDA is not available on this machine "
                            "(torch.cuda.is_available() is False); use offload.device cpu or auto")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise SlimtuneError(f"offload.device {name!r} is not a device; use auto, cpu or cuda")
    return torch.device(name)


def build_base_model(cfg: ModelConfig, tokenizer, seed: int, save_dir: Path | None) -> Path | str:
    """The base model's source for :func:`load_model`.

    For ``model.name_or_path`` that is the id/dir itself. For an inline ``model.architecture`` a randomly
    initialised ``LlamaForCausalLM`` is built (seeded: same seed → identical weights) in ``model.dtype`` and saved,
    with its tokenizer, to ``save_dir``, so the run directory holds its own base model and later steps (resume,
    ``PeftModel.from_pretrained``, merge, generate) load it like any other checkpoint.
    """
    if cfg.architecture is None:
        return cfg.name_or_path
    if save_dir is None:
        raise ValueError("build_base_model needs save_dir for an inline model.architecture (the run keeps its base)")
    arch = cfg.architecture.model_dump(exclude={"type"})
    if arch["num_key_value_heads"] is None:
        arch.pop("num_key_value_heads")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(DTYPES[cfg.dtype])
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_dir, safe_serialization=True)
    tokenizer.save_pretrained(save_dir)
    return save_dir


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig:
    """The recipe's 4-bit settings as a ``BitsAndBytesConfig`` (every field explicit, see module docstring)."""
    q = cfg.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
    )


def load_model(cfg: ModelConfig, source: Path | str, device: str | torch.device, quantized: bool,
               gradient_checkpointing: bool) -> PreTrainedModel:
    """Load the base causal LM from ``source`` (a hub id or local dir) onto ``device``.

    ``quantized`` loads the linear layers as bitsandbytes 4-bit (``Linear4bit``); the rest (embeddings, norms,
    lm_head) stays in ``model.dtype``. Gradient checkpointing uses the non-reentrant implementation, which needs
    no input that requires grad (the frozen embedding's output does not) and works with frozen 4-bit layers.
    """
    device = resolve_device(device)
    source = _check_source(cfg, source)
    kwargs: dict = {"dtype": DTYPES[cfg.dtype], "device_map": {"": device}}
    if cfg.trust_remote_code:  # only when the recipe opts in: it runs code from the model repo
        kwargs["trust_remote_code"] = True
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantized:
        kwargs["quantization_config"] = quantization_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise SlimtuneError(f"{_source_key(cfg)}: cannot load a causal LM from {str(source)!r}: {first_line(exc)}"
                            ) from None
    keep_torch_forwards(model)  # no hub kernels swapped in on train()/eval() (see there)
    if quantized:
        keep_training_layout(model)  # bnb's CPU eval repack would break training after an eval (see there)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with recomputation
    return model


# Model types whose attention keeps packed examples apart (data.packing): with position_ids restarting per example,
# no attention_mask and no cache, transformers' causal mask stops at each example's start. Verified by
# tests/test_packing.py on a tiny model of each (the logits of an example do not change with its neighbours and
# equal its logits alone); OPT is not among them (its learned positions come from the attention mask).
PACKING_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "phi", "gpt_neox", "gpt2"})


def check_packing(model: torch.nn.Module) -> None:
    """``data.packing`` on ``model``: refused (with the reason) for a model type not known to keep packed examples
    apart; otherwise the model stops caching in training forwards, which transformers requires to see the packing
    (generation keeps its own cache: ``generation_config``)."""
    config = base_config(model)
    if config.model_type not in PACKING_MODEL_TYPES:
        raise SlimtuneError(
            f"data.packing: {config.model_type} models are not known to keep packed examples apart (their attention "
            "would cross from one example into the next); verified model types: "
            f"{', '.join(sorted(PACKING_MODEL_TYPES))}. Set data.packing false (examples are then padded)")
    config.use_cache = False


def base_config(model: torch.nn.Module):
    """The transformers config of ``model``, through a peft wrapper if there is one."""
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. A 4-bit ``Params4bit`` stores two values per byte in a packed
    ``(n/2, 1)`` uint8 tensor; it counts as its logical ``n`` elements."""
    trainable = total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        n = state.shape.numel() if state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _check_source(cfg: ModelConfig, source: Path | str) -> str:
    """Fail early, with the recipe key, for a local model directory that does not exist or is not a model."""
    text = str(source)
    if not is_local_model(source):
        return text  # a hub id
    path = Path(text).expanduser()
    if not path.is_dir():
        raise SlimtuneError(f"{_source_key(cfg)}: local directory {text} does not exist (give a model directory "
                            "with config.json and weights, or a hub id such as meta-llama/Meta-Llama-3-8B)")
    if not (path / "config.json").is_file():
        raise SlimtuneError(f"{_source_key(cfg)}: {text} has no config.json, so it is not a saved model (expected "
                            "the output of save_pretrained: config.json + *.safetensors)")
    return str(path.resolve())  # absolute, so adapters saved later record a base path that works from anywhere


def _source_key(cfg: ModelConfig) -> str:
    return "model.name_or_path" if cfg.name_or_path is not None else "model.architecture (base saved in the run dir)"

