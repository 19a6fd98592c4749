"""Post-copy end to end in one process: switch, requests, background push, verification,
recovery after a broken link, migrate-pause, and the QMP command checks."""

from __future__ import annotations

import socket

import pytest

from livemig.errors import UsageError
from livemig.guests.memstress import check_invariant
from livemig.machine.runstate import RunState
from livemig.memtrack import uffd as U


def _finish(p) -> tuple[dict, dict]:
    assert p.wait("dst", {"completed", "failed"}) == "completed", p.dm.query_migrate()
    assert p.wait("src", {"completed", "failed"}) == "completed", p.sm.query_migrate()
    return p.sm.query_migrate(), p.dm.query_migrate()


def _check_guest(p) -> None:
    assert p.src.runstate == RunState.POSTMIGRATE
    assert p.dst.runstate == RunState.RUNNING
    p.dst.pause()
    report = check_invariant(p.dst.read_guest)
    assert report.ok, report


@pytest.mark.parametrize("minor", [True, False])
def test_postcopy_completes_where_precopy_cannot(pair, minor: bool) -> None:
    # 24 MiB working set swept as fast as the vCPUs can, over a 16 MB/s link: pre-copy would
    # never converge (downtime-limit 300 ms = 4.8 MB), post-copy must finish and verify.
    # Both ways of dropping the discarded pages: minor faults (MADV_DONTNEED) and MADV_REMOVE.
    p = pair(ram=32 << 20, append="ws=24M rate=0")
    p.caps(postcopy_ram=True, postcopy_blocktime=True, events=True)
    p.params(max_bandwidth=16 << 20, x_postcopy_minor_faults=minor)
    p.wait_guest()
    p.start()
    p.wait_pass(2)
    assert p.sm.source.status.value == "active"
    p.sm.outgoing.postcopy.start_postcopy()
    src_q, dst_q = _finish(p)
    assert src_q["x-verified"] is True
    assert dst_q["x-verify"] == {"equal": True, "state-equal": True}
    pc = dst_q["x-postcopy"]
    assert pc["requests"] > 0 and pc["pages-missing"] == 0
    if U.supported_features() & U.UFFD_FEATURE_MINOR_SHMEM or not minor:
        assert pc["discard"] == ("dontneed" if minor else "remove"), pc
    if not minor:
        assert pc["discard-why"] == "x-postcopy-minor-faults is off"
    # the pages to send in post-copy were discarded before the guest stopped (source's _drain)
    assert src_q["x-postcopy"]["prediscarded-pages"] > 0
    assert pc["latency"]["count"] == pc["requests"]
    assert src_q["ram"]["postcopy-requests"] >= pc["requests"]
    assert src_q["x-postcopy"]["pushed-pages"] > 0
    assert isinstance(dst_q["postcopy-blocktime"], int)
    assert len(dst_q["postcopy-vcpu-blocktime"]) == 2
    assert ("src", "postcopy-active") in p.events and ("dst", "postcopy-active") in p.events
    # one MIGRATION_PASS per dirty-bitmap sync, as QEMU's migration_bitmap_sync sends it: the
    # drain's sync before the switch (discarding the pages post-copy will send) had none
    assert p.src_passes == list(range(1, src_q["ram"]["dirty-sync-count"] + 1)), p.src_passes
    _check_guest(p)


def _shows_downtime(q: dict) -> None:
    """In post-copy the blackout is over: QEMU 10.0 (migrate_show_downtime) shows
    ``downtime``, not ``expected-downtime``."""
    assert q["status"].startswith("postcopy-"), q
    assert isinstance(q["downtime"], int) and "expected-downtime" not in q, q


