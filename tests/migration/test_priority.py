"""Real-time scheduling for the switch-over thread (migration/priority.py) and its undoing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from livemig.migration.postcopy_source import URGENT_NICE, boost_thread
from livemig.migration.priority import (
    RT_PRIORITY,
    blackout_priority,
    boost_process_threads,
    restore_priority,
    restore_threads,
)


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a fresh thread (never change the test runner's own priority)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(10)
    return out[0]


def _mine() -> tuple[int, int, int]:
    tid = threading.get_native_id()
    return (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority,
            os.getpriority(os.PRIO_PROCESS, tid))  # fmt: skip


def _can_rt() -> bool:
    def probe() -> bool:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            return True
        except OSError:
            return False

    return _in_thread(probe)


needs_rt = pytest.mark.skipif(not _can_rt(), reason="needs CAP_SYS_NICE (real-time scheduling)")


@needs_rt
def test_blackout_priority_is_real_time_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIVEMIG_NO_RT", raising=False)

    def run() -> tuple[Any, ...]:
        before = _mine()
        saved = blackout_priority()
        during = _mine()
        again = blackout_priority()  # already real-time: changes nothing, undoes nothing
        restore_priority(again)
        still = _mine()
        restore_priority(saved)
        return before, saved, during, still, _mine()

    before, saved, during, still, after = _in_thread(run)
    assert saved == before
    assert during[:2] == (os.SCHED_FIFO, RT_PRIORITY)
    assert still == during
    assert after == before


def test_blackout_priority_off_with_livemig_no_rt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_NO_RT", "1")

    def run() -> tuple[Any, ...]:
        before = _mine()
        return before, blackout_priority(), _mine()

    before, saved, after = _in_thread(run)
    assert saved is None and after == before


@needs_rt
def test_boost_thread_leaves_real_time_when_asked_for_nice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The post-copy push thread was real-time for the switch: its own boost (a nice value)
    must take it out of SCHED_FIFO, not leave it there."""
    monkeypatch.delenv("LIVEMIG_NO_RT", raising=False)

    def run() -> tuple[int, int, int]:
        blackout_priority()
        boost_thread()
        return _mine()

    policy, _prio, nice = _in_thread(run)
    assert policy == os.SCHED_OTHER and nice == URGENT_NICE


def _sched(tid: int) -> tuple[int, int, int]:
    """(policy without SCHED_RESET_ON_FORK, priority, nice) of thread ``tid``."""
    return (os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK,
            os.sched_getparam(tid).sched_priority, os.getpriority(os.PRIO_PROCESS, tid))  # fmt: skip


@needs_rt
def test_process_threads_real_time_for_post_copy_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Post-copy's request threads need the interpreter lock: every other normal thread is made
    real-time while it lasts (none may hold the lock while waiting for a CPU), except the
    caller and ``skip``; the threads they start run normally; all is undone after."""
    monkeypatch.delenv("LIVEMIG_NO_RT", raising=False)
    stop = threading.Event()
    ids: dict[str, int] = {}
    started: list[tuple[int, int, int]] = []

    def worker(name: str, nice: int) -> None:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        ids[name] = threading.get_native_id()
        stop.wait()

    def spawner() -> None:
        ids["spawner"] = threading.get_native_id()
        stop.wait(0.5)  # boosted meanwhile: what it starts now must not inherit that

        def child() -> None:
            started.append(_sched(threading.get_native_id()))

        t = threading.Thread(target=child)
        t.start()
        t.join(5)
        stop.wait()

    threads = [threading.Thread(target=worker, args=("qmp", 3)),
               threading.Thread(target=worker, args=("vcpu", 0)),
               threading.Thread(target=spawner)]  # fmt: skip
    for t in threads:
        t.start()
    try:
        while len(ids) < 3:
            time.sleep(0.01)

        def run() -> tuple[Any, ...]:
            me = _mine()
            saved = boost_process_threads(frozenset({ids["vcpu"]}))
            try:
                during = {n: _sched(t) for n, t in ids.items()}
                time.sleep(0.6)  # the spawner starts its child while boosted
                return me, _mine(), during
            finally:
                restore_threads(saved)

        me_before, me_during, during = _in_thread(run)
        after = {n: _sched(t) for n, t in ids.items()}
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert me_during == me_before  # the caller keeps its own
    assert during["qmp"][:2] == (os.SCHED_FIFO, RT_PRIORITY)
    assert during["spawner"][:2] == (os.SCHED_FIFO, RT_PRIORITY)
    assert during["vcpu"][0] == os.SCHED_OTHER  # skipped
    assert started and started[0][0] == os.SCHED_OTHER  # SCHED_RESET_ON_FORK
    assert after["qmp"] == (os.SCHED_OTHER, 0, 3) and after["spawner"][0] == os.SCHED_OTHER


def test_process_threads_unchanged_with_livemig_no_rt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_NO_RT", "1")
    assert _in_thread(lambda: boost_process_threads()) == []
