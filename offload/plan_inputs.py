"""What the planner (:mod:`.plan`) takes: plain values, no recipe.

* :class:`BlockSize` / :class:`ModelSizes`: the byte sizes of a model's blocks (``embed``, ``layers.0`` ..
  ``layers.{L-1}``, ``head``), measured by whoever owns the model (the trainer sizes a recipe's model on meta tensors);
* :class:`PlanRequest`: the placements and budgets asked for, and the few facts about the training that change how
  many bytes a placement needs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockSize:
    """Bytes of one block (for one micro-batch where activations are concerned). Plain data."""

    name: str
    param_count: int          # logical values of the block's base parameters (a 4-bit weight counts n, not n/2)
    param_bytes: int          # base parameters as stored (model.dtype; 4-bit: packed codes + quant state)
    stream_bytes: int         # what streams when the block is offloaded: blocks.flat_layout of the base parameters
    quant_state_bytes: int    # 4-bit quant state inside param_bytes (resident on the device even when streamed)
    adapter_bytes: int        # parameters the adapter adds (LoRA A/B, modules_to_save copies); 0 for adapter none
    trainable_count: int      # values the optimizer updates (adapter params, or every base param for adapter none)
    trainable_bytes: int      # ... in their dtype; gradients have the same size
    state_bytes: int          # optimizer state over the trainable params as they are (the in-memory update)
    state_bytes_fp32: int     # optimizer state over fp32 master copies (the offloaded update)
    largest_param_bytes: int  # largest single trainable tensor (MeZO's transient z)
    matmul_params: int        # weights used in matmuls (for FLOPs; the embedding lookup is not one)
    act_saved_bytes: int      # what autograd saves in this block for one micro-batch (no checkpointing)
    act_input_bytes: int      # what a checkpointed block keeps: its inputs (tensors shared with earlier blocks: 0)
    act_largest_bytes: int    # largest single saved storage in the block
    tokens: int               # tokens in the micro-batch the activation numbers are for
    units: tuple[tuple[int, int], ...] = ()  # (values, fp32-master state bytes) per offloaded-update staging unit
    largest_count: int = 0    # values of the block's largest base tensor (what a streamed load reads at once)
    scratch_bytes: int = 0    # largest temporary one update allocates beyond its state (GaLore's SVD refresh) ...
    scratch_bytes_fp32: int = 0  # ... and the same over fp32 masters (the offloaded update)

    @property
    def grad_bytes(self) -> int:
        """Gradients have their parameter's dtype and shape."""
        return self.trainable_bytes

    @property
    def master_bytes(self) -> int:
        """fp32 copy of the trainable parameters that an update off the compute device works on."""
        return 4 * self.trainable_count

    @property
    def act_saved_per_token(self) -> float:
        return self.act_saved_bytes / max(self.tokens, 1)

    @property
    def act_input_per_token(self) -> float:
        return self.act_input_bytes / max(self.tokens, 1)


class ModelSizes(list):
    """``list[BlockSize]`` in execution order, plus ``notes`` (assumptions the numbers rest on) and ``source``."""

    def __init__(self, blocks, notes=(), source: str = ""):
        super().__init__(blocks)
        self.notes, self.source = list(notes), source


@dataclass(frozen=True)
class PlanRequest:
    """The run to plan, as plain values. Tiers are ``auto`` | ``gpu`` | ``cpu`` | ``nvme``; budgets are bytes or
    ``auto``. Messages name the recipe keys these come from (``offload.*``, ``training.*``)."""

    tokens_per_step: int                  # tokens in the micro-batches of one optimizer step (full rows)
    device: str = "auto"                  # auto | cpu | cuda
    gpu_memory: int | str = "auto"
    cpu_memory: int | str = "auto"
    nvme_dir: str | None = None
    params: str = "auto"
    gradients: str = "auto"
    optimizer_state: str = "auto"
    prefetch: int = 1
    full: bool = False                    # every base weight trains (no adapter)
    zeroth_order: bool = False            # forward-only training (MeZO): no gradients, no activations kept
    n_samples: int = 1                    # zeroth-order perturbation samples per step
    per_layer: bool = False               # updates fused into backward: each gradient freed by its own update
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0
    gradient_checkpointing: bool = False
    compute_dtype: str = "float32"        # dtype of the matmuls (for the FLOP-rate measurement)
    lora_on_full_precision: bool = False  # a refusal may suggest a 4-bit base
    value_bytes: int = 2                  # bytes per value of the model's dtype (model.dtype) as loaded
    checkpoint_value_bytes: int = 4       # ... as stored in the checkpoint (config.json's dtype; fp32 if unknown)

    @property
    def frozen_base(self) -> bool:
        """The base weights get no gradient (an adapter trains, or zeroth-order training)."""
        return not self.full or self.zeroth_order
