"""Guest tests: a private image cache, the built-in images, and machines that run them.

The images are built into a per-session cache so the tests never depend on (or spoil) the
user's. ``boot(image, cmdline, smp=..., ram=...)`` gives a started ``livemig.machine.Machine``
that is closed when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from livemig.guests import GuestImage, build_guest
from livemig.machine import Machine, RAMBlockSpec


@pytest.fixture(scope="session")
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-cache")


@pytest.fixture(autouse=True)
def _private_cache(guest_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_CACHE", str(guest_cache))


@pytest.fixture(scope="session")
def images(guest_cache: Path) -> dict[str, GuestImage]:
    """Every built-in guest, built once per session."""
    return {
        name: build_guest(name, cache=guest_cache / "guests")
        for name in ("memstress", "compute", "idle")
    }


@pytest.fixture
def boot() -> Iterator[Callable[..., Machine]]:
    machines: list[Machine] = []

    def start(image: GuestImage, cmdline: str = "", *, smp: int = 1, ram: int = 8 << 20) -> Machine:
        m = Machine([RAMBlockSpec("pc.ram", ram)], smp=smp)
        machines.append(m)
        m.load_guest(image.data, cmdline)
        m.start()
        return m

    yield start
    for m in machines:
        m.close()
