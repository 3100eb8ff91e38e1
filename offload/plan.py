"""The offload plan: where each block's params, gradients and optimizer state live, what that costs per tier and
per link, and how fast a step can possibly be. Plain data, printable (``slimtune plan``) and testable.

Semantics the engine follows (``offload/stream/streamer.py``, ``offload/updates/state_swapper.py``;
docs/offload-design.md):

* **params** ``gpu``: resident on the compute device. ``cpu`` / ``nvme``: each decoder layer's base weights live in
  one flat aligned region there (:attr:`BlockSize.stream_bytes`) and stream into a ring of :func:`ring_slots` device
  slots, each the size of the largest layer; 4-bit quant state and adapter weights stay resident. Forward visits
  layers 0..L-1, backward L-1..0 with per-block recompute, so a layer is fetched twice per micro-batch (design
  rule 9), and once per MeZO step (ZO2: every perturbed forward runs while the block is resident). ``embed``
  and ``head`` always stay on the device. NVMe reads land in the device slot on a CPU device, and go through
  as many pinned staging buffers on CUDA.
* **LoRA / QLoRA**: adapter weights, gradients and optimizer state stay on the device under ``auto`` (they are
  tiny, rule 11); explicit placements are honoured.
* **Offloaded update** (``optimizer_state`` cpu/nvme, update on the CPU): gradients leave the device block by block
  (``gradients`` cpu: into CPU buffers: the whole model's in fp32 when accumulation or global clipping needs every
  gradient, else three blocks' worth in the params' dtype: the engine makes backward wait while two blocks' updates
  are in flight; ``gradients`` gpu: accumulated on the device and sent down once per step). fp32 masters + state
  live in ``optimizer_state``'s tier as one region per update unit (a run of a block's tensors of at most the
  largest tensor's size, ``offloaded_blocks.staging_groups``; for element-wise optimizers at most
  ``offload.staging_chunk``, larger tensors as row chunks, ``staging_units``; ``align64(masters) + state``,
  :func:`.state_layout.planned_block_bytes`; on NVMe each region 4 KiB aligned, staged through 3 CPU buffers of the
  largest region: read ahead, update, write behind), and updated params go back to their home.
* **MeZO**: no gradients, no state; streamed full-parameter weights are written back once per step.
* **auto** tries, in order, and keeps the first plan that fits: everything on the device; optimizer state (+masters)
  to CPU; gradients to CPU; params streamed from CPU; state to NVMe; params from NVMe (full fine-tuning). With a
  frozen base (adapters, MeZO) only params move: device, CPU, NVMe. Explicit placements are honoured and checked.

**Budgets** (bytes): ``gpu`` bounds the device tier (CUDA: ``offload.gpu_memory``, auto = 90% of the card; CPU
device: only an explicit value, since the device tier is host memory); ``cpu`` bounds host memory, i.e. the
process's resident set: the cpu tier plus, on a CPU device, the device tier, plus the process's own baseline
(``runtime_bytes``: its RSS when planning, unless given; kept out of the tiers so that they compare item by item with
the engine's own accounting); ``nvme`` is the free space in ``offload.nvme_dir``.

**Step-time lower bound** (perfect overlap): the largest of compute
(FLOPs ~ 6·P·T full fine-tuning, 8·P·T with recompute; 4·P·T / 6·P·T over a frozen base; 4·P·T per MeZO sample) over
a measured matmul rate, host<->device bytes over the measured copy bandwidth (full duplex on CUDA; one memory bus on
CPU), NVMe reads + writes over the measured drive bandwidth (one drive), and the CPU update's memory traffic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import OffloadError
from .plan_inputs import PlanRequest
from .plan_messages import plan_notes, refusal
from .plan_phases import phases, ring_slots
from .units import format_size

if TYPE_CHECKING:
    from .plan_inputs import BlockSize

TIERS = ("gpu", "cpu", "nvme")
LINKS = ("cpu->gpu", "gpu->cpu", "nvme->cpu", "cpu->nvme")
CATEGORIES = ("params", "adapter", "grads", "state", "master", "activations", "buffers")
BANDWIDTH_KEYS = LINKS + ("memcpy", "flops")
AUTO_FRACTION = 0.9    # auto budgets leave 10% head room (allocator fragmentation, CUDA context, the OS)
STATE_STAGING = 3      # CPU staging buffers of the NVMe state ring (state_swapper: workers + 2, one worker)
NVME_ALIGN = 4096
FULL_ORDER = (("gpu", "gpu", "gpu"), ("gpu", "gpu", "cpu"), ("gpu", "cpu", "cpu"), ("cpu", "cpu", "cpu"),
              ("cpu", "cpu", "nvme"), ("nvme", "cpu", "nvme"))  # (params, gradients, optimizer_state)
FROZEN_ORDER = (("gpu", "gpu", "gpu"), ("cpu", "gpu", "gpu"), ("nvme", "gpu", "gpu"))

class PlanError(OffloadError):
    """A configuration that cannot fit: the message has the numbers and a suggestion; ``plan`` is the closest try."""

    def __init__(self, message: str, plan: Plan | None = None):
        super().__init__(message)
        self.plan = plan


@dataclass
class BlockPlan:
    """One block's placement. Tiers: gpu | cpu | nvme; ``update_on``: gpu, or cpu when the state is off the GPU."""

    name: str
    param_bytes: int
    trainable_bytes: int
    grad_bytes: int
    state_bytes: int
    master_bytes: int
    params_tier: str
    grads_tier: str
    state_tier: str
    update_on: str


