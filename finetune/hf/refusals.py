"""What several processes (or FSDP) cannot run, refused before training with the reason."""

from __future__ import annotations

from ..errors import RecipeError
from ..recipe import Recipe

FSDP_REFUSED = ("TrainingArguments.fsdp: SlimtuneTrainer does not shard parameters across processes yet (its "
                "optimizers work on whole tensors: GaLore's and FRUGAL's projections need a matrix, not a shard; and "
                "accelerate runs CPU processes as plain DDP whatever fsdp says); use DDP (no fsdp), or the offload "
                "engine in one process to go past GPU memory")
PER_LAYER_UNDER_PROCESSES = ("optimizer.per_layer: a per-layer update runs inside backward, on this process's "
                             "gradient, before DDP has averaged it over the processes; train per-layer in one process")
OFFLOAD_UNDER_PROCESSES = ("offload (streamed layers, offloaded optimizer state): the offload engine runs in one "
                           "process; use one process, or offload.params and offload.optimizer_state gpu with DDP")


def problems_under_processes(recipe: Recipe) -> list[str]:
    """What a recipe asks for that several processes cannot run (checked before they start)."""
    problems = []
    if getattr(recipe.optimizer, "per_layer", False):
        problems.append(PER_LAYER_UNDER_PROCESSES)
    if recipe.offload.params in ("cpu", "nvme") or recipe.offload.optimizer_state in ("cpu", "nvme"):
        problems.append(OFFLOAD_UNDER_PROCESSES)
    return problems


def refuse_under_processes(engine, per_layer: bool) -> None:
    """The same refusal for an engine already built (an ``auto`` placement may have chosen to offload)."""
    problems = []
    if per_layer or getattr(engine, "per_layer", None) is not None:
        problems.append(PER_LAYER_UNDER_PROCESSES)
    if getattr(engine, "streamer", None) is not None or getattr(engine, "updates", None) is not None:
        problems.append(OFFLOAD_UNDER_PROCESSES)
    if problems:
        raise RecipeError(problems)
