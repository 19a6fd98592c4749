"""``livemig.control.migrate`` from Python against real ``livemig run`` processes: a live
migration into a destination it sets up itself, whose RAM is then the source's byte for byte
(read from both processes' memory, not from livemig's own verdict); a snapshot to a file read
back; and the failures, each the error type the API promises with the command line's message,
the source's guest left running: options that do not fit, a URI nobody could open, a
destination that is not waiting, one that refuses the guest, a cancel and a time-out."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from livemig.control import (
    Cancelled,
    MigrateOptions,
    MigrateResult,
    MigrationFailed,
    migrate,
)
from livemig.errors import MigrationError, UsageError
from livemig.qmp.client import QMPClientError
from livemig.streams import analyze_stream
from livemig.testing.procs import LivemigProcess, ProcHarness

RAM = 32 << 20


def _guest_ram(proc: LivemigProcess) -> bytes:
    return proc.read_ram(RAM)


def _caps(proc: LivemigProcess) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in proc.cmd("query-migrate-capabilities")}


def test_live_migration_sets_up_the_destination_and_leaves_identical_ram(
    harness: ProcHarness,
) -> None:
    src = harness.source(append="ws=8M rate=5000")
    dst = harness.destination(incoming="defer", extra=["-S"])  # stays paused after it
    src.wait_passes_increase(0)
    progress: list[dict[str, Any]] = []
    changed: dict[str, list[str]] = {}
    result = migrate(
        src.qmp_uri, f"unix:{harness.path('mig.sock')}",
        MigrateOptions(verify=True, dest_qmp=dst.qmp_uri, multifd=2,
                       params={"downtime-limit": 500}),
        on_progress=progress.append, on_changed=changed.__setitem__,
    )  # fmt: skip
    assert isinstance(result, MigrateResult)
    assert result.ok and result.status == "completed", result.info
    assert result.verified is True and result.verified_how == "yes, RAM identical"
    assert result.destination is not None and result.destination["status"] == "completed"
    assert progress and progress[-1]["status"] == "completed"
    assert result.capabilities["multifd"] and result.parameters["multifd-channels"] == 2
    assert "multifd off -> on" in changed["source"]
    assert "multifd off -> on" in changed["destination"]  # set there before migrate-incoming
    assert result.changed == changed
    # both sides stopped at the switch-over: the source in postmigrate, the destination -S
    assert src.status() == "postmigrate" and dst.status() == "paused"
    ram = _guest_ram(src)
    assert ram.count(0) < len(ram) - (4 << 20), "memstress wrote its working set"
    assert hashlib.sha256(_guest_ram(dst)).digest() == hashlib.sha256(ram).digest()
    assert dst.guest_check()["ok"]


def test_a_snapshot_to_a_file_is_read_back_and_holds_the_source_ram(
    harness: ProcHarness, tmp_path: Path
) -> None:
    src = harness.source(append="ws=8M rate=5000")
    src.wait_passes_increase(0)
    snap = tmp_path / "snap.mig"
    result = migrate(src.qmp_uri, f"file:{snap}", MigrateOptions(verify=True, stop=True))
    assert result.status == "completed"
    assert result.verified is True and result.verified_how is not None
    assert result.verified_how.startswith("yes, ") and "checksums of the file match" in \
        result.verified_how  # fmt: skip
    assert src.status() == "postmigrate"
    stream = analyze_stream(snap.read_bytes(), keep_ram=True)
    assert stream.ram["pc.ram"].tobytes() == _guest_ram(src)


def test_options_that_do_not_fit_and_a_bad_uri_are_refused_before_anything_is_set(
    harness: ProcHarness,
) -> None:
    src = harness.source()
    before = _caps(src)
    with pytest.raises(UsageError, match="--xbzrle and --multifd exclude each other"):
        migrate(src.qmp_uri, "tcp:127.0.0.1:9", MigrateOptions(multifd=2, xbzrle="64M"))
    with pytest.raises(UsageError, match="--replicate needs a return path"):
        migrate(src.qmp_uri, f"file:{harness.path('x.mig')}", MigrateOptions(replicate=True))
    with pytest.raises(UsageError):
        migrate(src.qmp_uri, "bogus:somewhere")
    assert _caps(src) == before
    assert src.query_migrate().get("status", "none") == "none"
    assert src.status() == "running"


def test_a_uri_nobody_listens_on_fails_the_migration(harness: ProcHarness) -> None:
    src = harness.source()
    missing = harness.path("nobody-listens.sock")
    with pytest.raises(MigrationFailed) as info:  # the source connects once it runs, as QEMU
        migrate(src.qmp_uri, f"unix:{missing}")
    assert info.value.result.status == "failed"
    assert f"Failed to connect to '{missing}': No such file or directory" in str(info.value)
    src.wait_status("running")


@pytest.mark.parametrize("multifd", [None, 2])
def test_a_destination_not_waiting_for_migrate_incoming_is_refused(
    harness: ProcHarness, multifd: int | None
) -> None:
    """The refusal names the destination and what to do: with --multifd it came from
    migrate-set-capabilities as "QMP migrate-set-capabilities failed: GenericError: Multifd
    must be set before incoming starts", which read as the source's."""
    src = harness.source()
    dst = harness.destination()  # already listening: --incoming unix:..., not defer
    with pytest.raises(QMPClientError) as info:
        migrate(src.qmp_uri, dst.incoming or "",
                MigrateOptions(dest_qmp=dst.qmp_uri, multifd=multifd))  # fmt: skip
    assert info.value.command == ("migrate-incoming" if multifd is None else
                                  "migrate-set-capabilities")  # fmt: skip
    assert str(info.value).startswith(f"the destination at {dst.qmp_uri}: QMP "), info.value
    assert "--incoming defer" in str(info.value)
    assert src.query_migrate().get("status", "none") == "none"  # the source was never asked