@pytest.mark.parametrize("preempt", [False, True])
def test_link_cut_then_recover(pair, tmp_path, preempt: bool) -> None:
    p = pair(ram=32 << 20, append="ws=24M rate=0")
    p.caps(postcopy_ram=True, postcopy_preempt=preempt, events=True)
    p.params(max_bandwidth=16 << 20, max_postcopy_bandwidth=8 << 20)  # cut mid post-copy
    p.wait_guest()
    p.start()
    p.wait_pass(1)
    p.sm.outgoing.postcopy.start_postcopy()
    p.wait("dst", {"postcopy-active"})
    p.wait("src", {"postcopy-active"})
    _shows_downtime(p.sm.query_migrate())
    p.sm.outgoing.channel.shutdown()  # the link breaks under both sides
    assert p.wait("src", {"postcopy-paused"}) == "postcopy-paused"
    _shows_downtime(p.sm.query_migrate())
    assert p.wait("dst", {"postcopy-paused"}) == "postcopy-paused"
    assert "pages still on the source" in (p.dm.dest.error or "")
    # The guest never runs on both sides: the source keeps its copy stopped while paused.
    assert p.src.runstate == RunState.FINISH_MIGRATE and p.dst.runstate == RunState.RUNNING
    with pytest.raises(UsageError):
        p.sm.migrate(p.uri, resume=False)
    # QEMU 10.0: a resume is postcopy-recover-setup while it connects, postcopy-paused again
    # with the connect's error when nothing listens there
    nobody = tmp_path / "nobody.sock"
    p.sm.migrate(f"unix:{nobody}", resume=True)
    assert p.wait("src", {"postcopy-paused"}) == "postcopy-paused"
    assert p.sm.query_migrate()["error-desc"] == (
        f"Failed to connect to '{nobody}': No such file or directory"
    )
    from livemig.migration.postcopy_source import migrate_recover

    # QEMU 10.0: query-migrate's socket-address is the recover listener's, and a second
    # migrate-recover releases the first one's (livemig listed the first address throughout)
    first = tmp_path / "recover-first.sock"
    migrate_recover(p.dm, f"unix:{first}")
    assert p.dm.query_migrate()["socket-address"] == [{"path": str(first), "type": "unix"}]
    new = f"unix:{tmp_path / 'recover.sock'}"
    migrate_recover(p.dm, new)
    assert p.dm.query_migrate()["socket-address"] == [
        {"path": str(tmp_path / "recover.sock"), "type": "unix"}
    ]
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
        s.connect(str(first))
    migrate_recover(p.dm, new)  # the same address again: released, then listened on anew
    p.sm.migrate(new, resume=True)
    src_q, dst_q = _finish(p)
    assert src_q["x-postcopy"]["recoveries"] == 1
    assert dst_q["x-verify"] == {"equal": True, "state-equal": True}
    seen = [s for side, s in p.events if side == "dst"]
    assert seen[-4:] == ["postcopy-paused", "postcopy-recover", "postcopy-active", "completed"]
    seen = [s for side, s in p.events if side == "src"]
    assert seen[-7:] == ["postcopy-paused", "postcopy-recover-setup", "postcopy-paused",
                         "postcopy-recover-setup", "postcopy-recover", "postcopy-active",
                         "completed"]  # fmt: skip
    _check_guest(p)


def test_migrate_pause_and_auto_recover(pair) -> None:
    p = pair(ram=32 << 20, append="ws=24M rate=0")
    p.caps(postcopy_ram=True, events=True)
    p.params(max_bandwidth=16 << 20, max_postcopy_bandwidth=8 << 20, x_postcopy_auto_recover=5)
    p.wait_guest()
    p.start()
    p.wait_pass(1)
    from livemig.migration.postcopy_source import migrate_pause, start_postcopy

    with pytest.raises(UsageError, match="postcopy-active"):
        migrate_pause(p.sm)
    start_postcopy(p.sm)
    p.wait("src", {"postcopy-active"})
    p.wait("dst", {"postcopy-active"})
    migrate_pause(p.sm)
    src_q, dst_q = _finish(p)
    assert ("src", "postcopy-paused") in p.events and ("dst", "postcopy-paused") in p.events
    assert src_q["x-postcopy"]["recoveries"] >= 1
    assert dst_q["x-verify"] == {"equal": True, "state-equal": True}
    _check_guest(p)


def test_start_postcopy_needs_the_capability(pair) -> None:
    from livemig.migration.postcopy_source import start_postcopy

    p = pair(ram=8 << 20, append="ws=4M rate=1000")
    with pytest.raises(UsageError, match="Enable postcopy"):
        start_postcopy(p.sm)
    p.sm.set_capabilities([{"capability": "postcopy-ram", "state": True}])
    with pytest.raises(UsageError, match="after migration has been started"):
        start_postcopy(p.sm)


def test_start_postcopy_after_precopy_finished_is_not_an_error(pair) -> None:
    """QEMU accepts migrate-start-postcopy once the migration is over ("that would be racy
    with issuing this command"): a client that saw "active" a moment before must not fail
    because pre-copy converged meanwhile."""
    from livemig.migration.postcopy_source import start_postcopy

    p = pair(ram=8 << 20, append="ws=1M rate=1000")
    p.caps(postcopy_ram=True)
    p.wait_guest()
    p.start()
    assert p.wait("src", {"completed", "failed"}) == "completed"
    start_postcopy(p.sm)  # no error, nothing happens
    assert p.sm.source.status.value == "completed"


