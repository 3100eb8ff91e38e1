"""The recipe's ``optimizer`` section: one schema per method, chosen by ``optimizer.name``.

Each method validates only its own fields (``optimizer.rank`` under ``name: adamw`` is an unknown key with the
list of adamw's keys), with the official code's defaults unless noted. Learning rate, weight decay and the LR
schedule live in ``training`` for every method.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from .recipe_base import Section

# GaLore/FRUGAL/SPAM official scripts: nn.Linear weights in modules whose name contains "attn" or "mlp".
DEFAULT_TARGETS = ["attn", "mlp"]

_PER_LAYER = ("Fuse the update into backward (register_post_accumulate_grad_hook): each gradient is used and "
              "freed as soon as it is complete, so full gradients never coexist. Needs training.max_grad_norm 0 "
              "(a global norm needs every gradient at once).")
_TARGETS = ("Substrings of parameter names whose 2-D weights get the method's treatment (projection, sparse "
            "momentum); the rest (embeddings, norms, lm_head, biases) get plain AdamW state, as in the official "
            "scripts. With LoRA, these match the LoRA matrices of those modules.")


class _AdamLike(Section):
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (beta1, beta2).")
    per_layer: bool = Field(False, description=_PER_LAYER)

    @model_validator(mode="after")
    def _betas(self) -> "_AdamLike":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas {list(self.betas)} must each be in [0, 1)")
        return self


class AdamWConfig(_AdamLike):
    """torch.optim.AdamW (decoupled weight decay, Loshchilov & Hutter 2019)."""

    name: Literal["adamw"] = Field("adamw", description="Optimizer (registry: slimtune.optimizers.OPTIMIZERS).")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon (torch placement: sqrt(v_hat) + eps).")
    state_bits: Literal[32, 8] = Field(32, description="Moments of the weight matrices in 32 or 8 bits "
                                                       "(bitsandbytes' blockwise 8-bit Adam; vectors stay 32-bit).")


class GaLoreConfig(_AdamLike):
    """GaLore: AdamW in a low-rank projection of each target gradient (Zhao et al. 2024, arXiv 2403.03507)."""

    name: Literal["galore"] = Field("galore", description="Optimizer (registry key).")
    eps: float = Field(1e-6, gt=0, description="Adam epsilon (GaLore's placement: sqrt(v) + eps).")
    rank: int = Field(128, ge=1, description="Rank of the projection (the paper's r).")
    update_proj_gap: int = Field(200, ge=1, description="Steps between SVD refreshes of the projector.")
    scale: float = Field(0.25, gt=0, description="Scale of the projected update (the paper's alpha).")
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = Field(
        "std", description="Projection side: std (by gradient shape), reverse_std, left, right, full.")
    state_bits: Literal[32, 8] = Field(32, description="Low-rank moments in 32 or 8 bits (blockwise).")
    svd_method: Literal["full", "randomized"] = Field(
        "full", description="Projector refresh: full (the official SVD) or randomized (Halko et al. 2011: "
                            "O(mn(rank + 10)), its error in README).")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), description=_TARGETS)


class FrugalConfig(_AdamLike):
    """FRUGAL: AdamW on a subspace, a state-free rule on the rest (Zmushko et al. 2024, arXiv 2411.07837)."""

    name: Literal["frugal"] = Field("frugal", description="Optimizer (registry key).")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon (torch placement).")
    proj_type: Literal["svd", "random", "columns", "rows", "randk", "blockwise"] = Field(
        "columns", description="State-full subspace: svd | random | columns (the fine-tuning scripts' choice) | "
                               "rows | randk | blockwise (the pre-training scripts' choice).")
    density: float = Field(0.25, ge=0.0, le=1.0, description="Fraction kept state-full (rank, columns or tensors).")
    update_gap: int = Field(200, ge=1, description="Steps between subspace refreshes.")
    reset_statistics: bool = Field(True, description="Zero the moments (and their step) at each refresh.")
    inactive_update_rule: Literal["sign_sgd", "sgd", "none"] = Field(
        "sign_sgd", description="State-free rule for the residual outside the subspace.")
    inactive_lr_scale: float = Field(1.0, ge=0.0, description="LR multiplier of the state-free rule "
                                                               "(fine-tuning scripts: 0.1).")
    proj_params_lr_scale: float = Field(1.0, gt=0.0, description="LR multiplier of projected parameters.")
    block_order: Literal["random", "ascending", "descending", "mirror"] = Field(
        "random", description="blockwise: which tensors become active at each refresh.")
    svd_method: Literal["full", "randomized"] = Field(
        "full", description="proj_type svd: full SVD (the author code) or randomized (as GaLore's option).")
    state_bits: Literal[32, 8] = Field(32, description="AdamW moments of the matrices in 32 or 8 bits (blockwise).")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), description=_TARGETS)


class SpamConfig(_AdamLike):
    """SPAM: spike-aware clipping + periodic momentum reset (Huang et al. 2025, arXiv 2501.06842)."""

    name: Literal["spam"] = Field("spam", description="Optimizer (registry key).")
    eps: float = Field(1e-6, gt=0, description="Adam epsilon (SPAM's placement: sqrt(v) + eps).")
    threshold: float = Field(5000.0, ge=0.0, description="Spike threshold theta: g^2 > theta * v is clipped; 0 off.")
    delta_t: int = Field(500, ge=1, description="Momentum reset period (the official DeltaT).")
    warmup_steps: int = Field(150, ge=0, description="Cosine warm-up after each momentum reset (the official "
                                                     "warmup_epoch; NOT training.warmup_steps, see the docstring).")
    grad_accu_steps: int = Field(20, ge=0, description="Steps after each reset before spike clipping resumes.")
    density: float | None = Field(None, gt=0.0, le=1.0, description="Sparse momentum on target_modules weights: "
                                                                    "fraction of coordinates kept; null = dense.")
    state_bits: Literal[32, 8] = Field(32, description="Moments of the matrices in 32 or 8 bits (blockwise).")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), description=_TARGETS)


class MeZOConfig(Section):
    """MeZO: zeroth-order SPSA, two forwards and no backward per step (Malladi et al. 2023, arXiv 2305.17333)."""

    name: Literal["mezo"] = Field("mezo", description="Optimizer (registry key).")
    eps: float = Field(1e-3, gt=0, description="Perturbation scale epsilon of the SPSA estimate.")
    n_samples: int = Field(1, ge=1, description="Random directions averaged per step (n-SPSA).")
    noise: Literal["sequential", "per_tensor"] = Field(
        "sequential", description="Noise stream: sequential (the official code's z for a seed) | per_tensor (each "
                                  "tensor's z from its own seed; needed by zeroth-order block streaming).")


def _name_of(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("name", "adamw")
    return getattr(value, "name", "adamw")


# Adding an optimizer: its section above, and its class here (the name comes from its ``name`` field).
OPTIMIZER_SECTIONS = (AdamWConfig, GaLoreConfig, FrugalConfig, SpamConfig, MeZOConfig)
NAMES = tuple(section.model_fields["name"].default for section in OPTIMIZER_SECTIONS)

OptimizerConfig = Annotated[
    Union[tuple(Annotated[section, Tag(name)] for section, name in zip(OPTIMIZER_SECTIONS, NAMES))],
    Discriminator(_name_of, custom_error_type="invalid_optimizer",
                  custom_error_message=f"optimizer.name must be one of {', '.join(NAMES)}"),
]
