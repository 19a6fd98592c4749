"""Real-time scheduling for the thread that carries a switch-over, while the guest is stopped.

While the guest is stopped every millisecond counts, and the thread that carries the switch-over
is runnable for only a few of them. As a normal thread it waited now and then for a busy core's
time slice (another guest's vCPU, a neighbour process, a helper thread of our own): on 2 cores
that put 5-15 ms into a 3 ms post-copy switch (``livemig bench matrix``'s blackout column). For
the blackout only, it runs SCHED_FIFO at the lowest real-time priority; the kernel's RT
throttling still leaves other threads 5% of a core whatever happens. Not permitted (no
CAP_SYS_NICE) or ``LIVEMIG_NO_RT`` set: the thread runs as before.

Post-copy's request path is real-time on both sides (``postcopy_source``, ``postcopy_dest``)
and needs the interpreter lock: for that phase ``boost_process_threads`` makes the process's
other threads real-time too, so that none holds the lock while waiting for a CPU.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

RT_PRIORITY = 1  # the lowest SCHED_FIFO priority: above every normal thread, below the kernel's

ThreadPriority = tuple[int, int, int]  # scheduling policy, its priority, nice
SavedThread = tuple[int, int, int]  # thread id, scheduling policy, nice


def blackout_priority() -> ThreadPriority | None:
    """Make the calling thread real-time; what to hand back to ``restore_priority``.

    ``None`` when nothing changed: not permitted, ``LIVEMIG_NO_RT``, or the thread is not a
    normal (SCHED_OTHER) thread to begin with (it is real-time already, or batch on purpose).
    """
    if os.environ.get("LIVEMIG_NO_RT") is not None:
        return None
    tid = threading.get_native_id()
    try:
        saved = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority,
                 os.getpriority(os.PRIO_PROCESS, tid))  # fmt: skip
        if saved[0] != os.SCHED_OTHER:
            return None
        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
        return saved
    except (OSError, AttributeError) as exc:
        log.debug("switch-over thread not real-time: %s", exc)
        return None


def restore_priority(saved: ThreadPriority | None) -> None:
    """Undo ``blackout_priority`` on the calling thread (nothing if it changed nothing)."""
    if saved is None:
        return
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, saved[0], os.sched_param(saved[1]))
        os.setpriority(os.PRIO_PROCESS, tid, saved[2])
    except OSError as exc:
        log.debug("switch-over thread priority not restored: %s", exc)


def boost_process_threads(skip: frozenset[int] = frozenset()) -> list[SavedThread]:
    """Make every normal (SCHED_OTHER) thread of this process but the caller and ``skip``
    real-time at ``RT_PRIORITY``; what to hand to ``restore_threads``.

    For the post-copy phase, whose request path needs the interpreter lock: a normal thread
    that holds it (a QMP thread answering ``query-migrate``) can be descheduled by any other
    process's thread on a loaded host, and the real-time request thread then waits for the
    lock until it gets a CPU again. The threads these start run normally
    (``SCHED_RESET_ON_FORK``). Nothing changes when not permitted or with ``LIVEMIG_NO_RT``.
    """
    if os.environ.get("LIVEMIG_NO_RT") is not None:
        return []
    me = threading.get_native_id()
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []
    saved = []
    for tid in tids:
        if tid == me or tid in skip:
            continue
        try:
            if os.sched_getscheduler(tid) != os.SCHED_OTHER:
                continue
            nice = os.getpriority(os.PRIO_PROCESS, tid)
            os.sched_setscheduler(tid, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                                  os.sched_param(RT_PRIORITY))  # fmt: skip
            saved.append((tid, os.SCHED_OTHER, nice))
        except OSError as exc:  # not permitted, or the thread has just ended
            log.debug("thread %d not made real-time: %s", tid, exc)
    return saved


def restore_threads(saved: list[SavedThread]) -> None:
    """Undo ``boost_process_threads`` (threads that have ended meanwhile are left out)."""
    for tid, policy, nice in saved:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            pass