@pytest.mark.parametrize("preempt_on", ["src", "dst"])
def test_preempt_on_one_side_only_says_so(pair, preempt_on: str) -> None:
    """postcopy-preempt must be on at both ends (as in QEMU). On one only, the destination
    fails in post-copy, and its error names the likely cause. On at the source only, the
    destination runs the guest and then misses pages: the source waits paused, its guest
    stopped, for a recovery, as QEMU's does. On at the destination only, it fails before
    POSTCOPY_RUN and says the guest never ran there: the source takes its guest back."""
    p = pair(ram=32 << 20, append="ws=24M rate=0")
    p.caps(postcopy_ram=True)
    (p.sm if preempt_on == "src" else p.dm).set_capabilities(
        [{"capability": "postcopy-preempt", "state": True}])  # fmt: skip
    p.params(max_bandwidth=16 << 20, x_io_timeout=2000)
    p.wait_guest()
    p.start(verify=False)
    p.wait_pass(2)
    p.sm.outgoing.postcopy.start_postcopy()
    assert p.wait("dst", {"completed", "failed"}) == "failed"
    err = p.dm.query_migrate()["error-desc"]
    if preempt_on == "src":
        assert "the source has postcopy-preempt on, this side off?" in err, err
        assert p.wait("src", {"postcopy-paused"}) == "postcopy-paused"
    else:
        assert "is postcopy-preempt on at the source as well?" in err, err
        assert p.wait("src", {"failed"}) == "failed"
        assert p.sm.query_migrate()["error-desc"].startswith("destination refused: ")
        assert p.src.runstate == RunState.RUNNING
        p.src.pause()
        assert check_invariant(p.src.read_guest).ok


def test_no_drain_switches_at_once(pair) -> None:
    # x-postcopy-drain false: no discard before the guest stops, every one at the switch
    p = pair(ram=32 << 20, append="ws=24M rate=0")
    p.caps(postcopy_ram=True, events=True)
    p.params(max_bandwidth=16 << 20, x_postcopy_drain=False)
    p.wait_guest()
    p.start()
    p.wait_pass(2)
    p.sm.outgoing.postcopy.start_postcopy()
    src_q, dst_q = _finish(p)
    assert src_q["x-postcopy"]["prediscarded-pages"] == 0
    assert dst_q["x-verify"] == {"equal": True, "state-equal": True}
    _check_guest(p)


def test_drain_wait_stays_within_the_io_timeout(pair, monkeypatch) -> None:
    # The source sends nothing while it waits for the drain's PONG, and the destination gives
    # up on a main channel quiet for x-io-timeout: a PONG the source does not see (its
    # return-path thread starved on a loaded host) must not make it wait that long. It failed
    # in CI with x-io-timeout 300 ms ("no progress reading for 0.3 s", the guest lost for
    # the source's 0.5 s wait).
    from livemig.migration.source import OutgoingMigration
    from livemig.wire.constants import X_DRAIN_PING
    from livemig.wire.returnpath import Pong

    seen = OutgoingMigration._on_rp

    def deaf(self, msg) -> None:
        if not (isinstance(msg, Pong) and msg.value == X_DRAIN_PING):
            seen(self, msg)

    monkeypatch.setattr(OutgoingMigration, "_on_rp", deaf)
    p = pair(ram=32 << 20, append="ws=8M rate=1500")
    p.caps(postcopy_ram=True, events=True)
    p.params(max_bandwidth=4 << 20, x_io_timeout=300)
    p.wait_guest()
    p.start()
    p.wait_pass(2)
    p.sm.outgoing.postcopy.start_postcopy()
    _src_q, dst_q = _finish(p)
    assert dst_q["x-verify"] == {"equal": True, "state-equal": True}
    _check_guest(p)


def test_switch_goes_on_when_the_drain_ping_is_not_answered(pair, monkeypatch) -> None:
    # Before the switch the source waits for the PONG of its drain PING (the destination has
    # read and discarded all sent before it), but not for ever: a destination slow to answer
    # delays the switch by at most DRAIN_TIMEOUT_S, and the migration still completes right.
    import time as _time

    from livemig.migration import source
    from livemig.migration.postcopy_dest import PostcopyIncoming

    monkeypatch.setattr(source, "DRAIN_TIMEOUT_S", 0.2)
    slow = PostcopyIncoming.drained

    def late(self) -> None:
        _time.sleep(3.0)
        slow(self)

    monkeypatch.setattr(PostcopyIncoming, "drained", late)
    p = pair(ram=32 << 20, append="ws=24M rate=0")
    p.caps(postcopy_ram=True, events=True)
    p.params(max_bandwidth=16 << 20)
    p.wait_guest()
    p.start()
    p.wait_pass(2)
    t0 = _time.monotonic()
    p.sm.outgoing.postcopy.start_postcopy()
    p.wait("src", {"postcopy-active", "completed", "failed"})
    assert _time.monotonic() - t0 < 2.5  # the source did not wait for the late PONG
    _src_q, dst_q = _finish(p)
    assert dst_q["x-verify"] == {"equal": True, "state-equal": True}
    _check_guest(p)
