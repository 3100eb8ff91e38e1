"""DeepSpeed ZeRO-3 with parameters and optimizer state on NVMe: the peer contender of ``bench/offload.py``.

DeepSpeed is installed for the bench only, never into the project's environment or dependencies:
``pip install --target bench/.deps/deepspeed deepspeed==0.19.8`` plus the requirements of its ``requirements.txt``
that the project does not already install (einops, hjson, msgpack, ninja, py-cpuinfo), ``--no-deps`` and
``--no-build-isolation`` (its sdist's setup.py imports torch; an isolated build would fetch a second, CUDA torch).
Only the DeepSpeed child process sees it (``PYTHONPATH``), with ``DS_ACCELERATOR=cpu`` and
``TORCH_EXTENSIONS_DIR=bench/.deps/torch_extensions``, so the JIT build of ``cpu_adam`` and ``async_io`` (minutes,
measured here: first init 68-217 s) happens once and is reused. ``async_io`` needs libaio's headers; as
root with apt the bench installs ``libaio-dev`` when they are missing, and says so.

Settings (DeepSpeed's ZeRO-Infinity docs; a competent configuration, not DeepSpeed's defaults, which fail here):

* ``offload_param`` and ``offload_optimizer`` on ``device: nvme``, one ``nvme_path`` (a temp dir), single rank,
  gloo, bf16, ``AdamW`` config -> ``DeepSpeedCPUAdam`` (adamw_mode), no gradient clipping;
* ``stage3_max_reuse_distance: 0``: the default 1e9 keeps swapped-in params resident until the 5 param swap buffers
  are all held and step 1 dies with ``Not enough buffers 0 for swapping 1`` (DeepSpeed#3062);
* ``sub_group_size: 1e7``: the optimizer swapper allocates ``buffer_count`` x the largest sub-group in fp32; at the
  default 1e9 that is the whole model 4 times over (measured: 1.4 GB for 88 M params);
* ``offload_param.max_in_cpu: 0``: its default (1e9 elements) makes ZeRO-3 swap every trainable param partition
  "permanently to CPU" at init when the model is smaller than that (``stage3.py`` ``_move_to_flat_buffer``), so
  the parameters would not be on NVMe at all (read in DeepSpeed 0.19.8's source; checked by the swap files);
* ``offload_param.buffer_size``: the largest parameter (every NVMe param must fit one buffer); the default 1e8
  elements x 5 buffers is 1 GB of RAM whatever the model;
* ``reduce_bucket_size``: one decoder layer's elements (gradients leave per layer, like the engine's per-block
  hand-off); the default 5e8 elements is a bf16 bucket as large as this whole model, and the measured peak RSS on
  the 222 M model fell from 4080 to 2730 MiB at 2e7 with the same step time and losses (one run each);
* ``aio.intra_op_parallelism: 2``: two I/O threads, as slimtune's NvmeStore uses; other aio settings default.

Any key can be overridden from the command line (``--ds-set zero_optimization.sub_group_size=1e8``).
Tensors under 1 MiB stay in RAM (DeepSpeed's ``MIN_AIO_BYTES``), as do params under
``stage3_param_persistence_threshold`` (1e5 elements): the norms. On the CPU accelerator "device" memory is host
memory, so the child's RSS is everything DeepSpeed holds.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

DEEPSPEED_PIN = "0.19.8"
# deepspeed 0.19.8 requirements.txt: einops hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic torch tqdm;
# numpy, packaging, psutil, pydantic, torch and tqdm come with the project.
DS_REQUIRES = ("einops", "hjson", "msgpack", "ninja", "py-cpuinfo")
DEPS = Path(__file__).resolve().parent / ".deps"
TARGET = DEPS / "deepspeed"
EXTENSIONS = DEPS / "torch_extensions"
MARKER = TARGET / f".installed-deepspeed-{DEEPSPEED_PIN}"
OPS = ("CPUAdamBuilder", "AsyncIOBuilder")


def say(msg: str) -> None:
    print(f"[deepspeed] {msg}", file=sys.stderr, flush=True)


def ensure_installed() -> str | None:
    """Install the pinned DeepSpeed into bench/.deps/deepspeed once (idempotent); None when ready, else why not."""
    if MARKER.exists():
        return None
    missing = [d for d in DS_REQUIRES if not _installed(d)]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(TARGET), "--no-deps",
           "--no-build-isolation", f"deepspeed=={DEEPSPEED_PIN}", *missing]
    say(f"first use: installing deepspeed {DEEPSPEED_PIN} (+ {', '.join(missing) or 'nothing else'}) into {TARGET} "
        "for this bench only (not the project environment) ...")
    if TARGET.exists():
        shutil.rmtree(TARGET)  # a half-finished earlier install
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"pip install of deepspeed=={DEEPSPEED_PIN} failed: {_tail(r.stderr or r.stdout)}"
    MARKER.write_text(" ".join(cmd) + "\n")
    return None


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def ensure_libaio() -> str | None:
    """libaio headers for DeepSpeed's async_io op; installs libaio-dev with apt when root. None when present."""
    if Path("/usr/include/libaio.h").exists():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "libaio.h not found and cannot apt-get install libaio-dev here (not root or no apt); install it"
    say("libaio.h missing (DeepSpeed's async_io op needs it): apt-get install -y libaio-dev ...")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "libaio-dev"]):
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {_tail(r.stderr or r.stdout)}"
    return None if Path("/usr/include/libaio.h").exists() else "libaio-dev installed but /usr/include/libaio.h absent"


