"""slimtune.offload: where tensors live and when they move (GPU, CPU, NVMe).

Today: memory probes per tier, used by the trainer's reporting. The planner, stores, scheduler and hooks of the
offload engine land here (see DESIGN.md).
"""

from .memory import current_rss_bytes, format_bytes, memory_snapshot, peak_gpu_bytes, peak_rss_bytes
from .nvme import NvmeStore, measure_bandwidth

__all__ = [
    "NvmeStore",
    "current_rss_bytes",
    "format_bytes",
    "measure_bandwidth",
    "memory_snapshot",
    "peak_gpu_bytes",
    "peak_rss_bytes",
]