@dataclass
class Plan:
    """Placement of every block, predicted peak bytes per tier (``breakdown`` item by item), bytes per link per
    optimizer step, and the step-time lower bound with its terms."""

    blocks: list[BlockPlan]
    device: str
    budgets: dict[str, int | None]
    prefetch: int
    peak_bytes: dict[str, int]
    link_bytes: dict[str, int]
    bandwidths: dict[str, float]
    step_time_lower_bound_s: float
    notes: list[str]
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    step_terms: dict[str, float] = field(default_factory=dict)
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    checkpointing: bool = False
    source: str = ""
    runtime_bytes: int = 0  # the process's own baseline (python, torch, data), outside every tier
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # load/save: peak host and device bytes

    def phase_host_bytes(self) -> dict[str, int]:
        """Predicted peak resident memory per phase of the run: ``load`` (the base read layer by layer into its
        homes), ``train`` (:attr:`host_bytes`) and ``save`` (a full model written shard by shard)."""
        return {"load": self.phases.get("load", {}).get("host", 0), "train": self.host_bytes,
                "save": self.phases.get("save", {}).get("host", 0)}

    @property
    def host_bytes(self) -> int:
        """Predicted peak resident memory of the process while it trains: the cpu tier, the device tier on a CPU
        device, and the runtime baseline. ``offload.cpu_memory`` bounds this and every other phase
        (:meth:`phase_host_bytes`)."""
        return self.peak_bytes["cpu"] + (self.peak_bytes["gpu"] if self.device == "cpu" else 0) + self.runtime_bytes

    @property
    def run_host_bytes(self) -> int:
        """The whole run's predicted peak resident memory: the largest phase."""
        return max(self.phase_host_bytes().values())

    def problems(self) -> list[tuple[str, int, int]]:
        """(tier, needed, budget) for each budget this plan exceeds ("host" = the cpu_memory check)."""
        out = []
        gpu, cpu, nvme = (self.budgets.get(t) for t in TIERS)
        if gpu is not None and self.peak_bytes["gpu"] > gpu:
            out.append(("gpu", self.peak_bytes["gpu"], gpu))
        if cpu is not None and self.run_host_bytes > cpu:
            out.append(("cpu", self.run_host_bytes, cpu))
        if self.peak_bytes["nvme"] and (nvme is None or self.peak_bytes["nvme"] > nvme):
            out.append(("nvme", self.peak_bytes["nvme"], nvme or 0))
        return out

    def table(self) -> str:
        """Per-block placement, tier peaks vs budgets, bytes per link and the step-time bound, as text."""
        from .plan_report import table

        return table(self)

    def plot(self, path) -> str:
        """Stacked bars per tier (params, grads, state, activations, buffers, ...) against each budget, as a PNG."""
        from .plan_report import plot

        return plot(self, path)


