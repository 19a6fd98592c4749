"""Post-copy tests: a source and a destination MigrationManager in one process.

Both machines live in this process; that is safe for userfaultfd only because the destination's
vCPUs fault inside unicorn without the GIL and no test code touches destination RAM before the
migration ended (``livemig.memtrack.uffd``). The memstress image is built once per session into
a private cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig.guests import GuestImage, build_guest
from livemig.machine import Machine, RAMBlockSpec, abi
from livemig.machine.runstate import RunState
from livemig.migration.manager import MigrationManager
from livemig.migration.state import MigrationStatus


@pytest.fixture(scope="session")
def memstress(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return build_guest("memstress", cache=tmp_path_factory.mktemp("pc-guests"))


class Pair:
    """A running memstress source and an ``inmigrate`` destination, with their managers."""

    def __init__(self, image: GuestImage, ram: int, append: str, smp: int, tmp: Path) -> None:
        self.src = Machine([RAMBlockSpec("pc.ram", ram)], smp=smp)
        self.dst = Machine([RAMBlockSpec("pc.ram", ram)], smp=smp)
        self.src.load_guest(image.data, append)
        self.src.start()
        self.dst.set_runstate(RunState.INMIGRATE)
        self.events: list[tuple[str, str]] = []
        self.src_passes: list[int] = []  # the source's MIGRATION_PASS events, in order
        self.sm = MigrationManager(self.src, emit=lambda n, d=None: self._ev("src", n, d))
        self.dm = MigrationManager(self.dst, emit=lambda n, d=None: self._ev("dst", n, d))
        self.uri = f"unix:{tmp / 'mig.sock'}"

    def _ev(self, side: str, name: str, data: Any) -> None:
        if name == "MIGRATION":
            self.events.append((side, data["status"]))
        elif name == "MIGRATION_PASS" and side == "src":
            self.src_passes.append(data["pass"])

    def caps(self, **caps: bool) -> None:
        items = [{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]
        self.sm.set_capabilities(items)
        self.dm.set_capabilities(items)

    def params(self, **params: Any) -> None:
        p = {k.replace("_", "-"): v for k, v in params.items()}
        self.sm.set_parameters(p)
        self.dm.set_parameters(p)

    def start(self, verify: bool = True) -> None:
        self.dm.incoming_start(self.uri)
        self.sm.migrate(self.uri, verify=verify)

    def wait(self, side: str, statuses: set[str], timeout: float = 30.0) -> str:
        st = self.sm.source if side == "src" else self.dm.dest
        want = frozenset(MigrationStatus(s) for s in statuses)
        if not st.wait_for(want, timeout):
            raise AssertionError(
                f"{side} still {st.status} after {timeout} s, wanted {statuses}"
                f"; src={self.sm.query_migrate()} dst={self.dm.query_migrate()}"
            )
        return st.status.value

    def wait_guest(self, passes: int = 1, timeout: float = 20.0) -> None:
        """Wait until memstress filled its working set and swept it ``passes`` times."""
        deadline = time.monotonic() + timeout
        while True:
            words = abi.GUEST_REPORT.unpack(
                bytes(self.src.read_guest(abi.GUEST_REPORT_ADDR, abi.GUEST_REPORT.size))
            )
            if words[0] == abi.REPORT_MAGIC and min(words[5 : 5 + words[4]]) >= passes:
                return
            assert time.monotonic() < deadline, "memstress did not get going"
            time.sleep(0.01)

    def wait_pass(self, n: int, timeout: float = 20.0) -> None:
        """Until ``n`` passes over RAM are done: dirty-sync-count ``n + 1`` (the setup's sync
        is pass 1 there, as in QEMU)."""
        deadline = time.monotonic() + timeout
        while self.sm.outgoing is None or self.sm.outgoing.stats.dirty_sync_count < n + 1:
            assert time.monotonic() < deadline, "pre-copy did not reach the wanted pass"
            time.sleep(0.01)

    def close(self) -> None:
        for m in (self.sm, self.dm):
            m.cancel()
            if m.incoming is not None:
                m.incoming.cancel()
                m.incoming.join(15)
            if m.outgoing is not None:
                m.outgoing.join(15)
        self.src.close()
        self.dst.close()


@pytest.fixture
def pair(memstress: GuestImage, tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(ram: int = 32 << 20, append: str = "ws=16M rate=0", smp: int = 2) -> Pair:
        p = Pair(memstress, ram, append, smp, tmp_path)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
