"""``./dev`` with no command prints its usage (not its first line of code) and exits 0; an
unknown command says so and exits 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

DEV = Path(__file__).resolve().parents[2] / "dev"


def test_dev_without_arguments_prints_usage() -> None:
    out = subprocess.run([str(DEV)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "./dev demo [ARGS]" in out.stdout and "set -euo" not in out.stdout
    assert not out.stdout.startswith("#")


def test_dev_unknown_command() -> None:
    out = subprocess.run([str(DEV), "bogus"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "unknown command: bogus" in out.stderr
