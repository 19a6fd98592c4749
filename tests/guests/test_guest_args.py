"""Built-in guests' boot arguments are checked on the host: ``ws=nonsense`` used to read as 0
in the guest, which then exited with status 2 far from the typo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livemig.errors import UsageError
from livemig.guests.args import check_guest_args


@pytest.mark.parametrize("line", ["", "ws=64M rate=20000", "ws=0x1000 seed=7 comp=100",
                                  "ws=1G rate=0 mark_ms=500 passes=3"])  # fmt: skip
def test_good_arguments(line: str) -> None:
    check_guest_args("memstress", line)


@pytest.mark.parametrize(("line", "why"), [
    ("ws=nonsense", "ws=nonsense: expected a size"),
    ("rate=20MB", "rate=20MB: expected a whole number"),
    ("comp=150", "out of range 0..100"),
    ("wss=8M", "unknown boot argument 'wss'"),
    ("ws", "ws needs a value"),
])  # fmt: skip
def test_bad_arguments(line: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        check_guest_args("memstress", line)


def test_a_users_program_is_not_checked() -> None:
    check_guest_args("/tmp/mine.c", "anything=goes")


def test_run_refuses_before_starting() -> None:
    out = subprocess.run([sys.executable, "-m", "livemig", "run", "--guest", "memstress",
                          "--memory", "16M", "--append", "ws=nonsense"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "guest memstress: ws=nonsense: expected a size" in out.stderr
