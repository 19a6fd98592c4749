"""Parsing and printing of sizes and rates as users type them (``512M``, ``1G``, ``4096``)."""

from __future__ import annotations

import re

from livemig.errors import UsageError

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)

PAGE_SIZE = 4096


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse ``512M`` / ``1G`` / ``4096`` (binary suffixes, QEMU style) into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{what} must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{what}: cannot parse {text!r} (expected e.g. 4096, 512M, 1G)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value != int(value):
        raise UsageError(f"{what}: {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """Human-readable binary size: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
