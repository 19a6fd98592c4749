"""Fixtures for the machine tests: tiny guests assembled from x86-64 source, and machines that
are always closed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.abi import LOAD_ADDR


def assemble(source: str) -> bytes:
    """Assemble AT&T-syntax x86-64 ``source`` into a flat image linked at ``LOAD_ADDR``."""
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (binutils) is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "g.s").write_text(".text\n.globl _start\n_start:\n" + source + "\n")
        subprocess.run(["as", "--64", "-o", d / "g.o", d / "g.s"], check=True)
        subprocess.run(
            ["ld", "-static", "-nostdlib", f"-Ttext={LOAD_ADDR:#x}", "-o", d / "g.elf", d / "g.o"],
            check=True,
        )
        subprocess.run(["objcopy", "-O", "binary", d / "g.elf", d / "g.bin"], check=True)
        return (d / "g.bin").read_bytes()


MakeMachine = Callable[..., Machine]


@pytest.fixture
def make_machine() -> Iterator[MakeMachine]:
    """``make_machine(smp=1, mib=8, **kw)``: a small machine, closed after the test."""
    made: list[Machine] = []

    def make(smp: int = 1, mib: int = 8, **kw: object) -> Machine:
        ram = kw.pop("ram", None) or [RAMBlockSpec("pc.ram", mib << 20)]
        m = Machine(ram, smp, **kw)  # type: ignore[arg-type]
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