# ------------------------------------------------------------------------------------------------- entry point
def make_plan(request: PlanRequest, sizes: list[BlockSize], bandwidths: dict[str, float] | None = None,
              runtime_bytes: int | None = None) -> Plan:
    """Plan a run: placement per block, peaks per tier, link bytes, step-time bound.

    ``request``: the placements, budgets and training facts (:class:`~.plan_inputs.PlanRequest`). ``sizes``: the
    model's blocks (the trainer sizes a recipe's on meta tensors). ``bandwidths``: any of
    ``cpu->gpu``, ``gpu->cpu``, ``nvme->cpu``, ``cpu->nvme``, ``memcpy`` (bytes/s) and ``flops`` (FLOP/s); the rest
    are measured (in well under a second each). ``runtime_bytes``: the process's baseline host memory, counted
    against ``offload.cpu_memory`` (default: its RSS now, right for a process that has not loaded the weights yet; a
    caller that already holds them passes the RSS it had before). Raises :class:`PlanError` when nothing fits.
    """
    bandwidths = dict(bandwidths or {})
    unknown = sorted(set(bandwidths) - set(BANDWIDTH_KEYS))
    if unknown or any(not v > 0 for v in bandwidths.values()):
        raise ValueError(f"bandwidths: keys must be among {', '.join(BANDWIDTH_KEYS)} with values > 0 (bytes/s, "
                         f"FLOP/s); got {bandwidths}")
    tokens = request.tokens_per_step
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens_per_step must be an int >= 1, got {tokens!r}")
    if runtime_bytes is not None and (not isinstance(runtime_bytes, int) or runtime_bytes < 0):
        raise ValueError(f"runtime_bytes must be an int >= 0, got {runtime_bytes!r}")
    if len(sizes) < 3 or sizes[0].name != "embed" or sizes[-1].name != "head":
        raise ValueError("sizes must list the blocks embed, layers.0 .. layers.{L-1}, head (see block_sizes)")
    device = _device(request.device)
    notes = list(getattr(sizes, "notes", []))
    if request.nvme_dir:
        _check_nvme_dir(request.nvme_dir)
    budgets = _budgets(request, device, notes)
    runtime = _rss() if runtime_bytes is None else runtime_bytes
    tried = []
    for placement in _candidates(request):
        plan = _evaluate(request, sizes, placement, device, budgets, runtime, tokens)
        if not plan.problems():
            break
        tried.append(plan)
    else:
        closest = min(tried, key=lambda p: max(need / max(budget, 1) for _, need, budget in p.problems()))
        closest.notes, closest.source = notes, getattr(sizes, "source", "")
        raise PlanError(refusal(request, closest, len(tried)), closest)
    plan.notes = notes + plan_notes(request, plan)
    plan.source = getattr(sizes, "source", "")
    _bound(request, plan, sizes, bandwidths)
    return plan


# ------------------------------------------------------------------------------------------------- placement
def _candidates(off: PlanRequest) -> list[tuple[str, str, str]]:
    """Placements to try, fastest first: the auto order with explicit settings substituted (duplicates dropped)."""
    out = []
    for p, g, s in FROZEN_ORDER if off.frozen_base else FULL_ORDER:
        p = p if off.params == "auto" else off.params
        g = g if off.gradients == "auto" else off.gradients
        s = s if off.optimizer_state == "auto" else off.optimizer_state
        if g == "cpu" and s == "gpu":
            s = "cpu"  # the update runs where the state is (an explicit gpu + cpu pair is a recipe error)
        if not off.frozen_base and p != "gpu" and s == "gpu":
            s = "cpu"  # streamed weights live in ring slots: their update must write the home, so it runs on the CPU
        if not off.frozen_base and s != "gpu":
            g = "cpu"  # the offloaded optimizer's hooks move every gradient to the CPU as backward produces it
        if "nvme" in (p, s) and not off.nvme_dir:
            continue
        if (p, g, s) not in out:
            out.append((p, g, s))
    return out


