"""User-facing errors.

Everything a user can trigger with a bad recipe, a bad file or a bad dataset row raises a subclass of
:class:`SlimtuneError`. The CLI prints the message (no traceback) and exits with code 2, so each message must say
which key, file or line is wrong and what would be valid.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an upstream exception's message (its class name when empty): enough to name the cause in
    a one-line error without a library's multi-line advice."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SlimtuneError(Exception):
    """An error caused by the user's input; printed without a traceback."""

    exit_code = 2


class RecipeError(SlimtuneError):
    """A recipe that cannot be used. Holds every problem found, each naming its dotted key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(SlimtuneError):
    """A dataset that cannot be used: names the file and line/row, and what was expected."""


class CheckpointError(SlimtuneError):
    """A checkpoint that cannot be resumed from, or a resume that would silently change the run."""


class TrainingDiverged(SlimtuneError):
    """The training loss became NaN or infinite: the run stops, keeping its last good checkpoint."""
