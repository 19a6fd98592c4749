"""MigrationManager's refusals that need no running migration."""

from __future__ import annotations

import pytest

from livemig.errors import LivemigError, UsageError
from livemig.machine import Machine, RunState, parse_ram_blocks
from livemig.migration.manager import MigrationManager
from livemig.migration.state import MigrationStatus as S


@pytest.fixture
def manager():
    m = Machine(parse_ram_blocks("8M"), serial="null")
    yield MigrationManager(m)
    m.close()


def test_cancel_refused_in_postcopy_with_the_reason(manager: MigrationManager) -> None:
    for s in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE):
        manager.source.move(s)
    with pytest.raises(UsageError, match=r"refused in postcopy-active.*lose"):
        manager.cancel_qmp()
    assert manager.source.status == S.POSTCOPY_ACTIVE


def test_cancel_is_idempotent_when_nothing_runs(manager: MigrationManager) -> None:
    manager.cancel_qmp()
    manager.cancel_qmp()
    assert manager.source.status == S.NONE


def test_migrate_incoming_needs_defer(manager: MigrationManager) -> None:
    with pytest.raises(UsageError, match="'-incoming' was not specified"):
        manager.incoming_start_qmp("tcp:127.0.0.1:0")


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:1", "unix:/tmp/nowhere.sock", "exec:cat", "fd:3"])
def test_mapped_ram_needs_a_file_before_anything_starts(uri: str) -> None:
    """QEMU 10.0 refuses mapped-ram on a URI it cannot seek in, in ``migrate`` and
    ``migrate-incoming`` alike, before connecting: livemig connected first and refused only
    then, which ended the waiting destination with a truncated stream."""
    src = Machine(parse_ram_blocks("8M"), serial="null")
    dst = Machine(parse_ram_blocks("8M"), serial="null")
    dst.set_runstate(RunState.INMIGRATE)
    try:
        for m in (src, dst):
            mgr = MigrationManager(m)
            mgr.set_capabilities([{"capability": "mapped-ram", "state": True}])
            start = mgr.incoming_start if m is dst else mgr.migrate
            with pytest.raises(UsageError, match=r"^Migration requires seekable transport"):
                start(uri)
            assert (mgr.dest if m is dst else mgr.source).status == S.NONE
            assert mgr.outgoing is None and mgr.incoming is None
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{tmp}", r"^Could not create '{tmp}': Is a directory$"),
        ("{tmp}/no/such/dir/snap.mig", r"^Could not create '{tmp}/no/such/dir/snap.mig': No such"),
        ("{tmp}/file/snap.mig", r"^Could not create '{tmp}/file/snap.mig': Not a directory$"),
    ],
)
def test_migrate_to_a_file_it_cannot_create_is_refused_at_once(
    manager: MigrationManager, tmp_path, target: str, message: str
) -> None:
    """QEMU 10.0's ``migrate`` refuses a ``file:`` it cannot create in the command's reply;
    livemig replied {} and failed later in the migration thread, so a client checking the
    reply (libvirt does) saw a migration start."""
    (tmp_path / "file").write_bytes(b"")
    path = target.format(tmp=tmp_path)
    with pytest.raises(LivemigError, match=message.format(tmp=tmp_path)):
        manager.migrate(f"file:{path}")
    assert manager.source.status == S.NONE and manager.outgoing is None
    assert not (tmp_path / "snap.mig").exists()


def test_migrate_to_an_fd_not_open_is_refused_at_once(manager: MigrationManager) -> None:
    with pytest.raises(UsageError, match=r"^fd:987: file descriptor 987 is not open"):
        manager.migrate("fd:987")
    assert manager.source.status == S.NONE and manager.outgoing is None


@pytest.mark.parametrize(
    ("caps", "uri", "words"),
    [
        # the source waited in active for ever for an ACK nothing could send
        (["return-path", "switchover-ack"], "exec:cat > /dev/null", "switchover-ack needs a "
         "return path (the destination acknowledges the switch-over on it); exec: has none"),
        (["postcopy-ram"], "file:/tmp/livemig-never.mig", "postcopy-ram needs a return path"),
        (["return-path", "x-colo"], "exec:cat > /dev/null", "x-colo needs a return path"),
        # QEMU 10.0's migration_needs_multiple_sockets: the preempt channel as multifd's
        (["postcopy-ram", "postcopy-preempt"], "exec:cat > /dev/null",
         "Migration requires multi-channel URIs (e.g. tcp): postcopy-preempt opens more"),
        (["postcopy-ram", "postcopy-preempt"], "fd:0", "Migration requires multi-channel URIs"),
    ],
)  # fmt: skip
def test_what_needs_an_answer_or_channels_is_refused_by_migrate(
    manager: MigrationManager, caps: list[str], uri: str, words: str
) -> None:
    manager.set_capabilities([{"capability": c, "state": True} for c in caps])
    with pytest.raises(UsageError) as info:
        manager.migrate(uri)
    assert str(info.value).startswith(words), info.value
    assert manager.source.status == S.NONE


def test_return_path_on_a_file_fails_once_written_as_qemu_does(tmp_path) -> None:
    """QEMU 10.0.2 takes ``return-path`` with ``file:`` at ``migrate``, writes the whole
    stream, then fails in ``device``: its return path reads the file, opened write-only,
    and "Unable to read from file: Bad file descriptor" becomes the error-desc; the guest is
    left in the run state it had (prelaunch, with -S). livemig completed, its answer unread."""
    events: list = []
    m = Machine(parse_ram_blocks("8M"), serial="null")
    try:
        mgr = MigrationManager(m, emit=lambda name, data=None: events.append((name, data)))
        before = m.runstate
        mgr.set_capabilities([{"capability": c, "state": True} for c in ("events", "return-path")])
        out = tmp_path / "out.mig"
        mgr.migrate(f"file:{out}")
        assert mgr.source.wait_for(frozenset({S.FAILED, S.COMPLETED}), 30)
        reply = mgr.query_migrate()
        assert reply["status"] == "failed"
        assert reply["error-desc"] == "Unable to read from file: Bad file descriptor"
        statuses = [d["status"] for name, d in events if name == "MIGRATION"]
        assert statuses == ["setup", "active", "device", "failed"]
        assert m.runstate == before
        assert out.read_bytes()[:4] == b"QEVM"  # written, as QEMU writes it
    finally:
        m.close()