def _evaluate(off: PlanRequest, sizes, placement, device, budgets, runtime, tokens) -> Plan:
    """Bytes per tier and per link of one placement (the step-time bound is filled in by :func:`_bound`)."""
    from .updates.state_layout import align_up, planned_block_bytes

    p_tier, g_tier, s_tier = placement
    zo, full = off.zeroth_order, off.full
    ga, n_samples = off.gradient_accumulation_steps, off.n_samples
    update_on = "gpu" if s_tier == "gpu" else "cpu"
    streamed = p_tier != "gpu"
    ckpt = not zo and (off.gradient_checkpointing or streamed)
    bd = {tier: dict.fromkeys(CATEGORIES, 0) for tier in TIERS}
    links = dict.fromkeys(LINKS, 0)
    blocks, regions = [], []
    for i, b in enumerate(sizes):
        pt = p_tier if 0 < i < len(sizes) - 1 else "gpu"
        trains = b.trainable_count > 0
        master = b.master_bytes if update_on == "cpu" and trains else 0
        state = b.state_bytes if update_on == "gpu" else b.state_bytes_fp32
        blocks.append(BlockPlan(b.name, b.param_bytes, b.trainable_bytes, 0 if zo else b.grad_bytes, state, master,
                                pt, g_tier, s_tier, update_on))
        if pt == "gpu":
            bd["gpu"]["params"] += b.param_bytes
        else:
            bd["gpu"]["params"] += b.quant_state_bytes
            bd[pt]["params"] += b.stream_bytes
        bd["gpu"]["adapter"] += b.adapter_bytes
        if s_tier == "gpu":
            bd["gpu"]["state"] += state
        elif trains:  # per staging unit (BlockSize.units: staging_groups / row chunks): a region each, staged alone
            for count, unit_state in b.units or ((b.trainable_count, b.state_bytes_fp32),):
                region = planned_block_bytes(4 * count, [unit_state])
                region = align_up(region, NVME_ALIGN) if s_tier == "nvme" else region
                regions.append(region)
                bd[s_tier]["master"] += align_up(4 * count, 64)
                bd[s_tier]["state"] += region - align_up(4 * count, 64)
    layers = sizes[1:-1]
    stream_total = sum(b.stream_bytes for b in layers)
    trainable = [b for b in sizes if b.trainable_count]
    # gradients
    freed = 0  # CPU gradient bytes a projector-refresh step does not hold (see below)
    if not zo and trainable:
        grads = [b.grad_bytes for b in trainable]
        per_layer = off.per_layer and ga == 1  # each gradient freed by its own update
        if g_tier == "gpu":
            bd["gpu"]["grads"] += max(grads) if per_layer else sum(grads)
        else:  # one being produced; on CUDA one more still being copied out on the mover's stream
            bd["gpu"]["grads"] += (2 if device == "cuda" else 1) * max(grads)
        if update_on == "cpu":
            fp32 = [4 * b.trainable_count for b in trainable]
            # Accumulation / a global norm keep every block's gradients (fp32 sums); otherwise a unit holds its
            # buffer (in the params' dtype: one gradient, nothing to sum) until its CPU update has run, and the
            # engine bounds that: backward waits while two blocks' updates are in flight, so the block being
            # produced + 2 pending blocks.
            whole = g_tier == "cpu" and (ga > 1 or off.max_grad_norm > 0)
            narrow = ga == 1 and off.max_grad_norm == 0
            held = grads if narrow else fp32
            # CPU buffers are freed after their update: the block being filled + the two pending, consecutive in
            # backward; pinned ones (CUDA) stay pooled, the largest three
            three = (max(sum(held[i:i + 3]) for i in range(max(1, len(held) - 2))) if device == "cpu"
                     else 3 * max(held))
            bd["cpu"]["grads"] += sum(fp32) if whole else three
            # a step that refreshes a projector runs its updates one at a time (backward waits for each: the
            # engine's _backpressure), so its SVD scratch meets one block of gradients, not three
            freed = 0 if whole else three - max(held)
            links["gpu->cpu"] += sum(grads) * (ga if g_tier == "cpu" else 1)
            # updated params that live on the device go back up: adapters, and resident base weights
            links["cpu->gpu"] += sum(b.trainable_bytes for b, bp in zip(sizes, blocks)
                                     if b.trainable_count and (not full or bp.params_tier == "gpu"))
    # buffers
    if streamed and layers:
        slot = max(b.stream_bytes for b in layers)
        ring = ring_slots(off.prefetch, writeback=full and zo)
        bd["gpu"]["buffers"] += ring * slot
        if p_tier == "nvme" and device == "cuda":
            bd["cpu"]["buffers"] += ring * slot  # pinned staging between NVMe and the card
        if p_tier == "nvme" and full and s_tier in ("cpu", "nvme"):
            # updated weights staged for their NVMe home: one layer's buffer, filled by its units and written once
            # complete (HomeAccess.write_home); the one update worker finishes a layer's units before the next's
            bd["cpu"]["buffers"] += slot
    if regions and s_tier == "nvme":
        bd["cpu"]["buffers"] += STATE_STAGING * max(regions)
        # a unit's first update allocates its state in RAM before it is packed into the region (one worker)
        bd["cpu"]["buffers"] += max(st for b in sizes for _, st in b.units or ((0, b.state_bytes_fp32),))
        links["nvme->cpu"] += sum(regions)
        links["cpu->nvme"] += sum(regions)
    if trainable and not zo:  # an update's own temporaries (GaLore's SVD refresh) beyond what that step frees
        scratch = max(b.scratch_bytes_fp32 if update_on == "cpu" else b.scratch_bytes for b in trainable)
        bd[update_on]["buffers"] += max(0, scratch - freed)
    if zo:  # MeZO's z: one tensor's in memory; a whole block's when streamed (zo_stream draws it once per block)
        bd["gpu"]["buffers"] += max(b.trainable_bytes if streamed else b.largest_param_bytes for b in sizes)
    bd["gpu"]["activations"] = _activation_bytes(sizes, zo, ckpt, 2 * n_samples if zo and streamed else 0)
    # streaming traffic
    fetches = (1 if zo else 2) * ga  # MeZO streamed: every perturbed forward of a block runs while it is resident
    if p_tier == "cpu":
        links["cpu->gpu"] += fetches * stream_total
    elif p_tier == "nvme":
        links["nvme->cpu"] += fetches * stream_total
        if device == "cuda":
            links["cpu->gpu"] += fetches * stream_total
    if full and streamed:  # the streamed weights themselves change: back to their home once per step
        if update_on == "gpu" and (device == "cuda" or p_tier == "cpu"):
            links["gpu->cpu"] += stream_total
        if p_tier == "nvme":
            links["cpu->nvme"] += stream_total
    peaks = {tier: sum(bd[tier].values()) for tier in TIERS}
    plan = Plan(blocks, device, dict(budgets), off.prefetch, peaks, links, {}, 0.0, [], bd, {}, tokens, 0.0, ckpt,
                runtime_bytes=runtime)
    plan.phases = phases(off, sizes, plan, bd, streamed)
    plan.flops_per_step = _flops(sizes, tokens, zo, full, ckpt, n_samples)
    return plan


