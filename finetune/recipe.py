"""The recipe: one schema shared by every entry point (CLI, Hugging Face integration, tests).

A recipe is a YAML file with seven sections (``model``, ``adapter``, ``data``, ``optimizer``, ``offload``,
``training``, ``output``) plus command-line overrides (``training.max_steps=50``). Names follow Hugging Face
``TrainingArguments`` where one exists. Validation is strict and complete:

* an unknown key fails with its dotted path and a did-you-mean,
* a wrong type or out-of-range value names the key, the value and what is allowed,
* every problem is reported at once (field errors first; cross-field checks when the fields are valid),
* impossible combinations (a 4-bit base with full fine-tuning, ...) are refused with the reason.

All of this raises :class:`~slimtune.finetune.errors.RecipeError`; nothing heavy (torch models, datasets) is
touched, so ``slimtune validate`` is instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .recipe_base import DType, Section
from .recipe_io import (
    SECTIONS,
    apply_overrides,
    check_local_files,
    dedupe_union_errors,
    format_error,
    read_yaml,
    schema_docs,
    without_keys,
)
from .recipe_optimizers import AdamWConfig, OptimizerConfig


# --------------------------------------------------------------------------------------------------- model
class ArchitectureConfig(Section):
    """An inline Llama-architecture model built from its config (random init, seeded): tiny/offline runs."""

    type: Literal["llama"] = Field("llama", description="Architecture family (transformers LlamaConfig).")
    hidden_size: int = Field(128, ge=8, description="Width of the residual stream.")
    intermediate_size: int = Field(256, ge=8, description="Width of the gated MLP.")
    num_hidden_layers: int = Field(2, ge=1, description="Number of decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    num_key_value_heads: int | None = Field(None, ge=1, description="KV heads for GQA; null = num_attention_heads.")
    max_position_embeddings: int = Field(512, ge=8, description="Longest sequence the RoPE tables cover.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    tie_word_embeddings: bool = Field(True, description="Share the input embedding with the LM head.")
    initializer_range: float = Field(
        0.1, gt=0, description="Std of the random init. Larger than transformers' 0.02: with LoRA the tied embedding "
                               "stays frozen, and at 0.02 its logits cannot exceed ~0.02 x hidden_size.")

    @model_validator(mode="after")
    def _heads(self) -> "ArchitectureConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({kv})")
        return self


class QuantizationConfig(Section):
    """bitsandbytes 4-bit settings. Defaults are the QLoRA paper's (NF4, double quant, bf16 compute), not
    ``BitsAndBytesConfig``'s (fp4, no double quant, fp32 compute), which is the most common QLoRA mistake."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (QLoRA: nf4).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA: true).")
    compute_dtype: DType = Field("bfloat16", description="dtype of the 4-bit matmuls (QLoRA: bfloat16).")


class ModelConfig(Section):
    """Which base model to load, and how."""

    name_or_path: str | None = Field(
        None, description="Hugging Face hub id (e.g. meta-llama/Meta-Llama-3-8B) or a local model directory.")
    architecture: ArchitectureConfig | None = Field(
        None, description="Inline architecture for a tiny model built from config (instead of name_or_path).")
    tokenizer: str | None = Field(
        None, description="Tokenizer hub id or directory; null = the model's. For an inline architecture, null "
                          "trains a byte-level BPE tokenizer on the training data (offline, deterministic).")
    tokenizer_vocab_size: int = Field(
        512, ge=300, le=65536, description="Vocabulary size of the tokenizer trained for an inline architecture.")
    dtype: DType = Field("float32", description="dtype the weights are loaded in: float32 | bfloat16 | float16.")
    load_in_4bit: bool | None = Field(
        None, description="Quantize the base to 4 bits with bitsandbytes; null = only for adapter.type qlora.")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig,
                                             description="4-bit settings (used when the base is 4-bit).")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repo (only if you trust it).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; null = transformers' default.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError("set exactly one of model.name_or_path (hub id or local dir) or model.architecture "
                             "(inline tiny model)")
        return self


