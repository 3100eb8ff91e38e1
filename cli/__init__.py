"""slimtune.cli: the `slimtune` command (train, validate, recipe-docs, generate, merge)."""

from .main import COMMANDS, main

__all__ = ["COMMANDS", "main"]
