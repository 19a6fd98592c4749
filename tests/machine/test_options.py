"""The shared machine flags."""

from __future__ import annotations

import argparse

import pytest

from livemig.errors import MachineError, UsageError
from livemig.machine.options import add_machine_arguments, machine_from_args


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_machine_arguments(parser, serial="null")
    return parser.parse_args(list(argv))


def test_flags_build_the_machine() -> None:
    args = _parse("--memory", "8M", "--ram-block", "extra=4M", "--smp", "2")
    with machine_from_args(args) as m:
        assert [(b.idstr, b.size) for b in m.ram_blocks] == [
            ("pc.ram", 8 << 20),
            ("extra", 4 << 20),
        ]
        assert len(m.vcpus) == 2 and m.runstate.value == "prelaunch"


def test_bad_flags_are_clear_errors() -> None:
    with pytest.raises(UsageError, match="page size"):
        machine_from_args(_parse("--memory", "5001K"))
    with pytest.raises(MachineError, match="1 to 8 vCPUs"):
        machine_from_args(_parse("--memory", "8M", "--smp", "9"))
