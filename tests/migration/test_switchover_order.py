"""The pre-copy switch-over's order on the destination: the guest starts as soon as everything it
needs is loaded and verified (EOF), not after the trailing vmdesc, which only describes it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from livemig.guests import build_guest
from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.runstate import RunState
from livemig.migration.manager import MigrationManager
from livemig.wire.encoder import Encoder

FINAL = {"completed", "failed", "cancelled"}


def _wait(mgr: MigrationManager) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        q = mgr.query_migrate()
        if q.get("status") in FINAL:
            return q
        time.sleep(0.02)
    raise AssertionError(f"no final state: {mgr.query_migrate()}")


def _migrate(tmp_path: Path, monkeypatch, src: Machine, dst: Machine, vmdesc) -> tuple:
    """Migrate ``src`` (the compute guest, running) to ``dst`` with a return path and x-verify,
    the source's ``Encoder.vmdesc`` replaced by ``vmdesc``; both final query-migrate replies."""
    src.load_guest(build_guest("compute").data, "buf=64K")
    src.start()
    dst.set_runstate(RunState.INMIGRATE)
    sm, dm = MigrationManager(src), MigrationManager(dst)
    caps = [{"capability": "return-path", "state": True}]
    sm.set_capabilities(caps)
    dm.set_capabilities(caps)
    uri = dm.incoming_start(f"unix:{tmp_path / 'mig.sock'}")
    time.sleep(0.05)
    monkeypatch.setattr(Encoder, "vmdesc", vmdesc)
    sm.migrate(uri, verify=True)
    return _wait(sm), _wait(dm)


@pytest.mark.timeout(90)
def test_destination_runs_before_the_vmdesc_arrives(tmp_path: Path, monkeypatch) -> None:
    src = Machine([RAMBlockSpec("pc.ram", 16 << 20)], smp=1)
    dst = Machine([RAMBlockSpec("pc.ram", 16 << 20)], smp=1)
    seen: list[bool] = []
    real_vmdesc = Encoder.vmdesc

    def slow_vmdesc(self: Encoder):  # the source builds the vmdesc only once dst runs
        deadline = time.monotonic() + 3
        while dst.runstate != RunState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(dst.runstate == RunState.RUNNING)
        return real_vmdesc(self)

    try:
        s, d = _migrate(tmp_path, monkeypatch, src, dst, slow_vmdesc)
        assert s["status"] == d["status"] == "completed", (s, d)
        assert d["x-verify"] == {"equal": True, "state-equal": True}
        assert seen and seen[-1], "the destination waited for the vmdesc to start the guest"
        assert dst.runstate == RunState.RUNNING
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(90)
def test_a_bad_vmdesc_after_the_start_is_only_logged(tmp_path: Path, monkeypatch, caplog) -> None:
    """The vmdesc describes what was loaded: once the guest runs on what was loaded and
    verified, a vmdesc that does not parse is logged (QEMU ignores it too), the migration
    stays completed on both sides and the guest runs on the destination only."""
    from livemig.wire import events as E

    src = Machine([RAMBlockSpec("pc.ram", 16 << 20)], smp=1)
    dst = Machine([RAMBlockSpec("pc.ram", 16 << 20)], smp=1)
    try:
        bad = lambda self: E.VMDescription(["not", "a", "desc"])  # noqa: E731
        s, d = _migrate(tmp_path, monkeypatch, src, dst, bad)
        assert s["status"] == d["status"] == "completed", (s, d)
        assert dst.runstate == RunState.RUNNING and src.runstate == RunState.POSTMIGRATE
        deadline = time.monotonic() + 5
        while "vmdesc failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "VMDESCRIPTION JSON is not an object" in caplog.text
    finally:
        src.close()
        dst.close()
