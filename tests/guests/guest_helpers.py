"""Helpers for the guest tests: read the GuestReport, wait for progress, poke guest memory."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from livemig.guests import GuestImage
from livemig.machine import Machine, abi

Boot = Callable[..., Machine]  # the ``boot`` fixture: boot(image, cmdline, smp=, ram=)
Images = dict[str, GuestImage]  # the ``images`` fixture: built-in name -> image


def report_words(m: Machine) -> tuple[int, ...]:
    """The GuestReport as the guest wrote it (each u64 is read whole, safe while running)."""
    return abi.GUEST_REPORT.unpack(
        bytes(m.read_guest(abi.GUEST_REPORT_ADDR, abi.GUEST_REPORT.size))
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def wait_passes(m: Machine, passes: int, timeout: float = 20.0) -> None:
    """Wait until the memstress report is published and every slice did ``passes`` passes."""

    def done() -> bool:
        words = report_words(m)
        return words[0] == abi.REPORT_MAGIC and min(words[5 : 5 + words[4]]) >= passes

    wait_for(done, timeout, f"{passes} memstress passes")


def poke(m: Machine, gpa: int, value: int) -> int:
    """Overwrite one u64 of guest memory, returning what was there."""
    old = struct.unpack("<Q", bytes(m.read_guest(gpa, 8)))[0]
    m.write_guest(gpa, struct.pack("<Q", value))
    return old