# --------------------------------------------------------------------------------------------------- adapter
class ExpertLoraConfig(Section):
    """MixLoRA: the LoRA of every expert (on gate_proj/up_proj/down_proj), when it should differ from the
    attention LoRA (MoE-PEFT's ``expert_lora``). A null field means the adapter's own r/alpha/dropout."""

    r: int | None = Field(None, ge=1, le=4096, description="Expert LoRA rank; null = adapter.r.")
    alpha: float | None = Field(None, gt=0, description="Expert LoRA alpha; null = adapter.alpha.")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Expert LoRA dropout; null = adapter.dropout.")


# Fields only adapter.type mixlora reads (any of them set explicitly for another type is refused).
MIXLORA_FIELDS = ("num_experts", "top_k", "router_aux_loss_coef", "router_init_range", "jitter_noise", "expert_lora",
                  "act_fn")
# The gated-MLP projections of Llama-family decoders: MixLoRA's experts put their LoRA on these.
MIXLORA_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Phi-3's gated MLP fuses gate and up into one projection (chunked in two); its experts adapt these.
MIXLORA_FUSED_PROJECTIONS = ("gate_up_proj", "down_proj")
# Phi-1/2's plain MLP (fc2(act(fc1 x))), the official code's third layout.
MIXLORA_PLAIN_PROJECTIONS = ("fc1", "fc2")


class AdapterConfig(Section):
    """Parameter-efficient adapter (through peft; MixLoRA's experts are slimtune's own) or full fine-tuning."""

    type: Literal["lora", "qlora", "mixlora", "none"] = Field(
        "lora", description="lora | qlora (NF4 4-bit base + LoRA) | mixlora (LoRA experts in every FFN, "
                            "arXiv 2404.15159; a 4-bit base with model.load_in_4bit true) | none (full fine-tuning).")
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module names to wrap, or all-linear (every linear layer except lm_head; "
                                  "QLoRA's choice, unlike peft's q_proj/v_proj default for Llama). mixlora: "
                                  "gate_proj/up_proj/down_proj get per-expert LoRA, attention names plain LoRA.")
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. [lm_head]).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    # MixLoRA (arXiv 2404.15159). Defaults: MoE-PEFT's code and its templates/mixlora.json.
    num_experts: int = Field(8, ge=1, le=256, description="mixlora: experts per FFN (MoE-PEFT template: 8).")
    top_k: int = Field(2, ge=1, description="mixlora: experts per token; their router weights are renormalised.")
    router_aux_loss_coef: float = Field(
        0.001, ge=0.0, description="mixlora: weight of the load-balance loss over all layers' router logits "
                                   "(official code default 0.001; its README uses 0.01; 0 turns it off).")
    router_init_range: float = Field(0.02, ge=0.0, description="mixlora: std of the router's normal init.")
    jitter_noise: float = Field(0.0, ge=0.0, lt=1.0, description="mixlora: multiply the FFN input by U(1-j, 1+j) "
                                                                 "in training (never at inference).")
    expert_lora: ExpertLoraConfig = Field(default_factory=ExpertLoraConfig,
                                          description="mixlora: expert LoRA settings, if not the adapter's.")
    act_fn: str | None = Field(None, description="mixlora: the experts' activation (a transformers ACT2FN name); "
                                                 "null = the base model's hidden activation.")


# --------------------------------------------------------------------------------------------------- data
class DataColumns(Section):
    """Column names in the dataset, when they differ from the format's defaults."""

    instruction: str = Field("instruction", description="alpaca: the instruction column.")
    input: str = Field("input", description="alpaca: the optional input column.")
    output: str = Field("output", description="alpaca: the response column.")
    messages: str = Field("messages", description="messages: the list of {role, content} turns.")
    conversations: str = Field("conversations", description="sharegpt: the list of {from, value} turns.")
    text: str = Field("text", description="text: the raw text column.")


