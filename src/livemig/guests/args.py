"""Boot arguments of the built-in guests, checked on the host before the guest runs.

The guest runtime parses ``key=value`` words with ``arg_u64`` / ``arg_size`` (``runtime.c``),
which read digits until the first other character: ``ws=nonsense`` reads as 0 and memstress
then exits with status 2, far from the typo. Each built-in guest's arguments are declared here
(name, kind, range, meaning) and ``check_guest_args`` refuses an unknown name or a value the
guest would misread, saying which and why. A user's own C file is not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from livemig.errors import UsageError

_U64 = re.compile(r"^(?:0[xX][0-9a-fA-F]+|[0-9]+)$")
_SIZE = re.compile(r"^(?:0[xX][0-9a-fA-F]+|[0-9]+)[kKmMgGtT]?$")
_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class GuestArg:
    name: str
    kind: str  # "u64" or "size"
    help: str
    minimum: int = 0
    maximum: int = (1 << 64) - 1


GUEST_ARGS: dict[str, tuple[GuestArg, ...]] = {
    "memstress": (
        GuestArg("ws", "size", "working set; default 16M", 4096),
        GuestArg("rate", "u64", "pages dirtied per second over all vCPUs, 0 = flat out"),
        GuestArg("seed", "u64", "pattern seed"),
        GuestArg("passes", "u64", "stop after this many passes (0 = never)"),
        GuestArg("mark_ms", "u64", "at most one pass mark per this many ms (default 100)"),
        GuestArg("comp", "u64", "percent of pages with a compressible pattern", 0, 100),
    ),
    "compute": (
        GuestArg("buf", "size", "buffer size; default 64K", 4096),
        GuestArg("seconds", "u64", "stop after this many seconds (0 = never)"),
        GuestArg("seed", "u64", "seed of the computation"),
    ),
    "idle": (
        GuestArg("seconds", "u64", "stop after this many seconds (0 = never)"),
        GuestArg("period_ms", "u64", "wake-up period (default 1000)", 1),
    ),
    "kvserver": (GuestArg("buckets", "u64", "initial key-table size (default 4096)", 1),),
}


def _value(arg: GuestArg, text: str) -> int:
    pattern = _SIZE if arg.kind == "size" else _U64
    if not pattern.match(text):
        what = "a size such as 64M" if arg.kind == "size" else "a whole number"
        raise UsageError(f"{arg.name}={text}: expected {what} ({arg.help})")
    mult = 1
    if arg.kind == "size" and text[-1].lower() in _SUFFIX and not text.lower().startswith("0x"):
        mult, text = _SUFFIX[text[-1].lower()], text[:-1]
    value = int(text, 0) * mult
    if not arg.minimum <= value <= arg.maximum:
        raise UsageError(f"{arg.name}={text}: out of range {arg.minimum}..{arg.maximum} "
                         f"({arg.help})")  # fmt: skip
    return value


def check_guest_args(guest: str, cmdline: str) -> None:
    """Refuse boot arguments the built-in ``guest`` does not take or would misread."""
    spec = GUEST_ARGS.get(guest)
    if spec is None:
        return  # a user's program: its arguments are its own
    known = {a.name: a for a in spec}
    for word in cmdline.split():
        name, sep, value = word.partition("=")
        arg = known.get(name)
        if arg is None:
            raise UsageError(f"guest {guest}: unknown boot argument {name!r} (it takes: "
                             f"{', '.join(f'{a.name}=' for a in spec)})")  # fmt: skip
        if not sep or not value:
            raise UsageError(f"guest {guest}: {name} needs a value ({arg.help})")
        try:
            _value(arg, value)
        except UsageError as exc:
            raise UsageError(f"guest {guest}: {exc}") from None