def _activation_bytes(sizes, zo: bool, ckpt: bool, chunks: int = 0) -> int:
    """Peak activation bytes of one micro-batch (formulas: the trainer's sizing module, ``finetune/sizing.py``).

    MeZO keeps nothing for backward: one block's intermediates at a time, bounded by what that block would save. A
    streamed MeZO step (``offload/stream/zo_stream.py``) runs the batch repeated ``chunks`` = 2 x n_samples times
    through each resident block, so the hidden states of every chunk go in and come out of the block being computed.
    """
    layers = sizes[1:-1]
    largest = max(b.act_largest_bytes for b in sizes)
    if zo:
        hidden = min((b.act_input_bytes for b in layers if b.act_input_bytes), default=0)  # the residual stream
        return max(b.act_saved_bytes for b in sizes) + 2 * chunks * hidden
    if not ckpt:
        return sum(b.act_saved_bytes for b in sizes) + largest
    return (sizes[0].act_saved_bytes + sizes[-1].act_saved_bytes + sum(b.act_input_bytes for b in layers)
            + max((b.act_saved_bytes for b in layers), default=0) + largest)


def _flops(sizes, tokens: int, zo: bool, full: bool, ckpt: bool, n_samples: int) -> float:
    p = sum(b.matmul_params for b in sizes)
    if zo:
        return 4.0 * p * tokens * n_samples  # two forwards per sample
    if full:
        return (8.0 if ckpt else 6.0) * p * tokens
    return (6.0 if ckpt else 4.0) * p * tokens


