"""The process group's end: the last collectives freed and the group destroyed while the interpreter is alive.

A gloo collective is freed by the gloo worker thread that ran it, a moment after the caller saw it complete. Its
tensors were Python tensors, so freeing them takes the GIL. If that moment falls after the script's last line, the
worker asks for the GIL while the interpreter is finalizing; CPython 3.11 then ends the thread with a forced unwind,
which crosses a ``noexcept`` destructor, and the process dies in ``terminate called without an active exception``
(SIGABRT) after a successful run: torchrun reports the run as failed. Core dumps of such runs show exactly that
thread: ``ProcessGroupGloo::runLoop`` → ``~AsyncAllgatherWork`` / ``~AsyncAllreduceWork`` →
``gil_scoped_acquire`` → ``PyThread_exit_thread`` → ``std::terminate`` (pytorch/pytorch#190489; the same race is
described in pytorch/pytorch#179291). ``destroy_process_group()`` alone does not help: DDP and accelerate still hold
the group, so its worker threads live on (gloo's ``shutdown()``/``abort()`` leave them running too).
"""

from __future__ import annotations

import atexit
import time

import torch.distributed as dist

# How long the exit hook sleeps with the GIL released, so a worker thread still freeing the last collective gets
# the GIL while the interpreter is alive. The worker only needs to be scheduled: freeing takes microseconds. Under
# 3 concurrent 2-process jobs on 2 cores (the worst case: DDP's last backward all-reduce right before exit), 0.1 s
# took the exit crash from 9 in 56 runs to 0 in 148 (destroying the group alone: 3 in 15).
DRAIN_SECONDS = 0.2

_registered = False


def destroy_process_group_at_exit() -> None:
    """At the script's end, if a process group is still up: give gloo's worker threads time to free the last
    collectives, then destroy the group (idempotent; a no-op in one process). Registered by ``from_recipe``,
    ``SlimtuneTrainer`` and ``SlimtuneCallback`` whenever there are several processes, so users' own scripts get it
    too.
    ``transformers.Trainer`` never destroys the group it trains on. Both steps are local (no collective), so a
    process that finishes first does not wait for the others."""
    global _registered
    if not _registered:
        atexit.register(_end)
        _registered = True


def _end() -> None:
    if dist.is_available() and dist.is_initialized():
        time.sleep(DRAIN_SECONDS)  # releases the GIL
        dist.destroy_process_group()
