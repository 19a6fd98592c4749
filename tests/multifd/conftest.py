"""Fixtures for the multifd tests: a source machine running memstress and an ``inmigrate``
destination in the same process, each with its own ``MigrationManager``, and a helper that
migrates between them and waits (bounded) for both sides to finish."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from livemig.guests import GuestImage, build_guest
from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.runstate import RunState
from livemig.migration.manager import MigrationManager

FINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="session")
def memstress(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    cache: Path = tmp_path_factory.mktemp("multifd-guests")
    return build_guest("memstress", cache=cache)


@dataclass
class Pair:
    """A running source and a waiting destination."""

    src: Machine
    dst: Machine
    src_mgr: MigrationManager
    dst_mgr: MigrationManager

    def configure(self, caps: dict[str, bool], params: dict[str, Any] | None = None) -> None:
        for mgr in (self.src_mgr, self.dst_mgr):
            if caps:
                mgr.set_capabilities([{"capability": k, "state": v} for k, v in caps.items()])
            if params:
                mgr.set_parameters(params)

    def migrate(self, timeout: float = 60.0) -> tuple[dict[str, Any], dict[str, Any]]:
        """Listen on a free loopback port, migrate, wait for both sides; both query replies."""
        return self.migrate_later(timeout)()

    def migrate_later(
        self, timeout: float = 60.0
    ) -> Callable[[], tuple[dict[str, Any], dict[str, Any]]]:
        """Start the migration; the returned function waits for it (bounded)."""
        uri = self.dst_mgr.incoming_start("tcp:127.0.0.1:0")
        self.src_mgr.migrate(uri)
        deadline = time.monotonic() + timeout

        def wait() -> tuple[dict[str, Any], dict[str, Any]]:
            while time.monotonic() < deadline:
                s = self.src_mgr.source.status.value
                d = self.dst_mgr.dest.status.value
                if s in FINAL and (d in FINAL or s != "completed"):
                    break
                time.sleep(0.02)
            else:
                self.src_mgr.cancel()
                raise AssertionError(f"migration did not finish within {timeout} s")
            assert self.src_mgr.outgoing is not None and self.src_mgr.outgoing.join(10)
            if self.dst_mgr.incoming is not None:
                self.dst_mgr.incoming.join(10)
            return self.src_mgr.query_migrate(), self.dst_mgr.query_migrate()

        return wait


MakePair = Callable[..., Pair]


@pytest.fixture
def make_pair(memstress: GuestImage) -> Iterator[MakePair]:
    made: list[Machine] = []

    def make(cmdline: str = "ws=4M rate=20000", *, ram: int = 16 << 20, smp: int = 2) -> Pair:
        src = Machine([RAMBlockSpec("pc.ram", ram)], smp=smp)
        made.append(src)
        src.load_guest(memstress.data, cmdline)
        src.start()
        dst = Machine([RAMBlockSpec("pc.ram", ram)], smp=smp)
        made.append(dst)
        dst.set_runstate(RunState.INMIGRATE)
        return Pair(src, dst, MigrationManager(src), MigrationManager(dst))

    yield make
    for m in made:
        m.close()
