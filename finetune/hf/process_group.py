"""The process group's end: destroyed before the interpreter shuts down, never by a C++ destructor at exit."""

from __future__ import annotations

import atexit

import torch.distributed as dist

_registered = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the script ends, if it is still up (idempotent; a no-op in one
    process). A process group left to the interpreter's finalization lets gloo's worker threads outlive it, and the
    process can end in ``terminate called without an active exception`` (SIGABRT) after a successful run
    (pytorch/pytorch#190489); ``transformers.Trainer`` does not destroy the group it trains on. Destroying is local
    (no collective), so a rank that finishes first does not wait for the others."""
    global _registered
    if not _registered:
        atexit.register(_destroy)
        _registered = True


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
