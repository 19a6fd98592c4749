"""x-verify checks CPU and device state too: a destination that loads a register wrong, or a
device state wrong, refuses to resume the guest, and the source keeps running (issue #24)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest

from livemig.guests import build_guest
from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.cpu import CPUState
from livemig.machine.runstate import RunState
from livemig.machine.unicorn_cpu import UnicornCPU
from livemig.migration.manager import MigrationManager
from livemig.migration.postcopy_source import start_postcopy

FINAL = {"completed", "failed", "cancelled"}


class ForgetfulCPU(UnicornCPU):
    """A backend that loads r14 one bit wrong: what a backend bug would look like."""

    def set_state(self, state: CPUState) -> None:
        state = copy.deepcopy(state)
        state.set_reg("r14", state.reg("r14") ^ 1)
        super().set_state(state)


def _pair(tmp_path: Path, backend: type[UnicornCPU]) -> tuple[Machine, Machine, MigrationManager,
                                                              MigrationManager]:  # fmt: skip
    src = Machine([RAMBlockSpec("pc.ram", 16 << 20)], smp=2)
    dst = Machine([RAMBlockSpec("pc.ram", 16 << 20)], smp=2, cpu_backend=backend)
    src.load_guest(build_guest("compute").data, "buf=64K")
    src.start()
    dst.set_runstate(RunState.INMIGRATE)
    return src, dst, MigrationManager(src), MigrationManager(dst)


def _wait(mgr: MigrationManager, side: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        q = mgr.query_migrate()
        if q.get("status") in FINAL:
            return q
        time.sleep(0.02)
    raise AssertionError(f"{side} did not finish: {mgr.query_migrate()}")


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
@pytest.mark.parametrize("backend", [UnicornCPU, ForgetfulCPU], ids=["exact", "forgetful"])
def test_state_verified_before_the_guest_runs(tmp_path: Path, backend, postcopy: bool) -> None:
    src, dst, sm, dm = _pair(tmp_path, backend)
    try:
        caps = [{"capability": "return-path", "state": True},
                {"capability": "postcopy-ram", "state": postcopy}]  # fmt: skip
        sm.set_capabilities(caps)
        dm.set_capabilities(caps)
        uri = dm.incoming_start(f"unix:{tmp_path / 'mig.sock'}")
        time.sleep(0.05)
        sm.migrate(uri, verify=True)
        if postcopy:
            start_postcopy(sm)
        s, d = _wait(sm, "source"), _wait(dm, "destination")
        if backend is UnicornCPU:
            assert s["status"] == d["status"] == "completed", (s, d)
            assert d["x-verify"] == {"equal": True, "state-equal": True}
            assert dst.runstate == RunState.RUNNING
        else:
            assert d["status"] == s["status"] == "failed", (s, d)
            why = "cpu.0, cpu.1 differs from what the source stopped with"
            assert why in d["error-desc"]
            assert s["error-desc"].startswith("destination refused: verification failed")
            assert dst.runstate != RunState.RUNNING
            # The guest never ran on the destination (it said so, even after the post-copy
            # switch): it is whole on the source, which takes it back.
            deadline = time.monotonic() + 10
            while src.runstate != RunState.RUNNING and time.monotonic() < deadline:
                time.sleep(0.02)
            assert src.runstate == RunState.RUNNING
    finally:
        for m in (src, dst):
            m.close()
