"""Post-copy with a real ``livemig run`` source process: ``livemig migrate
--postcopy-after-precopy`` end to end, and the source killed in postcopy-active."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.runstate import RunState
from livemig.migration.manager import MigrationManager
from livemig.migration.state import MigrationStatus
from livemig.qmp.client import QMPConnection

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _source(tmp: Path, cache: Path) -> tuple[subprocess.Popen, str]:
    qmp = tmp / "src.qmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig", "run", "--guest", "memstress", "--memory", "32M",
         "--smp", "2", "--serial", "null", "--qmp", f"unix:{qmp}", "--append", "ws=24M rate=0"],
        env={**ENV, "LIVEMIG_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not qmp.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"source did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    time.sleep(0.2)
    return proc, f"unix:{qmp}"


@pytest.fixture
def procs(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    made: list = []
    cache = tmp_path_factory.getbasetemp() / "pc-cache"

    def make() -> tuple[subprocess.Popen, str, MigrationManager, Machine, str]:
        proc, qmp = _source(tmp_path, cache)
        dst = Machine([RAMBlockSpec("pc.ram", 32 << 20)], smp=2)
        dst.set_runstate(RunState.INMIGRATE)
        dm = MigrationManager(dst)
        dm.set_capabilities([{"capability": "postcopy-ram", "state": True}])
        made.append((proc, dm, dst))
        return proc, qmp, dm, dst, f"unix:{tmp_path / 'mig.sock'}"

    yield make
    for proc, dm, dst in made:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if dm.incoming is not None:
            dm.incoming.cancel()
            assert dm.incoming.join(15), "the destination did not end after a cancel"
        dst.close()


def test_cli_postcopy_after_precopy(procs) -> None:
    _proc, qmp, dm, dst, uri = procs()
    dm.incoming_start(uri)
    out = subprocess.run(
        [sys.executable, "-m", "livemig", "migrate", "--qmp", qmp, uri, "--json", "--verify",
         "--postcopy-after-precopy", "--set", "max-bandwidth=16M", "--timeout", "60"],
        env=ENV, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout)
    assert info["status"] == "completed" and info["verified"] is True
    assert info["ram"]["postcopy-bytes"] > 0
    assert dm.dest.wait_for(frozenset({MigrationStatus.COMPLETED}), 10)
    assert dm.query_migrate()["x-verify"] == {"equal": True, "state-equal": True}
    assert dst.runstate == RunState.RUNNING


def test_source_killed_in_postcopy(procs) -> None:
    proc, qmp, dm, dst, uri = procs()
    dm.incoming_start(uri)
    with QMPConnection(qmp).connect() as q:
        q.command("migrate-set-capabilities",
                  capabilities=[{"capability": "postcopy-ram", "state": True}])  # fmt: skip
        # slow enough that post-copy is still running at the kill: no readahead, which is not
        # held back by max-postcopy-bandwidth (the guest's sequential faults would finish it)
        q.command("migrate-set-parameters", **{"max-bandwidth": 16 << 20,
                                               "max-postcopy-bandwidth": 4 << 20,
                                               "x-postcopy-readahead": 0})  # fmt: skip
        q.command("migrate", uri=uri)
        time.sleep(0.3)
        q.command("migrate-start-postcopy")
        assert dm.dest.wait_for(frozenset({MigrationStatus.POSTCOPY_ACTIVE}), 30)
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    t0 = time.monotonic()
    assert dm.dest.wait_for(frozenset({MigrationStatus.POSTCOPY_PAUSED}), 10)
    assert time.monotonic() - t0 < 10
    info = dm.query_migrate()
    assert info["status"] == "postcopy-paused"
    assert info["x-postcopy"]["pages-missing"] > 0
    assert "source connection lost" in dm.dest.error
    assert "pages still on the source" in dm.dest.error
    # Giving up: the destination fails and stops the incomplete guest rather than run it.
    dm.incoming.cancel()
    assert dm.incoming.join(15)
    assert dm.dest.status == MigrationStatus.FAILED
    assert dst.runstate == RunState.INTERNAL_ERROR
