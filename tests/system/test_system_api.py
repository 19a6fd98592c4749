"""``livemig.system.System`` in this process, migrating to and from real ``livemig run``
processes driven by ``livemig.control.migrate``: the source's guest arrives with the RAM it
had, byte for byte; the exit statuses and messages are ``livemig run``'s (0 after QMP quit,
130 after a host signal, 1 when the incoming migration fails, saying why); options that do not
fit raise UsageError before any RAM is taken."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.control import MigrateOptions, MigrationFailed, migrate
from livemig.errors import UsageError
from livemig.qmp.client import QMPConnection
from livemig.system import System, SystemOptions
from livemig.testing.procs import ProcHarness, wait_until

RAM = 32 << 20


@pytest.fixture
def harness() -> Iterator[ProcHarness]:
    with ProcHarness(memory="32M", smp=1) as h:
        yield h


def _system(tmp_path: Path, messages: list[str], **kw: object) -> System:
    opts = SystemOptions(qmp=f"unix:{tmp_path / 'system.qmp'}", memory="32M", serial="null",
                         **kw)  # type: ignore[arg-type]  # fmt: skip
    return System(opts, on_message=messages.append)


def test_a_guest_started_here_migrates_to_a_process_and_quit_exits_0(
    harness: ProcHarness, tmp_path: Path
) -> None:
    messages: list[str] = []
    with _system(tmp_path, messages, guest="memstress", append="ws=8M rate=5000") as system:
        system.start()
        assert messages[-1].startswith("guest memstress, 1 vCPUs, pc.ram=32.0 MiB, QMP at unix:")
        dst = harness.destination(extra=["-S"])
        qmp = system.options.qmp or ""
        result = migrate(qmp, dst.incoming or "", MigrateOptions(verify=True))
        assert result.status == "completed" and result.verified is True
        assert system.machine.runstate.value == "postmigrate"
        assert dst.read_ram(RAM) == bytes(system.machine.read_guest(0, RAM))
        assert dst.guest_check()["ok"]
        with QMPConnection(qmp).connect() as c:
            c.command("quit")
        assert system.wait(timeout=10) == 0


def test_an_incoming_guest_arrives_with_the_source_ram_and_a_signal_exits_130(
    harness: ProcHarness, tmp_path: Path
) -> None:
    src = harness.source(append="ws=8M rate=5000")
    src.wait_passes_increase(0)
    messages: list[str] = []
    uri = f"unix:{tmp_path / 'mig.sock'}"
    with _system(tmp_path, messages, incoming="defer", prelaunch=True) as system:
        system.start()
        assert messages[-1].startswith("incoming guest (defer), 1 vCPUs")
        result = migrate(src.qmp_uri, uri, MigrateOptions(
            dest_qmp=system.options.qmp, multifd=2, verify=True))  # fmt: skip
        assert result.status == "completed" and result.verified is True
        assert result.changed["destination"]  # multifd set here before migrate-incoming
        wait_until(lambda: system.machine.runstate.value == "paused", 10, "paused (-S)")
        assert bytes(system.machine.read_guest(0, RAM)) == src.read_ram(RAM)
        assert system.wait(timeout=0.2) is None  # still running
        system.shutdown("host-signal")
        assert system.wait(timeout=10) == 130


def test_port_0_is_told_as_the_port_listened_on(tmp_path: Path) -> None:
    """--qmp tcp:127.0.0.1:0 --incoming tcp:127.0.0.1:0: the message gave the :0s, so no
    client could find either."""
    messages: list[str] = []
    opts = SystemOptions(qmp="tcp:127.0.0.1:0", memory="16M", serial="null",
                         incoming="tcp:127.0.0.1:0")  # fmt: skip
    with System(opts, on_message=messages.append) as system:
        system.start()
        m = re.match(r"incoming guest \(tcp:127\.0\.0\.1:(\d+)\), .*, QMP at "
                     r"tcp:127\.0\.0\.1:(\d+)$", messages[-1])  # fmt: skip
        assert m and int(m[1]) > 0 and int(m[2]) > 0, messages
        with QMPConnection(f"tcp:127.0.0.1:{m[2]}").connect() as c:
            sockets = c.command("query-migrate")["socket-address"]
        assert sockets[0]["port"] == m[1]
        system.shutdown("host-signal")
        system.wait(timeout=10)


def test_a_failed_incoming_migration_ends_it_with_1_and_says_why(
    harness: ProcHarness, tmp_path: Path
) -> None:
    src = harness.source(smp=2)
    messages: list[str] = []
    uri = f"unix:{tmp_path / 'mig.sock'}"
    with _system(tmp_path, messages, incoming=uri) as system:
        system.start()
        with pytest.raises(MigrationFailed, match="machine mismatch"):
            migrate(src.qmp_uri, uri, MigrateOptions(timeout=30))
        assert system.wait(timeout=10) == 1
    assert any(m.startswith("incoming migration failed: ") and "machine mismatch" in m
               for m in messages), messages  # fmt: skip
    src.wait_status("running")


def test_a_snapshot_of_a_stopped_guest_restores_paused_and_says_so(
    harness: ProcHarness, tmp_path: Path
) -> None:
    """A snapshot taken with stop (migrate --stop) restores paused, as QEMU's does: the
    README's restore used to sit there without a word (and without --qmp, nothing can cont
    it). -S asked for paused itself: nothing to say then."""
    src = harness.source(append="ws=8M rate=5000")
    snap = tmp_path / "snap.mig"
    assert migrate(src.qmp_uri, f"file:{snap}", MigrateOptions(stop=True)).status == "completed"
    for prelaunch, qmp in ((False, None), (False, f"unix:{tmp_path / 'r.qmp'}"), (True, None)):
        messages: list[str] = []
        opts = SystemOptions(incoming=f"file:{snap}", memory="32M", serial="null",
                             prelaunch=prelaunch, qmp=qmp)  # fmt: skip
        with System(opts, on_message=messages.append) as system:
            system.start()
            assert system.manager.incoming.join(10)  # loaded, and its end reported
            assert system.machine.runstate.value == "paused"
            said = [m for m in messages if "arrived paused" in m]
            if prelaunch:
                assert not said, messages
            else:
                how = "QMP cont runs it" if qmp else "no --qmp to send QMP cont to"
                assert len(said) == 1 and how in said[0], messages
            system.shutdown("host-signal")
            system.wait(timeout=10)


def test_options_that_do_not_fit_take_no_ram(tmp_path: Path) -> None:
    cases = [
        (SystemOptions(), "give --guest NAME|FILE.c"),
        (SystemOptions(guest="memstress", incoming="defer"), "exclude each other"),
        (SystemOptions(guest="memstress", verify=True), "apply to --incoming"),
        (SystemOptions(incoming="defer", verify=True, checksums=False), "excludes --no-checks"),
        (SystemOptions(guest="memstress", qmp="tcp:0.0.0.0:4444"), "control this machine"),
        (SystemOptions(guest="memstress", append="ws=lots"), "ws"),
    ]
    before = threading.active_count()
    for opts, words in cases:
        with pytest.raises(UsageError, match=words):
            System(opts, on_message=print)
    assert threading.active_count() == before  # no machine, no vCPU thread
