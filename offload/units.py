"""Byte sizes as users write them (``20GB``, ``24GiB``, ``512MiB``, ``8e9``) and as the planner prints them.

Pure Python on purpose: the recipe schema validates ``offload.gpu_memory`` / ``offload.cpu_memory`` with
:func:`parse_bytes`, and ``slimtune validate`` must not import torch.

Decimal units are powers of 1000 and binary units powers of 1024 (IEC 80000-13, the convention ``df -H`` / ``df -h``
and GPU vendors' "24 GB" follow): ``20GB`` = 20e9 bytes, ``20GiB`` = 20 * 2**30 bytes. A bare ``G`` / ``M`` /
``K`` is refused rather than guessed, since tools disagree on it (``free -g`` means GiB, ``docker --memory 1g`` too,
while drive and GPU makers mean GB).
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
ACCEPTED = ("a whole number of bytes (e.g. 8000000000) or a number with a unit: B, kB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024), e.g. 20GB, 23.5GiB, 512MiB")


def parse_bytes(value: int | float | str) -> int:
    """``"20GB"`` -> 20_000_000_000, ``"20GiB"`` -> 21_474_836_480, ``512`` -> 512 (bytes, rounded down).

    Raises ValueError naming the accepted forms for anything else (negative numbers, unknown or ambiguous units,
    booleans, fractions of a byte given as a bare number).
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; expected {ACCEPTED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; expected {ACCEPTED}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"{value!r} is not a whole, non-negative number of bytes; expected {ACCEPTED}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} ({type(value).__name__}) is not a size; expected {ACCEPTED}")
    match = _PATTERN.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size; expected {ACCEPTED}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS and unit != "":
        u = unit.upper()
        hint = f" ({u} is ambiguous: write {u}B or {u}iB)" if unit in ("k", "m", "g", "t") else ""
        raise ValueError(f"{value!r}: unknown unit {match.group(2)!r}{hint}; expected {ACCEPTED}")
    scale = _UNITS.get(unit, 1)
    if unit in ("", "b") and number != int(number):
        raise ValueError(f"{value!r} is a fraction of a byte; expected {ACCEPTED}")
    return int(number * scale)


def format_size(n: float | None, binary: bool = False) -> str:
    """The one byte formatter. Decimal units, 3 significant digits, as the planner prints sizes: 31_200_000_000 ->
    '31.2 GB', 5_009_492 -> '5.01 MB', 1536 -> '1.54 kB', 512 -> '512 B'. ``binary``: powers of 1024 with one
    decimal, as memory reports print RSS: 1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    sign, n = ("-" if n < 0 else ""), abs(n)
    units = ((("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if binary else
             (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)))
    for unit, scale in units:
        if binary and n >= scale:
            return f"{sign}{n / scale:.1f} {unit}"
        if not binary and n >= 0.9995 * scale:  # 999_999 B is '1 MB', not '1e+03 kB'
            return f"{sign}{n / scale:.3g} {unit}"
    return f"{sign}{n:.0f} B"


def format_bytes(n: float | None) -> str:
    """Binary units (memory reports): ``format_size(n, binary=True)``."""
    return format_size(n, binary=True)