def test_a_destination_that_refuses_the_guest_raises_migration_failed(
    harness: ProcHarness,
) -> None:
    src = harness.source(smp=2)
    dst = harness.destination(smp=1)
    with pytest.raises(MigrationFailed) as info:
        migrate(src.qmp_uri, dst.incoming or "", MigrateOptions(timeout=60))
    exc = info.value
    assert isinstance(exc, MigrationError) and exc.result.status == "failed"
    assert exc.result.error is not None
    assert "destination refused: machine mismatch: the source has 2 vCPUs" in exc.result.error
    assert "machine mismatch" in str(exc)
    src.wait_status("running")


def test_cancel_and_time_out_cancel_the_migration_and_the_guest_runs_on(
    harness: ProcHarness,
) -> None:
    src = harness.source(append="ws=8M rate=20000")
    slow = MigrateOptions(params={"max-bandwidth": 1 << 20})  # 32M at 1 MB/s: half a minute
    cancel = threading.Event()
    why: list[str] = []

    def progress(info: dict[str, Any]) -> None:
        if info.get("status") == "active":
            cancel.set()

    dst = harness.destination()
    with pytest.raises(MigrationFailed) as info:
        migrate(src.qmp_uri, dst.incoming or "", slow, on_progress=progress,
                on_cancel=why.append, cancel=cancel)  # fmt: skip
    assert why == ["interrupted"] and info.value.result.status == "cancelled"
    assert "x-last-progress" in info.value.result.info  # what it sent before it ended
    src.wait_status("running")

    with pytest.raises(Cancelled):  # set before: the source is not touched
        migrate(src.qmp_uri, dst.incoming or "", slow, cancel=cancel)

    dst = harness.destination()
    slow.timeout = 0.5
    with pytest.raises(MigrationFailed) as info:
        migrate(src.qmp_uri, dst.incoming or "", slow, on_cancel=why.append)
    assert why[-1] == "time-out" and info.value.result.status == "cancelled"
    src.wait_status("running")


def test_an_exception_in_the_progress_callback_cancels_the_migration(
    harness: ProcHarness,
) -> None:
    src = harness.source(append="ws=8M rate=20000")
    dst = harness.destination()

    def broken(info: dict[str, Any]) -> None:
        if info.get("status") == "active":
            raise RuntimeError("the caller's bug")

    with pytest.raises(RuntimeError, match="the caller's bug"):
        migrate(src.qmp_uri, dst.incoming or "",
                MigrateOptions(params={"max-bandwidth": 1 << 20}), on_progress=broken)  # fmt: skip
    assert src.wait_migration(timeout=30)["status"] == "cancelled"
    src.wait_status("running")
