"""The post-copy switch's downtime is QEMU's (``postcopy_start``): it starts as the vCPUs stop
and ends once the package is sent. The preempt channel is connected before it (QEMU:
``postcopy_preempt_establish_channel`` before ``migration_downtime_start``), the move to
postcopy-active comes after (QEMU 10.0), and query-migrate counts it in milliseconds as QEMU
does. In both switch-overs, pre-copy's too, the thread turns real-time before the downtime
starts, as QEMU takes the BQL before ``migration_downtime_start``."""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from livemig.migration import source as source_module
from livemig.migration.postcopy_source import PostcopySource, collector_held


def _switch_and_complete(p: Any, preempt: bool) -> Any:
    """Pre-copy at 16 MiB/s, post-copy after the first pass, both sides completed: the
    source's OutgoingMigration."""
    p.caps(postcopy_ram=True, postcopy_preempt=preempt, events=True)
    p.params(max_bandwidth=16 << 20)
    p.wait_guest()
    p.start()
    p.wait_pass(1)
    p.sm.outgoing.postcopy.start_postcopy()
    assert p.wait("dst", {"completed", "failed"}) == "completed", p.dm.query_migrate()
    assert p.wait("src", {"completed", "failed"}) == "completed", p.sm.query_migrate()
    return p.sm.outgoing


def test_downtime_leaves_out_the_preempt_connection_and_ends_with_the_package(
    pair, monkeypatch
) -> None:
    slow = 0.2  # a slow connection (a TLS handshake, a loaded host): not the guest's downtime
    connected: dict[str, float] = {}
    connect = PostcopySource._connect_preempt

    def slow_connect(self: PostcopySource, uri: str) -> Any:
        time.sleep(slow)
        ready = connect(self, uri)
        connected["at"] = time.monotonic()
        return ready

    monkeypatch.setattr(PostcopySource, "_connect_preempt", slow_connect)
    collecting: list[bool] = []
    package = PostcopySource._package

    def watched_package(self: PostcopySource, entries: list) -> bytes:
        collecting.append(gc.isenabled())
        return package(self, entries)

    monkeypatch.setattr(PostcopySource, "_package", watched_package)
    p = pair(ram=32 << 20, append="ws=8M rate=4000")
    active: dict[str, float] = {}
    record = p._ev

    def on_event(side: str, name: str, data: Any) -> None:
        if (side, name) == ("src", "MIGRATION") and data["status"] == "postcopy-active":
            active.setdefault("at", time.monotonic())
        record(side, name, data)

    p._ev = on_event
    mig = _switch_and_complete(p, preempt=True)
    s = mig.stats
    assert connected["at"] <= mig._t_stop  # connected while the guest still ran
    assert s.downtime is not None and s.downtime < slow
    assert mig._t_stop + s.downtime <= active["at"]  # over before postcopy-active
    q = p.sm.query_migrate()
    assert q["downtime"] == s.downtime_ms
    assert s.downtime_ms in (math.floor(s.downtime * 1000), math.floor(s.downtime * 1000) + 1)
    assert q["x-verified"] is True
    # x-verify's adding up of RAM is inside the window, told apart as pre-copy's is
    assert q["x-verify-ms"] > 0
    bd = s.downtime_breakdown
    assert set(bd) == {"postcopy-switch", "verify-hashing"}
    assert math.isclose(sum(bd.values()), s.downtime, abs_tol=1e-9)
    switch = mig.report()["phases"]["stop-and-copy"]
    assert math.isclose(switch[1] - switch[0], s.downtime, abs_tol=1e-9)
    assert collecting == [False]  # no garbage collection inside the window
    assert gc.isenabled()


def test_precopy_downtime_starts_after_the_thread_turned_real_time(pair, monkeypatch) -> None:
    slow = 0.2  # system calls that a loaded host made slow: not the guest's downtime
    taken: dict[str, float] = {}

    def slow_priority() -> None:
        time.sleep(slow)
        taken["at"] = time.monotonic()
        return None  # nothing changed: nothing to restore

    monkeypatch.setattr(source_module, "blackout_priority", slow_priority)
    p = pair(ram=32 << 20, append="ws=8M rate=2000")
    p.caps(return_path=True)
    p.wait_guest()
    p.start()
    assert p.wait("dst", {"completed", "failed"}) == "completed", p.dm.query_migrate()
    assert p.wait("src", {"completed", "failed"}) == "completed", p.sm.query_migrate()
    mig = p.sm.outgoing
    assert taken["at"] <= mig._t_stop  # taken while the guest still ran
    assert mig.stats.downtime is not None and mig.stats.downtime < slow


def test_collector_held_restores_what_it_found() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_held():
        assert not gc.isenabled()
        raise RuntimeError("the switch failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_held():
            assert not gc.isenabled()
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def test_events_raised_in_the_window_are_held_until_the_package_is_out(pair) -> None:
    """The MIGRATION "device" and MIGRATION_PASS events of the switch are raised with the
    QMP server's events held (QEMU's BQL holds its monitor the same way), and the hold ends
    once the downtime is over, before postcopy-active."""
    p = pair(ram=32 << 20, append="ws=8M rate=4000")
    held: list[tuple[str, Any]] = []
    window: dict[str, float] = {}
    holding = [False]
    record = p._ev

    def on_event(side: str, name: str, data: Any) -> None:
        if side == "src" and holding[0]:
            held.append((name, data))
        record(side, name, data)

    @contextlib.contextmanager
    def events_held() -> Iterator[None]:
        window["start"] = time.monotonic()
        holding[0] = True
        try:
            yield
        finally:
            holding[0] = False
            window["end"] = time.monotonic()

    p._ev = on_event
    p.sm.events_held = events_held
    mig = _switch_and_complete(p, preempt=False)
    assert [n for n, _ in held] == ["MIGRATION", "MIGRATION_PASS"]
    assert held[0][1] == {"status": "device"}
    assert window["start"] <= mig._t_stop
    assert window["end"] >= mig._t_stop + mig.stats.downtime
