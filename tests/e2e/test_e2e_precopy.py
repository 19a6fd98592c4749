"""Pre-copy between two real ``livemig run`` processes over loopback TCP and unix sockets.

memstress on 2 vCPUs at several dirty rates; after completion the guest goes on at the
destination with its invariant intact, the RAM hashes matched (x-verify), the source sits in
``postmigrate``, query-migrate has QEMU's fields and the MIGRATION / MIGRATION_PASS events
came in QEMU's order.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from livemig.testing.procs import LivemigProcess, ProcHarness, free_tcp_port, wait_until

# QEMU 7.2's MigrationStats members (qapi/migration.json) that livemig reports.
RAM_FIELDS = {
    "transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
    "dirty-pages-rate", "mbps", "dirty-sync-count", "postcopy-requests", "page-size",
    "multifd-bytes", "pages-per-second", "precopy-bytes", "downtime-bytes", "postcopy-bytes",
    "dirty-sync-missed-zero-copy",
}  # fmt: skip


def check_completed_source(src: LivemigProcess, info: dict, verify: bool = True) -> None:
    """What a source must show after a completed pre-copy migration."""
    assert info["status"] == "completed", info
    for key in ("total-time", "downtime", "setup-time"):
        assert isinstance(info[key], int) and info[key] >= 0, (key, info)
    assert "expected-downtime" not in info  # QEMU shows it only while active
    assert set(info["ram"]) >= RAM_FIELDS, RAM_FIELDS - set(info["ram"])
    ram = info["ram"]
    assert ram["remaining"] == 0
    assert ram["total"] == 64 << 20
    assert ram["page-size"] == 4096
    assert ram["transferred"] >= ram["normal-bytes"] > 0
    assert ram["precopy-bytes"] + ram["downtime-bytes"] <= ram["transferred"]
    assert ram["dirty-sync-count"] >= 2  # the setup bitmap and the final sync at least
    if verify:
        assert info["x-verified"] is True
    assert src.status() == "postmigrate"
    migration = [d["status"] for _, d in src.event_names("MIGRATION")]
    assert migration == ["setup", "active", "device", "completed"]  # QEMU 10.0's
    passes = [d["pass"] for _, d in src.event_names("MIGRATION_PASS")]
    assert passes == list(range(1, ram["dirty-sync-count"] + 1))


def check_guest_continues(dst: LivemigProcess, before: dict) -> None:
    """The destination runs the guest: invariant holds and memstress makes progress."""
    dst.wait_status("running", timeout=15)
    first = dst.guest_check()
    assert first["ok"], first["problems"]
    assert first["seed"] == before["seed"]
    # the guest carried on from the source's state, not from a fresh boot
    assert first["total-passes"] >= before["total-passes"]
    later = dst.wait_passes_increase(first["total-passes"], timeout=20)
    assert later["ok"], later["problems"]


CASES = [
    # (transport, memstress args) — rate=0 dirties flat out, so its working set stays small
    pytest.param("tcp", "ws=4M rate=0", id="tcp-rate0"),
    pytest.param("unix", "ws=16M rate=20000", id="unix-rate20000"),
    pytest.param("tcp", "ws=16M rate=200000", id="tcp-rate200000"),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport, append", CASES)
def test_precopy_loopback(harness: ProcHarness, transport: str, append: str) -> None:
    if transport == "tcp":
        uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    else:
        uri = f"unix:{harness.path('mig.sock')}"
    src = harness.source(append=append)
    dst = harness.destination(incoming=uri)
    before = src.wait_passes_increase(0, timeout=20)  # the guest is at work
    assert before["ok"], before["problems"]
    harness.migrate(src, uri, caps={"events": True, "return-path": True, "x-verify": True})
    info = src.wait_migration(timeout=60)
    check_completed_source(src, info)
    at_source = src.guest_check()  # the stopped source guest, as it was sent
    assert at_source["ok"], at_source["problems"]
    assert dst.query_migrate()["status"] == "completed"
    assert dst.query_migrate()["x-verify"] == {"equal": True, "state-equal": True}
    check_guest_continues(dst, at_source)


@pytest.mark.timeout(90)
def test_cli_migrate_json(harness: ProcHarness) -> None:
    """``livemig migrate --verify --json`` prints one JSON object, verified true."""
    src = harness.source(append="ws=8M rate=20000")
    dst = harness.destination()
    assert dst.incoming is not None
    before = src.wait_passes_increase(0)
    proc = subprocess.run(
        [sys.executable, "-m", "livemig", "migrate", "--qmp", src.qmp_uri, dst.incoming,
         "--verify", "--json", "--timeout", "60", "--set", "downtime-limit=300"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON document, nothing else on stdout
    assert out["verified"] is True
    assert out["status"] == "completed"
    assert set(out["ram"]) >= RAM_FIELDS
    assert src.status() == "postmigrate"
    check_guest_continues(dst, before)


@pytest.mark.timeout(60)
def test_cli_migrate_json_failure(harness: ProcHarness) -> None:
    """A destination that is not there: one JSON object with the reason, exit status 1."""
    src = harness.source(append="ws=4M rate=20000")
    proc = subprocess.run(
        [sys.executable, "-m", "livemig", "migrate", "--qmp", src.qmp_uri,
         f"unix:{harness.path('nobody.sock')}", "--verify", "--json", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "failed"
    assert "nobody.sock" in out["error-desc"]
    assert out["verified"] is False
    assert src.status() == "running"


@pytest.mark.timeout(60)
def test_cli_migrate_interrupted_cancels(harness: ProcHarness) -> None:
    """Ctrl-C on ``livemig migrate`` cancels the migration; the guest stays on the source."""
    src = harness.source(append="ws=16M rate=20000")
    dst = harness.destination()
    assert dst.incoming is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig", "migrate", "--qmp", src.qmp_uri, dst.incoming,
         "--json", "--set", "max-bandwidth=4M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: src.query_migrate().get("status") == "active", 15, "active")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1, err
    assert json.loads(out)["status"] == "cancelled"
    assert src.query_migrate()["status"] == "cancelled"
    src.wait_status("running")
    assert src.guest_check()["ok"]
