"""Whether a recipe value names something local (a file or directory on this machine) or a Hugging Face hub id.
One rule per kind of value, shared by validation, data loading and model/tokenizer loading (no torch import)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # the files data.path may name (datasets' packaged builders)


def is_local_data(value: str) -> bool:
    """``data.path`` / ``data.eval_path``: a path (``./``, ``/``, ``~``) or a data file name; else a hub dataset."""
    return value.startswith((".", "/", "~")) or value.endswith(DATA_SUFFIXES)


def is_local_model(source: str | Path) -> bool:
    """``model.name_or_path`` / ``model.tokenizer``: a path, or anything that exists here; else a hub id."""
    text = str(source)
    return isinstance(source, Path) or text.startswith(("/", ".", "~")) or os.path.exists(text)
