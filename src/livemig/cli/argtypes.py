"""argparse types shared by the subcommands (and the benches' own parsers): ``--set NAME=VALUE``
and ``--cap NAME[=on|off]`` parsed as ``livemig.migration.options`` parses them, their errors
turned into argparse's, so a bad value is a usage line naming the flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from livemig.errors import UsageError
from livemig.migration.options import parse_cap, parse_param


def setting(text: str) -> tuple[str, Any]:
    """``--set NAME=VALUE``: a migration parameter and its value."""
    try:
        return parse_param(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def capability(text: str) -> tuple[str, bool]:
    """``--cap NAME[=on|off]``: a migration capability and its state."""
    try:
        return parse_cap(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds(
    low: float = 0.0, high: float = math.inf, *, allow_zero: bool = False
) -> Callable[[str], float]:
    """A number of seconds from ``low`` to ``high``, more than 0 unless ``allow_zero``: nan,
    inf and negative values reached ``socket.settimeout`` / ``int()`` as tracebacks."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and low <= value <= high and (value > 0 or allow_zero)
        if not ok:
            if math.isinf(high):
                least = "0 or more" if allow_zero else "more than 0"
                raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, {least}")
            raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, {low:g} to {high:g}")
        return value

    parse.__name__ = "seconds"  # argparse names the type in its messages
    return parse
