"""argparse types shared by the subcommands (and the benches' own parsers): ``--set NAME=VALUE``
and ``--cap NAME[=on|off]`` parsed as ``livemig.migration.options`` parses them, their errors
turned into argparse's, so a bad value is a usage line naming the flag."""

from __future__ import annotations

import argparse
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
