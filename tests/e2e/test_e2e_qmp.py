"""The migration commands of a real ``livemig run`` process, through qemu.qmp's client.

Capabilities in QEMU's order, parameters set and queried, QEMU's refusals (a second migrate,
migrate-incoming without ``-incoming defer``, a bad URI), ``--incoming defer`` with one
``migrate-incoming``, and ``query-migrationthreads`` naming ``mig/src/main`` (the name the
host's tools see too).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from livemig.qmp.client import QMPClientError
from livemig.testing.procs import ProcHarness

# QEMU 10.0's MigrationCapability enum order (qapi/migration.json)
QEMU_10_CAPS = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
    "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
    "switchover-ack", "dirty-limit", "mapped-ram",
]  # fmt: skip


def _comm(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/comm").read_text().rstrip("\n")


def refused(proc, command: str, **args) -> str:
    with pytest.raises(QMPClientError) as info:
        proc.cmd(command, **args)
    assert info.value.error_class == "GenericError", info.value
    return str(info.value.desc)


@pytest.mark.timeout(90)
def test_migration_commands(harness: ProcHarness) -> None:
    src = harness.source(append="ws=8M rate=20000")
    caps = src.cmd("query-migrate-capabilities")
    names = [c["capability"] for c in caps]
    assert names[: len(QEMU_10_CAPS)] == QEMU_10_CAPS
    assert not any(c["state"] for c in caps)  # all off by default, as QEMU

    src.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "events", "state": True}, {"capability": "auto-converge", "state": True}])  # fmt: skip
    on = {c["capability"] for c in src.cmd("query-migrate-capabilities") if c["state"]}
    assert on == {"events", "auto-converge"}
    desc = refused(src, "migrate-set-capabilities",
                   capabilities=[{"capability": "no-such-cap", "state": True}])  # fmt: skip
    assert "no-such-cap" in desc

    params = src.cmd("query-migrate-parameters")
    # QEMU 10.0's defaults
    assert params["downtime-limit"] == 300
    assert params["max-bandwidth"] == 134217728
    assert params["cpu-throttle-initial"] == 20
    assert params["cpu-throttle-increment"] == 10
    assert params["max-cpu-throttle"] == 99
    src.cmd("migrate-set-parameters", **{"downtime-limit": 50, "max-bandwidth": 8 << 20})
    params = src.cmd("query-migrate-parameters")
    assert (params["downtime-limit"], params["max-bandwidth"]) == (50, 8 << 20)
    # QEMU 10.0's words (its check names the C field)
    assert "downtime_limit" in refused(src, "migrate-set-parameters", **{"downtime-limit": -1})

    # a URI that cannot be used is named in the error, and nothing starts
    assert "bogus:nowhere" in refused(src, "migrate", uri="bogus:nowhere")
    assert src.query_migrate() == {}
    # migrate-incoming on a process not started with -incoming defer
    assert "'-incoming' was not specified" in refused(
        src, "migrate-incoming", uri="tcp:127.0.0.1:0"
    )

    dst = harness.destination(incoming="defer")
    assert dst.status() == "inmigrate"
    uri = f"unix:{harness.path('deferred.sock')}"
    dst.cmd("migrate-incoming", uri=uri)
    assert "already been started" in refused(dst, "migrate-incoming", uri=uri)
    assert dst.query_migrate()["status"] == "setup"

    src.cmd("migrate", uri=uri)
    # one migration at a time, in QEMU's words
    assert refused(src, "migrate", uri=uri) == "There's a migration process in progress"
    assert "in progress" in refused(src, "migrate-set-capabilities",
                                    capabilities=[{"capability": "events", "state": False}])  # fmt: skip
    threads = src.cmd("query-migrationthreads")
    assert "mig/src/main" in [t["name"] for t in threads], threads
    assert all(isinstance(t["thread-id"], int) and t["thread-id"] > 0 for t in threads)
    # the host's tools (top -H, ps -T, perf) see the same names (livemig.threads)
    for t in threads:
        assert _comm(src.pid, t["thread-id"]) == t["name"][:15], t
    for cpu in src.cmd("query-cpus-fast"):
        assert _comm(src.pid, cpu["thread-id"]) == f"vcpu{cpu['cpu-index']}", cpu
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})  # unlimited, applies at once
    info = src.wait_migration(timeout=60)
    assert info["status"] == "completed", info
    dst.wait_status("running")
    assert dst.guest_check()["ok"]
    # after the end, the thread list is empty again
    assert src.cmd("query-migrationthreads") == []


@pytest.mark.timeout(60)
def test_incoming_exit_on_error_false(harness: ProcHarness) -> None:
    """``migrate-incoming`` with exit-on-error false: a failed incoming migration leaves the
    destination alive, in ``inmigrate``, its query-migrate saying failed and why."""
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination(incoming="defer")
    uri = f"unix:{harness.path('eoe.sock')}"
    dst.cmd("migrate-incoming", uri=uri, **{"exit-on-error": False})
    harness.migrate(src, uri, params={"max-bandwidth": 8 << 20})
    src.wait_migration(states=frozenset({"active"}))
    src.cmd("migrate_cancel")
    assert src.wait_migration()["status"] == "cancelled"
    info = dst.wait_migration(timeout=20)
    assert info["status"] == "failed", info
    assert info["error-desc"], info
    assert dst.alive()
    assert dst.status() == "inmigrate"
    src.wait_status("running")
