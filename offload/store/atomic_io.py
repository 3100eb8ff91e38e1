"""Atomic writes: a reader (or a resumed run) sees the old file/directory or the new one, never half of one.

Used by the trainer's checkpoints, exports and metrics (``finetune``) and by the offloaded optimizer's checkpoints;
it lives in ``offload`` because ``finetune`` depends on ``offload``, not the reverse (README, Layout).

Files: write ``name.tmp-<pid>``, fsync, ``os.replace``. Directories: fill ``.tmp-<name>-<pid>`` next to the
target, fsync its files, then rename it into place (a same-filesystem rename is atomic on POSIX). A kill at any
moment leaves at most a ``.tmp-*`` directory, which :func:`remove_stale_temps` clears on the next start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_PREFIX}{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``target`` (replacing an old one if ``replace``).

    On an exception the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():
            if not replace:
                raise FileExistsError(target)
            old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
            os.rename(target, old)  # two renames: target is briefly absent, never half-written
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-*`` leftovers of killed writes in ``folder``; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
