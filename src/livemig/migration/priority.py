"""Real-time scheduling for the thread that carries a switch-over, while the guest is stopped.

While the guest is stopped every millisecond counts, and the thread that carries the switch-over
is runnable for only a few of them. As a normal thread it waited now and then for a busy core's
time slice (another guest's vCPU, a neighbour process, a helper thread of our own): on 2 cores
that put 5-15 ms into a 3 ms post-copy switch (``livemig bench matrix``'s blackout column). For
the blackout only, it runs SCHED_FIFO at the lowest real-time priority; the kernel's RT
throttling still leaves other threads 5% of a core whatever happens. Not permitted (no
CAP_SYS_NICE) or ``LIVEMIG_NO_RT`` set: the thread runs as before.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

RT_PRIORITY = 1  # the lowest SCHED_FIFO priority: above every normal thread, below the kernel's

ThreadPriority = tuple[int, int, int]  # scheduling policy, its priority, nice


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