class DataSource(Section):
    """One source of a mixture (``data.sources``): where its rows are and how they read; unset keys take data's."""

    path: str = Field(..., description="Local file, directory of them, or hub dataset name (as data.path).")
    weight: float = Field(1.0, gt=0, description="Share of the mixture's examples drawn from this source (weights "
                                                 "are normalised over the sources).")
    format: Literal["alpaca", "messages", "sharegpt", "text"] | None = Field(None, description="As data.format.")
    split: str | None = Field(None, description="As data.split.")
    subset: str | None = Field(None, description="As data.subset.")
    columns: DataColumns | None = Field(None, description="As data.columns.")


class DataConfig(Section):
    """Training data, through `datasets`: local JSON/JSONL/CSV/Parquet or a hub dataset, or a weighted mixture of
    them (``sources``)."""

    path: str | None = Field(None, description="Local file (.json/.jsonl/.csv/.parquet), a directory of them, or a "
                                               "hub dataset name. Relative paths resolve against the recipe file. "
                                               "Required unless data.sources is given.")
    sources: list[DataSource] | None = Field(
        None, description="A mixture instead of data.path: a list of {path, weight, and optionally format, split, "
                          "subset, columns}. Each source is loaded, validated and tokenized on its own, then their "
                          "examples are interleaved: each drawn from a source with probability weight / sum of "
                          "weights (seeded by training.seed), until data.mix_stop. data.val_size is split off each "
                          "source.")
    mix_stop: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted", description="data.sources: stop the mixture when the first source runs out (no example "
                                       "repeats) or when every source has been seen whole (smaller sources repeat; "
                                       "not with data.streaming).")
    format: Literal["alpaca", "messages", "sharegpt", "text"] = Field(
        "alpaca", description="alpaca (instruction/input/output) | messages (chat turns: role/content) | sharegpt "
                              "(chat turns: from/value, human/gpt/system) | text (plain LM).")
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Hub dataset configuration (subset) name, e.g. 'main' for gsm8k.")
    columns: DataColumns = Field(default_factory=DataColumns, description="Column names, if not the defaults.")
    eval_path: str | None = Field(None, description="Separate eval file; else val_size is split off the data.")
    val_size: float = Field(0.0, ge=0.0, description="Eval split: a fraction in (0, 1) or a row count (>= 1).")
    max_length: int = Field(512, ge=8, description="Token length cap; longer examples are truncated.")
    packing: bool = Field(False, description="Padding-free micro-batches: the examples side by side in one row, "
                          "positions restarting per example, attention never crossing between them.")
    train_on_prompt: bool = Field(
        False, description="Also compute loss on prompt tokens (default: responses only, for alpaca/messages).")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    streaming: bool = Field(False, description="Read the rows as training reaches them (datasets' streaming): for "
                            "data larger than RAM or disk. Needs training.max_steps; eval rows from data.eval_path or "
                            "a data.val_size count taken off the start. Resumes at the exact next example.")
    shuffle_buffer: int = Field(10_000, ge=0, description="data.streaming: examples held to shuffle the stream "
                                                          "(seeded, reshuffled each epoch); 0 reads in order.")
    num_proc: int | None = Field(None, ge=1, description="Processes that tokenize (datasets' map num_proc); default: "
                                 "one below 50,000 rows, else up to 8 (the CPU count). The tokenized examples are "
                                 "cached in the datasets cache: a second run on the same data, tokenizer and "
                                 "settings starts without tokenizing.")
    metric: Literal["none", "exact_match"] = Field(
        "none", description="Task metric at eval: exact_match of greedy answers vs the reference response.")
    metric_samples: int = Field(64, ge=1, description="Eval rows scored by generation for the task metric.")
    max_new_tokens: int = Field(32, ge=1, description="Generation budget for the task metric.")

    def describe(self) -> str:
        """'alpaca from data.jsonl', or the mixture's sources with their shares."""
        if self.sources is None:
            return f"{self.format} from {self.path}"
        total = sum(s.weight for s in self.sources)
        return "a mixture of " + ", ".join(f"{s.format or self.format} from {s.path} ({s.weight / total:.0%})"
                                           for s in self.sources)

    def local_paths(self) -> list[tuple[str, str]]:
        """(recipe key, path) of every dataset the recipe names: data.path or each source's, and data.eval_path."""
        named = [("data.path", self.path)] if self.sources is None else [
            (f"data.sources[{i}].path", s.path) for i, s in enumerate(self.sources)]
        return named + ([("data.eval_path", self.eval_path)] if self.eval_path else [])

    @model_validator(mode="before")
    @classmethod
    def _list_is_sources(cls, value: Any) -> Any:
        """``data:`` given as a list is a mixture: ``data.sources``."""
        return {"sources": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _checks(self) -> "DataConfig":
        if (self.path is None) == (self.sources is None):
            raise ValueError("data.path (one dataset) or data.sources (a mixture: a list of {path, weight}) is "
                             "required, not both")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources must list at least one {path, weight}")
        if self.metric != "none" and self.format == "text":
            raise ValueError("data.metric exact_match needs an instruction format (alpaca or messages), "
                             "not text: plain text has no reference answers")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError(f"data.val_size {self.val_size} must be a fraction in (0, 1) or a whole row count")
        return self


# --------------------------------------------------------------------------------------------------- offload
class OffloadConfig(Section):
    """Where tensors live: the compute device, memory budgets per tier, and (optionally) where params, gradients and
    optimizer state go. ``auto`` placement picks the fastest plan that fits the budgets (``slimtune plan`` shows it):
    everything on the GPU, then optimizer state to CPU, gradients to CPU, params streamed from CPU, state to NVMe,
    params streamed from NVMe."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Compute device: auto (cuda when available, else cpu) | cpu | cuda.")
    gpu_memory: Union[Literal["auto"], int] = Field(
        "auto", description="Budget of the compute device: auto | bytes | e.g. 20GB (1e9), 20GiB (2**30), 512MiB. "
                            "auto = 90% of the CUDA device's memory; on offload.device cpu, auto = no separate limit "
                            "(the device tier is host memory and counts against cpu_memory).")
    cpu_memory: Union[Literal["auto"], int] = Field(
        "auto", description="Budget of host memory (the process's resident set, runtime included), same syntax. auto "
                            "= 90% of what is available to this run: RAM the OS reports available plus what this "
                            "process already holds.")
    nvme_dir: str | None = Field(
        None, description="Directory on a local NVMe/SSD for the nvme tier (swap files live there during the run).")
    params: Literal["auto", "gpu", "cpu", "nvme"] = Field(
        "auto", description="Where decoder-layer weights live: auto | gpu | cpu | nvme (cpu/nvme: streamed to the "
                            "device block by block, prefetch blocks ahead). Embeddings and head stay on the device.")
    optimizer_state: Literal["auto", "gpu", "cpu", "nvme"] = Field(
        "auto", description="Where optimizer state (and fp32 master weights when it is off the GPU) lives: auto | "
                            "gpu | cpu | nvme. Off the GPU, each block's update runs on the CPU.")
    gradients: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="Where gradients accumulate: auto | gpu | cpu (an fp32 CPU buffer filled block by block "
                            "during backward; needs optimizer_state cpu or nvme). nvme is refused.")
    prefetch: int = Field(1, ge=1, le=8, description="Blocks fetched ahead of the one computing when params stream.")
    staging_chunk: int = Field(
        64 * 2**20, ge=4096,
        description="Full fine-tuning with optimizer_state nvme/cpu and an element-wise optimizer (adamw): the "
                    "largest staging unit of the CPU update, in bytes of fp32 master weights (same syntax as "
                    "cpu_memory; default 64MiB). Larger tensors (embedding, LM head, big MLP weights) are updated "
                    "in chunks of whole rows with their own state, so NVMe staging RAM is about 3 x chunk x "
                    "(masters + state) / masters (AdamW: 3 x 3 x 64MiB = 576MiB) instead of 3 x the largest "
                    "tensor's. GaLore, FRUGAL and SPAM update whole tensors: their floor stays the largest tensor. "
                    "Checkpoints of the offloaded optimizer resume only with the same value.")

    @field_validator("gpu_memory", "cpu_memory", "staging_chunk", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        """``auto`` stays ``auto``; any other size (20GB, 24GiB, 512MiB, bytes) becomes an int of bytes."""
        from slimtune.offload.units import parse_bytes  # pure Python: validate stays free of torch

        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return parse_bytes(value)

    @field_validator("gradients", mode="before")
    @classmethod
    def _no_nvme_gradients(cls, value: Any) -> Any:
        if value == "nvme":
            raise ValueError("nvme is not a place for gradients: they are produced and consumed within one step, so "
                             "a disk round trip only adds I/O (and wears the drive) without lowering the peak; use "
                             "cpu (each block's gradients leave the GPU as backward produces them) or auto")
        return value


# --------------------------------------------------------------------------------------------------- training
class TrainingConfig(Section):
    """The optimisation loop (Hugging Face TrainingArguments names)."""

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Examples per micro-batch.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Examples per eval batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs to train when max_steps is -1.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 = from num_train_epochs.")
    warmup_steps: float = Field(
        0, ge=0, description="Linear warm-up: a step count, or a fraction of the run when < 1 (transformers 5).")
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Alias: warm-up as a fraction of the run (mapped onto warmup_steps).")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Decay after warm-up: linear | cosine | constant | constant_with_warmup.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm; 0 disables clipping.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
    bf16: bool = Field(False, description="bf16 autocast for matmuls (weights keep model.dtype).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    chunked_loss: bool = Field(True, description="LM head + cross-entropy on chunks of the supervised tokens, logits "
                                                 "recomputed in backward (never the whole fp32 logits); the model's "
                                                 "own loss where a trainable head or logit post-processing rules it "
                                                 "out.")
    seed: int = Field(42, ge=0, description="Seed for init, data order, dropout and the eval split.")
    eval_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps; 0 = before and after only.")
    resume_from_checkpoint: Union[bool, str, None] = Field(
        None, description="true = latest checkpoint in output_dir, or a checkpoint path; null/false = new run.")

    @model_validator(mode="after")
    def _warmup_alias(self) -> "TrainingConfig":
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise ValueError("set training.warmup_steps or training.warmup_ratio, not both")
            # transformers 5 removed warmup_ratio: a float < 1 in warmup_steps is a ratio. Store it that way.
            ratio = self.warmup_ratio
            object.__setattr__(self, "warmup_ratio", None)
            object.__setattr__(self, "warmup_steps", ratio)
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ValueError(f"training.warmup_steps {self.warmup_steps} must be a whole step count or a "
                             "fraction < 1")
        return self


# --------------------------------------------------------------------------------------------------- output
class OutputConfig(Section):
    """Where the run writes, and how often."""

    output_dir: str = Field("runs/slimtune", description="Run directory: adapter, checkpoints, metrics, plots. "
                                                          "Relative paths resolve against the working directory.")
    logging_steps: int = Field(10, ge=1, description="Log (progress bar, metrics.jsonl) every N optimizer steps.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every N optimizer steps; 0 = only at the end.")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most N checkpoints (oldest removed).")
    report_to: list[Literal["none", "tensorboard", "wandb"]] = Field(
        default_factory=list, description="Extra loggers: tensorboard, wandb (metrics.jsonl is always written).")
    plots: bool = Field(True, description="Write loss.png and memory.png at the end.")
    overwrite_output_dir: bool = Field(
        False, description="Start a new run in a directory that already holds one (its checkpoints are removed).")


# --------------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    """A complete, validated fine-tuning recipe."""

    model: ModelConfig = Field(..., description="Base model.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Adapter or full fine-tuning.")
    data: DataConfig = Field(..., description="Training and eval data.")
    optimizer: OptimizerConfig = Field(default_factory=AdamWConfig, description="Optimizer, chosen by name.")
    offload: OffloadConfig = Field(default_factory=OffloadConfig, description="Devices and memory tiers.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training loop.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Outputs and checkpoints.")

    @property
    def quantized(self) -> bool:
        """Whether the base model is loaded in 4 bits."""
        return bool(self.model.load_in_4bit) or (self.model.load_in_4bit is None and self.adapter.type == "qlora")

    def to_dict(self) -> dict[str, Any]:
        """Resolved recipe as plain YAML-able data (every default filled in)."""
        return self.model_dump(mode="json")


def combination_problems(recipe: Recipe) -> list[str]:
    """Cross-section checks: combinations that cannot work, each with the reason."""
    problems = []
    a, m, d, t = recipe.adapter, recipe.model, recipe.data, recipe.training
    if a.type == "none" and m.load_in_4bit:
        problems.append("adapter.type none with model.load_in_4bit true: a 4-bit base cannot be fine-tuned in full "
                        "(its weights are frozen integer codes); use adapter.type qlora, or load_in_4bit false")
    if a.type == "qlora" and m.load_in_4bit is False:
        problems.append("adapter.type qlora with model.load_in_4bit false: QLoRA is LoRA on a 4-bit base; use "
                        "adapter.type lora for a 16/32-bit base")
    if a.type == "none" and (a.modules_to_save is not None):
        problems.append("adapter.modules_to_save is only for lora/qlora (full fine-tuning trains every module)")
    problems += _mixlora_problems(a)
    if recipe.quantized and m.dtype == "float16" and m.quantization.compute_dtype == "float16":
        problems.append("model.quantization.compute_dtype float16 is unstable for 4-bit training (QLoRA README); "
                        "use bfloat16 (or float32)")
    if t.eval_steps and not (d.eval_path or d.val_size):
        problems.append(f"training.eval_steps {t.eval_steps} needs eval data: set data.val_size (e.g. 0.05) or "
                        "data.eval_path")
    if d.metric != "none" and not (d.eval_path or d.val_size):
        problems.append(f"data.metric {d.metric} needs eval data: set data.val_size (e.g. 0.05) or data.eval_path")
    if d.streaming:
        if t.max_steps <= 0:
            problems.append("data.streaming needs training.max_steps: a stream's length is unknown until it ends, "
                            "so num_train_epochs cannot size the run (and its learning-rate schedule)")
        if d.sources is not None and d.mix_stop == "all_exhausted":
            problems.append("data.streaming with data.mix_stop all_exhausted: a streamed mixture ends its epoch when "
                            "the first source runs out (first_exhausted); repeating streamed sources is not built")
        if 0 < d.val_size < 1:
            problems.append(f"data.streaming with data.val_size {d.val_size:g}: a fraction of a stream of unknown "
                            "length cannot be split off; give a row count (e.g. 200) or data.eval_path")
    if d.packing and d.metric != "none" and d.format == "text":
        problems.append("data.packing with a task metric needs instruction data")
    if m.architecture is not None and m.architecture.max_position_embeddings < d.max_length:
        problems.append(f"data.max_length {d.max_length} exceeds model.architecture.max_position_embeddings "
                        f"{m.architecture.max_position_embeddings}")
    o = recipe.optimizer
    if getattr(o, "per_layer", False) and t.max_grad_norm > 0:
        problems.append(f"optimizer.per_layer true with training.max_grad_norm {t.max_grad_norm}: a global gradient "
                        "norm needs every gradient at once, and per-layer mode frees each one as soon as it is "
                        "used; set training.max_grad_norm: 0 (SPAM's spike clipping still works per tensor)")
    if o.name == "mezo":
        explicit = t.model_fields_set
        if "max_grad_norm" in explicit and t.max_grad_norm > 0:
            problems.append("training.max_grad_norm with optimizer mezo: zeroth-order training computes no "
                            "gradients to clip; remove the key or set it to 0")
        if t.gradient_checkpointing:
            problems.append("training.gradient_checkpointing with optimizer mezo: there is no backward pass, so "
                            "no activations are kept to checkpoint; set it to false")
    if recipe.offload.device == "cpu" and m.attn_implementation == "flash_attention_2":
        problems.append("model.attn_implementation flash_attention_2 needs CUDA; offload.device is cpu")
    off = recipe.offload
    on_nvme = [f"offload.{k} nvme" for k in ("params", "optimizer_state") if getattr(off, k) == "nvme"]
    if on_nvme and not off.nvme_dir:
        problems.append(f"{' and '.join(on_nvme)} needs offload.nvme_dir: set it to a directory on a local NVMe/SSD "
                        "disk, or choose cpu or auto")
    if o.name == "mezo":
        if off.gradients != "auto":
            problems.append(f"offload.gradients {off.gradients} with optimizer mezo: zeroth-order training computes "
                            "no gradients; remove the key (or set it to auto)")
        if off.optimizer_state not in ("auto", "gpu"):
            problems.append(f"offload.optimizer_state {off.optimizer_state} with optimizer mezo: MeZO keeps no "
                            "per-parameter state (a seed and a few counters); remove the key (or set it to auto)")
    if o.name == "mezo" and a.type == "mixlora" and a.router_aux_loss_coef > 0 and off.params in ("cpu", "nvme"):
        problems.append(ZO_STREAM_MIXLORA.format(params=f"offload.params {off.params}", coef=a.router_aux_loss_coef))
    if a.type == "none" and o.name != "mezo" and off.params in ("cpu", "nvme") and off.optimizer_state == "gpu":
        problems.append(f"offload.params {off.params} with offload.optimizer_state gpu and adapter.type none: streamed "
                        "weights pass through a ring of device slots that the next layer overwrites, so an update "
                        "made on the device would be lost; set offload.optimizer_state to cpu or nvme (the update then "
                        "runs on the CPU and writes each layer's home), or auto, or keep offload.params gpu")
    if off.gradients == "cpu" and off.optimizer_state == "gpu":
        problems.append("offload.gradients cpu with offload.optimizer_state gpu: the update runs where the optimizer "
                        "state lives, so gradients sent to the CPU would have to come back; set optimizer_state to "
                        "cpu or nvme, or gradients to gpu or auto")
    if off.optimizer_state in ("cpu", "nvme") and getattr(o, "per_layer", False):
        problems.append(f"optimizer.per_layer true with offload.optimizer_state {off.optimizer_state}: an offloaded "
                        "update already runs per block as backward produces the gradients; remove optimizer.per_layer "
                        "(or keep the state on the gpu)")
    if off.device == "cpu" and off.gpu_memory != "auto" and off.cpu_memory != "auto" \
            and off.gpu_memory > off.cpu_memory:
        problems.append(f"offload.gpu_memory {off.gpu_memory} exceeds offload.cpu_memory {off.cpu_memory} with "
                        "offload.device cpu: the device tier is host memory there, so it must fit in cpu_memory")
    return problems


ZO_STREAM_MIXLORA = (
    "optimizer mezo with adapter.type mixlora and streamed weights ({params}): zeroth-order streaming runs each "
    "layer on the perturbed chunks one by one and adds no router load-balance loss, so it would train another "
    "objective than in memory (adapter.router_aux_loss_coef {coef}); set adapter.router_aux_loss_coef: 0, or keep "
    "the weights on the device (offload.params gpu)")


def _mixlora_problems(a: AdapterConfig) -> list[str]:
    """MixLoRA settings that cannot work, or that another adapter type would silently ignore."""
    if a.type != "mixlora":
        return [f"adapter.{key} is only used by adapter.type mixlora (adapter.type is {a.type}); remove it"
                for key in MIXLORA_FIELDS if key in a.model_fields_set]
    problems = []
    if a.top_k > a.num_experts:
        problems.append(f"adapter.top_k {a.top_k} exceeds adapter.num_experts {a.num_experts}: each token is routed "
                        "to top_k distinct experts")
    if a.modules_to_save is not None:
        problems.append("adapter.modules_to_save with adapter.type mixlora: the MixLoRA checkpoint format holds "
                        "only LoRA and router weights; remove modules_to_save or use adapter.type lora")
    mlp = MIXLORA_EXPERT_PROJECTIONS + MIXLORA_FUSED_PROJECTIONS[:1] + MIXLORA_PLAIN_PROJECTIONS
    if a.target_modules != "all-linear" and not set(a.target_modules) & set(mlp):
        problems.append(f"adapter.target_modules {list(a.target_modules)} with adapter.type mixlora names no MLP "
                        f"projection, so every expert would be the same frozen FFN; add at least one of "
                        f"{', '.join(mlp)} (gate_up_proj: Phi-3; fc1, fc2: Phi-1/2) (or use all-linear)")
    return problems


def recipe_from_dict(data: dict[str, Any], source: str | None = None, base_dir: str | os.PathLike | None = None
                     ) -> Recipe:
    """Validate a recipe dict; raise RecipeError listing every problem. ``base_dir`` resolves relative data paths."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = dedupe_union_errors(exc.errors())
        problems = [format_error(Recipe, e) for e in errors]
        # Report combination problems too (all errors at once): re-validate without the offending keys.
        reduced = without_keys(Recipe, data, [e["loc"] for e in errors])
        try:
            problems += combination_problems(Recipe.model_validate(reduced))
        except ValidationError:
            pass
        raise RecipeError(problems, source=source) from None
    problems = combination_problems(recipe)
    if problems:
        raise RecipeError(problems, source=source)
    if base_dir is not None:
        _resolve_paths(recipe, Path(base_dir))
    return recipe


def _resolve_paths(recipe: Recipe, base_dir: Path) -> None:
    """Make relative local data/model paths absolute against the recipe's folder (when they exist there)."""
    d = recipe.data
    for owner in [d, *(d.sources or [])]:
        for attr in ("path", "eval_path"):
            value = getattr(owner, attr, None)
            if value and not os.path.isabs(value) and (base_dir / value).exists():
                setattr(owner, attr, str((base_dir / value).resolve()))
    m = recipe.model
    for attr in ("name_or_path", "tokenizer"):
        value = getattr(m, attr)
        if value and not os.path.isabs(value) and value.startswith((".", "~")) and (base_dir / value).exists():
            setattr(m, attr, str((base_dir / value).resolve()))


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Relative data paths resolve against the recipe's folder."""
    data = read_yaml(path)
    try:
        data = apply_overrides(data, list(overrides or []))
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=str(path)) from None
    return recipe_from_dict(data, source=str(path), base_dir=Path(path).resolve().parent)


def recipe_docs() -> str:
    """Every recipe field with its type, default and doc (feeds ``slimtune recipe-docs`` and ``train --help``)."""
    return schema_docs(Recipe)


__all__ = ["Recipe", "RecipeError", "SECTIONS", "apply_overrides", "check_local_files", "combination_problems",
           "load_recipe", "recipe_docs", "recipe_from_dict", "read_yaml"]
