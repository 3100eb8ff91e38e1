"""Parameter groups shared by every optimizer: which parameters decay.

Rule (nanoGPT's ``configure_optimizers``, HF Trainer's ``get_decay_parameter_names``): matrices decay; biases,
norm weights and other 1-D tensors do not. Every trainable parameter lands in exactly one group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

NO_DECAY_NAME_PARTS = ("bias", "norm", "ln_", "layernorm")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies to this parameter (2-D or more, and not named like a bias or a norm)."""
    lowered = name.lower()
    return param.dim() >= 2 and not any(part in lowered for part in NO_DECAY_NAME_PARTS)


def decay_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decay group and a no-decay group (empty groups dropped)."""
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# Never projected or given sparse state, whatever target_modules says (every official script keeps them on AdamW).
# moe_gate: MixLoRA's router (num_experts x hidden): a projection of rank >= num_experts saves nothing, and GaLore's
# scale would silently shrink its learning rate; it stays on AdamW like the other small non-target weights.
NEVER_TARGET = ("embed", "lm_head", "wte", "wpe", "moe_gate")


def split_targets(named_params: Iterable[tuple[str, torch.nn.Parameter]], target_modules: Iterable[str]
                  ) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """(targets, rest) among trainable parameters: targets are 2-D weights whose name contains one of
    ``target_modules`` (GaLore/FRUGAL/SPAM scripts: "attn", "mlp"), never embeddings or the LM head."""
    keys = tuple(target_modules)
    targets, rest = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lowered = name.lower()
        is_target = (param.dim() == 2 and any(k in name for k in keys)
                     and not any(n in lowered for n in NEVER_TARGET) and not lowered.endswith("bias"))
        (targets if is_target else rest).append((name, param))
    return targets, rest
