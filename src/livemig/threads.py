"""Threads that carry their name into the kernel, as QEMU's do with ``-name debug-threads=on``.

Python names a thread for Python alone: ``top -H``, ``ps -T``, ``perf`` and ``/proc`` show
every thread of a livemig process as ``python``, so a profile of a migration cannot tell the
migration thread from a multifd channel or a vCPU. ``Thread`` gives the kernel the thread's
Python name when it starts (``prctl(PR_SET_NAME)``, which keeps the first 15 bytes), so the
names ``query-migrationthreads`` reports (``mig/src/main``, ``mig/src/send_0``,
``mig/src/return``, QEMU 10.0's names, ...) are the ones the host's tools show.
"""

from __future__ import annotations

import ctypes
import sys
import threading

_PR_SET_NAME = 15
COMM_LEN = 15  # TASK_COMM_LEN less the terminating NUL

_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without prctl: names stay Python's own
        _prctl = None


def set_native_name(name: str) -> bool:
    """Name the calling thread ``name`` for the kernel (cut to 15 bytes, at a character
    boundary); False where that is not possible. Naming is a help for people and tools, so a
    refusal is not an error."""
    if _prctl is None:
        return False
    raw = name.encode("utf-8", "replace")[:COMM_LEN].decode("utf-8", "ignore").encode()
    return _prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0


class Thread(threading.Thread):
    """``threading.Thread`` whose kernel name is its Python name (set as it starts to run)."""

    def run(self) -> None:
        set_native_name(self.name)
        super().run()