# ------------------------------------------------------------------------------------------------- budgets
def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PlanError("offload.device is 'cuda' but CUDA is not available on this machine; use offload.device "
                        "cpu or auto")
    return name


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _budgets(off: PlanRequest, device: str, notes: list[str]) -> dict[str, int | None]:
    import psutil

    gpu = off.gpu_memory
    if gpu == "auto":
        if device == "cuda":
            import torch

            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            gpu = int(AUTO_FRACTION * total)
            notes.append(f"offload.gpu_memory auto = 90% of the card's {format_size(total)}")
        else:
            gpu = None
    cpu = off.cpu_memory
    if cpu == "auto":
        available, rss = psutil.virtual_memory().available, _rss()
        cpu = int(AUTO_FRACTION * (available + rss))
        notes.append(f"offload.cpu_memory auto = 90% of {format_size(available)} available + "
                     f"{format_size(rss)} this process holds")
    nvme = None
    if off.nvme_dir:
        st = os.statvfs(off.nvme_dir)
        nvme = st.f_bavail * st.f_frsize
    return {"gpu": gpu, "cpu": cpu, "nvme": nvme}


def _check_nvme_dir(path: str) -> None:
    """Missing or unwritable ``offload.nvme_dir``: refuse before anything else (same rules as NvmeStore)."""
    d = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(d):
        what = "is not a directory" if os.path.exists(d) else "does not exist"
        raise PlanError(f"offload.nvme_dir: {d} {what}; set offload.nvme_dir to an existing writable directory on a "
                        "local NVMe/SSD disk")
    if not os.access(d, os.W_OK | os.X_OK):
        raise PlanError(f"offload.nvme_dir: {d} is not writable by this user; set offload.nvme_dir to a directory "
                        "you can write to")


# ------------------------------------------------------------------------------------------------- step time
def _bound(request: PlanRequest, plan: Plan, sizes, given: dict[str, float]) -> None:
    """Fill ``bandwidths``, ``step_terms`` and ``step_time_lower_bound_s`` (measuring what was not given)."""
    bw, links = dict(given), plan.link_bytes
    import torch

    device = torch.device(plan.device)
    if "flops" not in bw:
        from .measure import matmul_flops

        bw["flops"] = matmul_flops(device, getattr(torch, request.compute_dtype))
    update_cpu = plan.blocks[0].update_on == "cpu" and any(b.trainable_bytes for b in plan.blocks)
    if any(links[k] and k not in bw for k in ("cpu->gpu", "gpu->cpu")) or (update_cpu and "memcpy" not in bw):
        from .measure import copy_bandwidth

        for k, v in copy_bandwidth(device).items():
            bw.setdefault(k, v)
    if (links["nvme->cpu"] or links["cpu->nvme"]) and not ("nvme->cpu" in bw and "cpu->nvme" in bw):
        from .store.nvme import measure_bandwidth

        read, write = measure_bandwidth(request.nvme_dir, nbytes=64 << 20)
        bw.setdefault("nvme->cpu", read * 1e9)
        bw.setdefault("cpu->nvme", write * 1e9)
    terms = {"compute": plan.flops_per_step / bw["flops"]}
    h2d, d2h = (links["cpu->gpu"] / bw["cpu->gpu"] if links["cpu->gpu"] else 0.0,
                links["gpu->cpu"] / bw["gpu->cpu"] if links["gpu->cpu"] else 0.0)
    if h2d or d2h:
        terms["gpu<->cpu"] = max(h2d, d2h) if plan.device == "cuda" else h2d + d2h  # PCIe is full duplex
    if links["nvme->cpu"] or links["cpu->nvme"]:
        terms["nvme"] = links["nvme->cpu"] / bw["nvme->cpu"] + links["cpu->nvme"] / bw["cpu->nvme"]
    if update_cpu:
        # memory-bound: read masters, fp32 gradients (master-sized) and state; write masters, state and the
        # params in their own dtype (~28 B per parameter for fp32 Adam)
        touched = sum(3 * b.master_bytes + 2 * b.state_bytes + b.trainable_bytes
                      for b in plan.blocks if b.trainable_bytes)
        terms["cpu update"] = touched / bw["memcpy"]
    plan.bandwidths, plan.step_terms = bw, terms
    plan.step_time_lower_bound_s = max(terms.values())
