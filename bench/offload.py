"""Offloaded full-parameter training of a model whose params + AdamW state are 3x the CPU budget: the issue-4 bench.

    python bench/offload.py [--quick] [--only NAME ...] [--steps 6] [--warmup 2] [--rounds 1]
                            [--io-read-bytes B --io-write-bytes B] [--cpu-budget B] [--ds-set KEY=VALUE ...]

The model: a Llama built from a config (random init, no download; ``MODELS``: hidden 1024, 16 layers, intermediate
2816, vocab 8192, untied head = 222 M params; ``--quick``: 15 M), random token batches (batch 1, seq ``MODELS``),
bf16 compute, full-parameter AdamW (lr 1e-4, no weight decay, no clipping), activation checkpointing per decoder
layer on (``--no-grad-ckpt`` turns it off for every contender) because the offload engine recomputes each block in
backward; the compute lower bound must do the same work. Contenders, each in its own child process (so peak RSS is
per process and one does not warm another), one after the other, torch threads 2; ``--rounds R`` runs each R times,
every other round in reverse order (ABBA), and takes the median of the runs' medians:

* ``resident``: everything in memory, plain torch: bf16 model, ``torch.optim.AdamW(fused=True)`` on the bf16 params
  (m, v in bf16; no fp32 master: a timing floor, not a numerics reference; fused: 1.0 s per step on 222 M params
  here vs 5.2 s for the default for-loop and 3.5 s for foreach).
* ``resident-master``: everything resident with the offloaded run's math (:func:`run_resident_master`: fp32
  masters + AdamW(fused) state in RAM, bf16 gradients widened, masters cast back). The compute lower bound of the
  same training: ``step / max(resident, io)`` uses it (``resident`` when it is not run), and the notes give the
  ratio against the bf16-only row too. On this 2-core machine the compute is the CPU, so the CPU update of the
  masters is compute the offloaded run cannot hide behind backward, as it can behind a GPU's.
* ``io``: only the NVMe traffic the offloaded run must do per step, through ``slimtune.offload.NvmeStore``
  (O_DIRECT, 2 threads) in the same NVMe directory: ``--io-read-bytes`` read and ``--io-write-bytes`` written per
  step, split into one region per decoder layer, a read chain and a write chain running side by side (each waits
  for its previous block, as a streaming engine would). Default bytes, P = params: read 16 P (bf16 params twice,
  forward and recomputed backward, 2 x 2 P; fp32 master + m + v once, 12 P), write 14 P (master + m + v 12 P,
  updated bf16 params 2 P); gradients are consumed by the CPU update during backward and never reach the disk. The
  lead passes the engine's own counts instead.
* ``deepspeed``: the same training under DeepSpeed ZeRO-3, params and optimizer state on NVMe
  (``bench/offload_deepspeed.py``: bench-only install, settings and why).
* ``slimtune``: the offload engine (:func:`run_slimtune`).
* ``slimtune-8bit``: the same with ``optimizer.state_bits: 8`` (AdamW's moments of every matrix as bitsandbytes'
  blockwise 8-bit codes: 2 bytes of state per value instead of 8, so the masters + state region read and written
  per step shrinks from 12 to 6 bytes per value).
* ``mezo-resident``: in-memory MeZO (``slimtune.optimizers.MeZO``, eps 1e-3, lr 1e-6), two forwards, no backward;
  ``mezo-stream``: slimtune's zeroth-order streaming (:func:`run_mezo_stream`).

Measured in each child: per-step wall time (steps after ``--warmup`` only; median, min-max), peak RSS of the whole
process (VmHWM = ru_maxrss) and from the first step on (peak mark reset via /proc/self/clear_refs), bytes the
process read from / wrote to block storage per timed step (/proc/self/io read_bytes / write_bytes: real disk I/O,
page-cache hits excluded), DeepSpeed's swap files (count, bytes, by params / optimizer), the load average before and
after (other engineers share the 2 cores: noise). The table adds the CPU budget (``--cpu-budget``, default a third of
bf16 params + fp32 master + m + v) and ratios: offloaded step / max(resident, io) (the issue's goal: <= 1.10),
peak RSS / budget (goal <= 1.10), deepspeed / slimtune, mezo-stream / mezo-resident. The machine line names CPU,
cores, RAM, the NVMe directory's device and its bandwidth by ``slimtune.offload.measure_bandwidth``.

Writes bench/results/offload.{md,json,png} (``--quick``: offload-quick.*), and offload-timeline-<name>.png for a
contender that returns a ``timeline`` (events of its last step, see ``offload_report.draw_timeline``; ``io`` does). With
``--only``, rows of the same model from the previous results file are kept and marked with their date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench/offload_deepspeed.py (the DeepSpeed contender), bench/offload_report.py, bench/trainer.py (machine line)
import offload_deepspeed as ds
from offload_report import GB, draw_timeline, plot, ratios, summarize, table
from trainer import machine

LABELS = {"resident": "resident bf16 AdamW (compute only)",
          "resident-master": "resident, fp32 masters (compute only)", "io": "io (NVMe bytes only)",
          "deepspeed": "DeepSpeed ZeRO-3 NVMe",
          "slimtune": "slimtune offload", "slimtune-8bit": "slimtune offload, 8-bit AdamW state",
          "mezo-resident": "MeZO in memory", "mezo-stream": "MeZO streamed"}
# Llama configs. bf16 on this CPU (no AVX512-BF16/AMX) costs per weight more than per token: the default's resident
# step took 17-31 s at seq 32, 64 and 128 alike on the shared 2 cores (load 4-8), so seq is cheap and a smaller
# step needs a smaller model, not fewer tokens.
MODELS = {
    "default": {"hidden_size": 1024, "num_hidden_layers": 16, "intermediate_size": 2816, "vocab_size": 8192,
                "num_attention_heads": 16, "seq": 128},
    "quick": {"hidden_size": 512, "num_hidden_layers": 4, "intermediate_size": 1408, "vocab_size": 2048,
              "num_attention_heads": 8, "seq": 64},
}


# --------------------------------------------------------------------------------------- model, data, measurement
def llama_config(spec: dict):
    from transformers import LlamaConfig

    kw = {k: v for k, v in spec.items() if k != "seq"}
    return LlamaConfig(**kw, num_key_value_heads=kw["num_attention_heads"], max_position_embeddings=spec["seq"],
                       tie_word_embeddings=False, use_cache=False)


def count_params(spec: dict) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(llama_config(spec)).parameters())


def build_model(config, a):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if a.grad_ckpt:
        model.gradient_checkpointing_enable()
    return model


def make_batches(spec: dict, steps: int, seed: int) -> list:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, spec["vocab_size"], (1, spec["seq"]), generator=g) for _ in range(steps)]


def default_io_bytes(n_params: int) -> tuple[int, int]:
    """(read, write) bytes per step of params + AdamW state on NVMe (module docstring): 16 P and 14 P."""
    return 16 * n_params, 14 * n_params


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _proc_io() -> tuple[int, int]:
    fields = dict(x.split(": ") for x in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


class StepMeter:
    """Step times, peak RSS and disk bytes of this process; a contender calls ``start()`` then ``step_done()``."""

    def __init__(self, warmup: int):
        self.warmup, self.ends, self.begin, self.io0, self.reset = warmup, [], None, None, False

    def start(self) -> None:
        self.setup_peak = _status_kib("VmHWM")
        try:  # reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)
            self.reset = Path("/proc/self/clear_refs").write_text("5") == 1
        except OSError:
            self.reset = False
        self.begin = time.perf_counter()
        if self.warmup == 0:
            self.io0 = _proc_io()

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup:
            self.io0 = _proc_io()

    def result(self) -> dict:
        if self.begin is None:
            raise RuntimeError("the contender never called meter.start()")
        timed = len(self.ends) - self.warmup
        steps = [b - a for a, b in zip([self.begin] + self.ends, self.ends)]
        r, w = (_proc_io()[i] - self.io0[i] for i in (0, 1)) if timed > 0 else (0, 0)
        hwm = _status_kib("VmHWM")
        return {"step_s": steps, "timed_steps": timed, "peak_rss_bytes": max(self.setup_peak, hwm),
                "steps_peak_rss_bytes": hwm if self.reset else None,
                "disk_read_per_step": r / timed if timed > 0 else None,
                "disk_write_per_step": w / timed if timed > 0 else None}


# --------------------------------------------------------------------------------------- contenders (child processes)
def run_resident(a, config, batches, meter) -> dict:
    import torch

    model = build_model(config, a).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, fused=True)  # 5x the for-loop here
    losses = []
    meter.start()
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        meter.step_done()
    return {"losses": losses}


def run_resident_master(a, config, batches, meter) -> dict:
    """Everything resident with the offloaded run's math: bf16 model, fp32 master copies, AdamW(fused) on the
    masters over the widened bf16 gradients, masters cast back into the model (mixed-precision training as
    Megatron / DeepSpeed's bf16 optimizer do it). The compute-only step of the same training."""
    import torch

    model = build_model(config, a).train()
    params = list(model.parameters())
    masters = [p.detach().float().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(masters, lr=a.lr, weight_decay=0.0, fused=True)
    losses = []
    meter.start()
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        with torch.no_grad():
            for p, m in zip(params, masters):
                m.grad, p.grad = p.grad.float(), None
            opt.step()
            opt.zero_grad(set_to_none=True)
            for p, m in zip(params, masters):
                p.copy_(m)
        losses.append(float(loss))
        meter.step_done()
    return {"losses": losses}


def run_io(a, config, batches, meter) -> dict:
    from slimtune.offload import NvmeStore
    from slimtune.offload.store.nvme import aligned_empty

    blocks, align = config.num_hidden_layers, 4096
    read_b, write_b = (-(-n // blocks // align) * align for n in (a.io_read_bytes, a.io_write_bytes))
    with tempfile.TemporaryDirectory(prefix="io-", dir=a.nvme_dir) as d, \
            NvmeStore(d, capacity_bytes=blocks * (read_b + write_b), direct=None, threads=2) as store:
        rbuf, wbuf = aligned_empty(read_b).fill_(0x5A), aligned_empty(write_b).fill_(0xA5)
        for i in range(blocks):  # the regions the reads will fetch, written (and on disk) before timing
            store.write(("r", i), rbuf).result()
        os.fsync(store.fd)
        events: list = []

        def chain(kind: str, t0: float) -> None:
            for i in range(blocks):
                s = time.perf_counter()
                (store.read(("r", i), rbuf) if kind == "read" else store.write(("w", i), wbuf)).result()
                events.append((f"nvme {kind}", s - t0, time.perf_counter() - t0, f"{i}"))

        meter.start()
        for _ in batches:
            events.clear()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=chain, args=(k, t0)) for k in ("read", "write")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            meter.step_done()
        return {"timeline": list(events), "o_direct": store.direct, "bytes_read": store.bytes_read,
                "bytes_written": store.bytes_written, "block_read_bytes": read_b, "block_write_bytes": write_b}


def run_deepspeed(a, config, batches, meter) -> dict:
    return ds.run(a, config, batches, meter)


def _engine(model, a, nvme: str, optimizer_state: bool, state_bits: int = 32):
    """slimtune's offload engine on ``model`` (what `slimtune train` builds from offload.params/optimizer_state:
    nvme): decoder layers streamed from NVMe, fp32 masters + AdamW state on NVMe updated on the CPU."""
    import torch

    from slimtune.finetune.offloading import OffloadEngine, offloaded_updates
    from slimtune.offload.stream.streamer import BlockStreamer
    from slimtune.optimizers import build_optimizer

    off = OffloadEngine(model, torch.device("cpu"))
    if optimizer_state:
        adamw = lambda nm: build_optimizer("adamw", nm, lr=a.lr, weight_decay=0.0, per_layer=True,  # noqa: E731
                                           state_bits=state_bits)
        off.updates, off.update_blocks = offloaded_updates(model, adamw, "nvme", nvme, overlap=True)
    off.streamer = BlockStreamer(model, "nvme", "cpu", prefetch=1, nvme_dir=nvme, stream_trainable=True,
                                 writeback=not optimizer_state)
    if off.updates is not None:
        off.updates.on_updated = off.on_updated
    return off


def _last_step_timeline(off, t_step: float) -> list:
    """The last step's events on one clock: compute and fetch lanes from the streamer, update/NVMe lanes from the
    offloaded optimizer."""
    s = off.streamer
    events = [(lane, a + s.t0 - t_step, b + s.t0 - t_step, label) for lane, a, b, label in s.timeline
              if a + s.t0 >= t_step]
    if off.updates is not None:
        events += list(off.updates.last_step.get("timeline", []))  # relative to its step start (= t_step)
    return sorted(events, key=lambda e: e[1])


def run_slimtune(a, config, batches, meter, state_bits: int = 32) -> dict:
    """Full-parameter AdamW, params + fp32 masters + state on NVMe, updates on the CPU overlapped with backward."""
    nvme = tempfile.mkdtemp(prefix="slimtune-", dir=a.nvme_dir)
    model = build_model(config, a).train()
    off = _engine(model, a, nvme, optimizer_state=True, state_bits=state_bits)
    losses, t_step = [], 0.0
    meter.start()
    for x in batches:
        t_step = time.perf_counter()
        off.begin_micro_batch(final=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        off.step(0.0)  # waits for the block updates still running, drops stale prefetches
        losses.append(float(loss))
        meter.step_done()
    counters = off.counters()
    timeline = _last_step_timeline(off, t_step)
    off.close()
    n = len(batches)
    return {"losses": losses, "timeline": timeline, "nvme_read_per_step": counters.get("nvme_read_bytes", 0) / n,
            "nvme_write_per_step": counters.get("nvme_write_bytes", 0) / n}


def run_slimtune_8bit(a, config, batches, meter) -> dict:
    return run_slimtune(a, config, batches, meter, state_bits=8)


def run_mezo_resident(a, config, batches, meter) -> dict:
    from slimtune.optimizers import MeZO
    from slimtune.optimizers.zeroth_order import mezo_param_groups

    model = build_model(config, a).eval()  # deterministic closure; no backward, so checkpointing is moot
    opt = MeZO(mezo_param_groups(model.named_parameters(), 0.0), lr=a.mezo_lr, eps=1e-3)
    losses = []
    meter.start()
    for x in batches:
        losses.append(float(opt.step(lambda x=x: model(input_ids=x, labels=x).loss)))
        meter.step_done()
    return {"losses": losses}


def run_mezo_stream(a, config, batches, meter) -> dict:
    """Zeroth-order streaming: every layer streamed from NVMe, loaded once per step, both perturbed forwards on it,
    its update applied when it is next resident (offload/stream/zo_stream.py). Same model, data, lr and eps as
    in memory."""
    from slimtune.offload.stream.zo_stream import ZOStream
    from slimtune.optimizers import MeZO
    from slimtune.optimizers.zeroth_order import mezo_param_groups

    nvme = tempfile.mkdtemp(prefix="slimtune-zo-", dir=a.nvme_dir)
    model = build_model(config, a).eval()
    opt = MeZO(mezo_param_groups(model.named_parameters(), 0.0), lr=a.mezo_lr, eps=1e-3, noise="per_tensor")
    off = _engine(model, a, nvme, optimizer_state=False)
    zo = ZOStream(model, opt, off.streamer)
    losses, t_step = [], 0.0
    meter.start()
    for x in batches:
        t_step = time.perf_counter()
        losses.append(float(zo.step({"input_ids": x, "labels": x})))
        meter.step_done()
    timeline = _last_step_timeline(off, t_step)  # fetches, write-backs, each layer's 2n perturbed forwards
    zo.flush()
    zo.detach()
    off.close()
    return {"losses": losses, "timeline": timeline}


CONTENDERS = {"resident": run_resident, "resident-master": run_resident_master, "io": run_io,
              "deepspeed": run_deepspeed, "slimtune": run_slimtune, "slimtune-8bit": run_slimtune_8bit,
              "mezo-resident": run_mezo_resident, "mezo-stream": run_mezo_stream}
assert list(CONTENDERS) == list(LABELS)


def child(name: str, a, json_path: str) -> None:
    import torch

    torch.set_num_threads(a.threads)
    spec = a.model  # MODELS entry with --seq applied (main)
    meter = StepMeter(a.warmup)
    try:
        out = CONTENDERS[name](a, llama_config(spec), make_batches(spec, a.steps, a.seed), meter)
        out.update(meter.result(), status="ok")
    except NotImplementedError as e:
        out = {"status": f"not implemented: {e}"}
    Path(json_path).write_text(json.dumps(out))


# --------------------------------------------------------------------------------------- report (parent process)
def disk_line(directory: str) -> str:
    from slimtune.offload import measure_bandwidth

    r = subprocess.run(["df", "--output=source,fstype", directory], capture_output=True, text=True, check=False)
    dev = " ".join(r.stdout.split()[2:4]) if r.returncode == 0 else "?"
    read, write = measure_bandwidth(directory)
    return (f"NVMe dir {directory} on {dev}: NvmeStore (O_DIRECT, 2 threads, 256 MiB) read {read:.2f} GB/s, "
            f"write {write:.2f} GB/s")


def run_child(name: str, a, env: dict, tmp: str) -> dict:
    """One contender in its own process, killed (with its process group) after ``a.timeout`` seconds."""
    path, log = Path(tmp) / f"{name}.json", Path(tmp) / f"{name}.log"
    cmd = [sys.executable, __file__, "--child", name, "--child-args", json.dumps(vars(a)), "--json", str(path)]
    load0, t0 = os.getloadavg()[0], time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            rc = None
    info = {"load_before": load0, "load_after": os.getloadavg()[0], "wall_s": time.time() - t0,
            "measured_at": time.strftime("%Y-%m-%d %H:%M", time.localtime(t0))}
    tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-12:]
    if rc is None:
        return {**info, "status": f"timed out after {a.timeout:.0f} s (--timeout)", "log_tail": tail}
    if rc != 0 or not path.exists():
        err = next((x for x in reversed(tail) if "Error" in x or "error" in x), tail[-1] if tail else "")
        return {**info, "status": f"failed (exit {rc}): {err.strip()[:300]}", "log_tail": tail}
    return {**info, **json.loads(path.read_text())}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model (MODELS['quick']), for trying the bench")
    ap.add_argument("--only", nargs="+", choices=list(LABELS), metavar="NAME", help=f"run these: {', '.join(LABELS)}")
    ap.add_argument("--seq", type=int, help="sequence length (default: the model's in MODELS)")
    ap.add_argument("--steps", type=int, default=6, help="steps per contender, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the step-time statistics")
    ap.add_argument("--rounds", type=int, default=1, help="runs per contender, every other round in reverse order")
    ap.add_argument("--io-read-bytes", type=float, help="bytes read from NVMe per step for the io row (default 16 P)")
    ap.add_argument("--io-write-bytes", type=float, help="bytes written per step for the io row (default 14 P)")
    ap.add_argument("--cpu-budget", type=float, help="CPU memory budget in bytes (default (2 + 12) P / 3)")
    ap.add_argument("--nvme-dir", default="/tmp", help="a temp dir is made (and removed) under it for swap files")
    ap.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a DeepSpeed config key, e.g. zero_optimization.sub_group_size=1e8")
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="no activation checkpointing")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--mezo-lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per child")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per contender before it is killed")
    ap.add_argument("--build-timeout", type=float, default=1800, help="seconds for DeepSpeed's one-time op build")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", choices=list(LABELS), help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, argparse.Namespace(**json.loads(a.child_args)), a.json)
    if not 0 <= a.warmup < a.steps:
        ap.error(f"--warmup must be >= 0 and below --steps ({a.steps}), got {a.warmup}")
    if a.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {a.rounds}")
    if not os.path.isdir(a.nvme_dir):
        ap.error(f"--nvme-dir {a.nvme_dir} is not a directory")
    spec = a.model = {**MODELS["quick" if a.quick else "default"], **({"seq": a.seq} if a.seq else {})}
    n_params = count_params(spec)
    read_b, write_b = default_io_bytes(n_params)
    a.io_read_bytes, a.io_write_bytes = int(a.io_read_bytes or read_b), int(a.io_write_bytes or write_b)
    a.cpu_budget = int(a.cpu_budget or 14 * n_params / 3)
    names = [n for n in LABELS if not a.only or n in a.only]
    stem = "offload-quick" if a.quick else "offload"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    order = [n for r in range(a.rounds) for n in (names if r % 2 == 0 else names[::-1])]  # ABBA: drift evens out
    runs: dict = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="slimtune-bench-offload-", dir=a.nvme_dir) as root:
        a.nvme_dir = root
        host = f"{machine()}; {disk_line(root)}"
        print(host, file=sys.stderr)
        ds_why = ds.prepare(env, a.build_timeout) if "deepspeed" in names else None
        for i, name in enumerate(order):
            if name == "deepspeed" and ds_why:
                runs[name].append({"status": f"skipped: {ds_why}"})
            else:
                print(f"run {i + 1}/{len(order)}: {name}, {a.steps} steps ...", file=sys.stderr, flush=True)
                runs[name].append(run_child(name, a, ds.child_env(env) if name == "deepspeed" else env, root))
            r = runs[name][-1]
            print(f"  {name}: {r['status']}" + (f", median step {statistics.median(r['step_s'][a.warmup:]):.2f} s, "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB" if r["status"] == "ok" else ""), file=sys.stderr)
    rows = {n: summarize(rs, a.cpu_budget) for n, rs in runs.items()}
    earlier = {}
    if a.only and (out / f"{stem}.json").exists():  # keep the other rows of an earlier run of the same setup
        old = json.loads((out / f"{stem}.json").read_text())
        if old.get("model") == spec and old.get("grad_ckpt") == a.grad_ckpt:
            earlier = {n: r for n, r in old["rows"].items() if n not in rows}
    rows = {n: (rows.get(n) or earlier[n]) for n in LABELS if n in rows or n in earlier}
    rat = ratios(rows)
    timed = a.steps - a.warmup
    header = (
        f"## Offloaded full-parameter training: Llama {spec['num_hidden_layers']} layers, hidden "
        f"{spec['hidden_size']}, intermediate {spec['intermediate_size']}, vocab {spec['vocab_size']} "
        f"({n_params / 1e6:.1f} M params), batch 1 x seq {spec['seq']}, bf16, AdamW lr {a.lr:g}, activation "
        f"checkpointing {'on' if a.grad_ckpt else 'off'}\n\nMachine: {host}\n\n"
        f"{a.steps} steps per run, first {a.warmup} left out ({timed} timed), {a.rounds} run(s) per contender (every "
        f"other round in reverse order), each run in its own process, torch "
        f"threads {a.threads}. CPU budget {a.cpu_budget / 2**30:.2f} GiB (params bf16 + fp32 master + m + v = "
        f"{14 * n_params / 2**30:.2f} GiB, i.e. {14 * n_params / a.cpu_budget:.1f}x the budget). io row: "
        f"{a.io_read_bytes / GB:.2f} GB read + {a.io_write_bytes / GB:.2f} GB written per step. Disk bytes: "
        f"/proc/self/io of the child. Wall-clock on a shared 2-core machine: load averages per row show the noise.")
    text = table(rows, rat, header, LABELS)
    print(text)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(
        {"machine": host, "model": spec, "params": n_params, "grad_ckpt": a.grad_ckpt, "args": vars(a),
         "ratios": rat, "rows": rows}, indent=2) + "\n")
    plot(rows, a.cpu_budget, f"{stem}: {n_params / 1e6:.0f} M params, seq {spec['seq']} — {host}", LABELS,
         out / f"{stem}.png")
    for n, r in rows.items():
        if r.get("timeline") and n in names:
            draw_timeline(r["timeline"], out / f"{stem}-timeline-{n}.png", f"{LABELS[n]}: last timed step")
    print(f"wrote {out / stem}.{{md,json,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
