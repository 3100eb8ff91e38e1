"""Errors the offload engine raises for a model or setting it cannot serve (no torch import: the CLI catches these
next to ``SlimtuneError`` and prints the message without a traceback, exit code 2)."""

from __future__ import annotations


class OffloadError(Exception):
    """A model or setting the offload engine cannot serve; the message says what would work."""

    exit_code = 2


class UnsupportedModel(OffloadError, ValueError):
    """The model has no structure the engine can stream (no list of decoder layers)."""
