"""slimtune.offload: where tensors live and when they move (GPU, CPU, NVMe).

Memory probes per tier (used by the trainer's reporting), the NVMe store, and the planner (``make_plan``: where
each block's params, grads and optimizer state live, predicted peaks per tier, a step-time bound). The engine:
``BlockStreamer`` (layers streamed
from CPU/NVMe homes), ``OffloadedUpdates`` (gradients out, CPU/NVMe optimizer state), ``ZOStream`` (MeZO, one
fetch per block per step). To export a name, add it to ``_EXPORTS``.
"""

import importlib

# Public name -> submodule, imported on first access (PEP 562). Lazy because the recipe schema validates sizes with
# ``offload.units.parse_bytes`` and ``slimtune validate`` must not import torch (which every other submodule does).
_EXPORTS = {
    "NvmeStore": "store.nvme",
    "measure_bandwidth": "store.nvme",
    "current_rss_bytes": "store.memory",
    "format_bytes": "units",
    "memory_snapshot": "store.memory",
    "peak_gpu_bytes": "store.memory",
    "peak_rss_bytes": "store.memory",
    "parse_bytes": "units",
    "BlockSize": "plan_inputs",
    "ModelSizes": "plan_inputs",
    "PlanRequest": "plan_inputs",
    "BlockPlan": "plan",
    "Plan": "plan",
    "PlanError": "plan",
    "make_plan": "plan",
    "release_free_memory": "store.memory",
    "BlockStreamer": "stream.streamer",
    "OffloadedUpdates": "updates.offloaded_updates",
    "ZOStream": "stream.zo_stream",
    "model_blocks": "blocks",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
