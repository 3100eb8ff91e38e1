"""Make bitsandbytes' 4-bit matmul safe to stream: keep its weight as a *saved tensor*.

bitsandbytes' ``MatMul4Bit.forward`` keeps the packed weight for backward as a plain attribute (``ctx.tensors = (None,
B)``, bitsandbytes 0.50 ``autograd/_functions.py``), not through ``ctx.save_for_backward``. Activation checkpointing
only re-creates saved tensors, so in backward bnb reads the weight view it kept from the *forward* pass. When that
layer's weights were streamed into a ring slot that has since been reused for another layer, the backward silently
multiplies by the wrong weights (measured: QLoRA losses diverge from the in-memory run at step 2). The subclass below
saves ``B`` with ``save_for_backward``, so the recompute binds the freshly fetched weight; the math is bnb's own.
It is installed only around a streamed layer's compute (:func:`streamable_4bit`).

:func:`keep_training_layout` switches off bnb's CPU inference repacking (see there): a model that is trained, evaluated
and trained again keeps one weight layout and one kernel.

**No kernel download at import.** On a CPU with AVX512-BF16, ``import bitsandbytes`` (which ``import peft`` does)
asks the ``kernels`` package for ``kernels-community/quantization-bitsandbytes`` from the Hugging Face Hub
(bitsandbytes 0.50 ``backends/cpu/ops.py``): a network lookup of code at every process start, and a warning
("Failed to load CPU gemm_4bit_forward from kernels-community: ...") whenever it is not allowed or not reachable.
That kernel only serves bnb's inference repack, which :func:`keep_training_layout` turns off, so slimtune never runs
it. :func:`import_bitsandbytes` imports bitsandbytes with huggingface_hub's offline switch
(``huggingface_hub.constants.HF_HUB_OFFLINE``, the one ``HF_HUB_OFFLINE=1`` sets) on for the import alone: a kernel
already in the local cache still loads, nothing is fetched, and the fallback's warning is not shown. Every slimtune
module that imports peft or bitsandbytes imports this module first.

**Eager CPU kernels.** bitsandbytes 0.50 wraps its default (CPU) 4-bit dequantize in ``torch.compile`` when it is
imported (``backends/default/ops.py: _try_torch_compile``). The first training step then compiles it with inductor
per weight shape, and the process keeps inductor's code and caches: measured +1.0 GB of RSS on a 37-layer QLoRA run
streamed from NVMe (2.2 GB instead of 1.17 GB at a 2 GB budget, bench/scale.py), memory no offload plan can budget,
for a 30% faster CPU step. :func:`import_bitsandbytes` imports bitsandbytes with TorchDynamo disabled for the import
alone (``torch._dynamo.config.disable``, what ``TORCHDYNAMO_DISABLE=1`` sets), so its decorators return the plain
functions; a user's own ``torch.compile`` is unaffected. On CUDA bitsandbytes runs its CUDA kernels either way.
"""

from __future__ import annotations

import contextlib
import logging
import sys


def import_bitsandbytes():
    """``bitsandbytes.autograd._functions`` (None without a working bitsandbytes), imported without the kernel hub."""
    if "bitsandbytes" in sys.modules:  # imported before slimtune (by the user's code): nothing left to guard
        return _functions_or_none()
    try:
        from huggingface_hub import constants as hub
    except Exception:  # pragma: no cover - huggingface_hub comes with transformers
        hub = None
    import torch._dynamo

    logs = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]  # the fallback's and kernels' notes
    saved = (getattr(hub, "HF_HUB_OFFLINE", None), [log.level for log in logs], torch._dynamo.config.disable)
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    for log in logs:
        log.setLevel(logging.ERROR)
    torch._dynamo.config.disable = True  # bnb's CPU kernels stay eager (see the module docstring)
    try:
        return _functions_or_none()
    finally:
        if hub is not None:
            hub.HF_HUB_OFFLINE = saved[0]
        for log, level in zip(logs, saved[1]):
            log.setLevel(level)
        torch._dynamo.config.disable = saved[2]


def _functions_or_none():
    try:  # bitsandbytes is a dependency, but keep the engine importable without a working build
        from bitsandbytes.autograd import _functions
    except Exception:  # pragma: no cover - no bitsandbytes
        return None
    return _functions


_bnb = import_bitsandbytes()


if _bnb is not None:
    _MatMul4Bit = _bnb.MatMul4Bit

    class CheckpointableMatMul4Bit(_MatMul4Bit):
        """bnb's MatMul4Bit with the weight saved through ``save_for_backward`` (see the module docstring)."""

        @staticmethod
        def forward(ctx, A, B, out=None, bias=None, quant_state=None):
            output = _MatMul4Bit.forward(ctx, A, B, out, bias, quant_state)
            if not ctx.is_empty:
                ctx.tensors = None  # never keep the forward-time view of a streamed slot
                ctx.save_for_backward(B.view(-1, 1))
            return output

        @staticmethod
        def backward(ctx, grad_output):
            if not ctx.is_empty:
                ctx.tensors = (None, ctx.saved_tensors[0])
            return _MatMul4Bit.backward(ctx, grad_output)


@contextlib.contextmanager
def streamable_4bit():
    """Route ``bitsandbytes.matmul_4bit`` through :class:`CheckpointableMatMul4Bit` inside the block."""
    if _bnb is None:
        yield
        return
    _bnb.MatMul4Bit = CheckpointableMatMul4Bit
    try:
        yield
    finally:
        _bnb.MatMul4Bit = _MatMul4Bit


def keep_training_layout(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its AVX512-BF16 CPU inference kernel; returns layers changed.

    On a CPU with AVX512-BF16, bnb 0.50's ``Linear4bit.forward`` in eval mode with an input that needs no gradient
    replaces ``weight.data`` by a repacked layout and marks the shared ``quant_state`` (``packing_format_for_cpu``)
    for good. After that, every forward, training ones included, runs ``gemv_4bit``, which has no autograd kernel:
    gradients stop flowing through the frozen base layer (the input gradient is lost; LoRA weights of the layers
    below get wrong gradients, silently), and eval numerics differ from training's dequantize + matmul. An eval
    during training is enough to trigger it. For a streamed layer it is worse: the repacked tensor is not the ring
    slot, and the next bind pairs the slot's unpacked bytes with the packed flag. Training needs the one layout;
    evaluation then runs the same kernel as training (slower on CPU than bnb's inference kernel, and exact).
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
