"""Guest programs: a freestanding C runtime and the built-in guests, built into flat images.

``build_guest("memstress")`` (or ``"compute"``, ``"idle"``, or a path to a user's .c file)
returns a ``GuestImage`` whose ``data`` the machine loads at ``abi.LOAD_ADDR``. The C sources
live in ``src/``; ``memstress`` has a checker for its memory in ``livemig.guests.memstress``.
"""

from __future__ import annotations

from livemig.guests.build import (
    BUILTIN_GUESTS,
    GuestImage,
    build_guest,
    builtin_guests,
    cache_dir,
)

REPORT_KIND_MEMSTRESS = 1
REPORT_KIND_COMPUTE = 2
REPORT_KIND_IDLE = 3

__all__ = [
    "BUILTIN_GUESTS",
    "REPORT_KIND_COMPUTE",
    "REPORT_KIND_IDLE",
    "REPORT_KIND_MEMSTRESS",
    "GuestImage",
    "build_guest",
    "builtin_guests",
    "cache_dir",
]