def child_env(env: dict) -> dict:
    """The environment of a DeepSpeed child: the bench-only install on the path, CPU accelerator, cached JIT ops."""
    with socket.socket() as s:  # a free port for the single-rank gloo group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(TARGET), env.get("PYTHONPATH")])),
            "PATH": os.pathsep.join([str(TARGET / "bin"), env.get("PATH", "")]), "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(EXTENSIONS), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}


def prepare(env: dict, timeout: float) -> str | None:
    """Install (once), check libaio, JIT-build cpu_adam and async_io (once, cached); None when ready, else why not."""
    why = ensure_installed() or ensure_libaio()
    if why:
        return why
    code = ("from deepspeed.accelerator import get_accelerator as g\n"
            f"for name in {OPS!r}:\n"
            "    b = g().create_op_builder(name)\n"
            "    assert b.is_compatible(verbose=True), name + ' is not compatible here'\n"
            "    b.load(verbose=False)\n")
    built = EXTENSIONS.exists() and any(EXTENSIONS.rglob("*.so"))
    say("loading cpu_adam and async_io" + ("" if built else f" (first run: JIT build into {EXTENSIONS}, minutes)"))
    try:
        r = subprocess.run([sys.executable, "-c", code], env=child_env(env), capture_output=True, text=True,
                           timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"building DeepSpeed's ops took over {timeout:.0f} s (--build-timeout)"
    return None if r.returncode == 0 else f"DeepSpeed op build/load failed: {_tail(r.stderr or r.stdout)}"


def ds_config(nvme_path: str, largest_param: int, layer_numel: int, lr: float, overrides: list[str]) -> dict:
    """The ZeRO-3 NVMe configuration above; ``overrides`` are ``dotted.key=value`` strings (value parsed as JSON)."""
    cfg = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
        "steps_per_print": 10**9, "wall_clock_breakdown": False, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3, "sub_group_size": int(1e7), "stage3_max_reuse_distance": 0,
            "reduce_bucket_size": int(layer_numel),
            "offload_param": {"device": "nvme", "nvme_path": nvme_path, "max_in_cpu": 0,
                              "buffer_size": int(largest_param), "buffer_count": 5},
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme_path},
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 2, "single_submit": False,
                "overlap_events": True},
    }
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--ds-set expects dotted.key=value (e.g. zero_optimization.sub_group_size=1e8), "
                             f"got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, *path = key.split(".")
        parent = cfg
        for part in [node, *path][:-1]:
            parent = parent.setdefault(part, {})
        parent[key.split(".")[-1]] = int(value) if isinstance(value, float) and value.is_integer() else value
    return cfg


def swap_files(nvme_path: str) -> dict:
    """Swap files DeepSpeed keeps under ``nvme_path``, by kind (params / optimizer / other): count and bytes."""
    out: dict[str, dict[str, int]] = {}
    for f in Path(nvme_path).rglob("*.swp"):
        kind = "optimizer" if "optimizer" in f.parts else "params" if any("params" in p for p in f.parts) else "other"
        d = out.setdefault(kind, {"files": 0, "bytes": 0})
        d["files"] += 1
        d["bytes"] += f.stat().st_size
    return out


def run(a, config, batches, meter) -> dict:
    """The child: ZeRO-3 NVMe training of ``config`` (a LlamaConfig) on ``batches``; ``meter`` times the steps."""
    import tempfile

    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    h, i = config.hidden_size, config.intermediate_size
    largest, layer = max(config.vocab_size * h, h * i, h * h), 4 * h * h + 3 * h * i + 2 * h  # q k v o, MLP, norms
    with tempfile.TemporaryDirectory(prefix="ds-nvme-", dir=a.nvme_dir) as nvme:
        cfg = ds_config(nvme, largest, layer, a.lr, a.ds_set)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        keep = HfDeepSpeedConfig(cfg)  # noqa: F841  (alive while the model is built: HF then builds under zero.Init)
        torch.manual_seed(a.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if a.grad_ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        files_at_init = swap_files(nvme)
        meter.start()
        losses = []
        for x in batches:
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
            meter.step_done()
        out = {"losses": losses, "swap_files_at_init": files_at_init, "swap_files": swap_files(nvme),
               "ds_config": {k: v for k, v in cfg.items() if k != "optimizer"}, "deepspeed": deepspeed.__version__}
        engine.destroy()  # releases the swappers' buffers and aio handles before the swap folder is removed
        return out


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(x.strip() for x in text.strip().splitlines()[-lines:])
