"""A guest that survives its host (issue #22): real primary, standby and front processes.

Clients write through the front (``livemig.testing.replication``) while the guest is
replicated; the primary is SIGKILLed at a random moment (once right after the standby, briefly
stopped, took a checkpoint in that the primary never heard acknowledged); the standby takes
over and the front
moves the clients there. Every key a client was told was written is read back (zero lost, zero
wrong), the counter's replies run 1, 2, 3, ... with no gap or repeat (no request lost or run
twice), and no client saw an error. Then the same through two failovers in a row (the standby
that took over replicates to a new one), memstress's invariant on a standby that took over,
and what replication does when the standby dies, is asked to take over or is told to stand
down, or the primary dies during the first migration.
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any

import pytest

from livemig.testing.procs import ProcHarness, free_tcp_port, wait_until
from livemig.testing.replication import (
    Writers,
    answers,
    audit,
    kill_and_wait_takeover,
    replicate,
    start_replicated,
)

SEED = random.randrange(1 << 30)


def _clean(result: dict) -> None:
    assert result["errors"] == [], result
    assert (result["lost"], result["wrong"]) == (0, 0), result
    assert result["counter-exact"], result


@pytest.mark.timeout(120)
@pytest.mark.parametrize("round_", range(2))
def test_kill_the_primary_at_a_random_moment_loses_no_acknowledged_write(round_: int) -> None:
    rng = random.Random(SEED + round_)
    with ProcHarness() as h:
        r = start_replicated(h, delay_ms=rng.choice((25, 50)))
        w = Writers(r.port, seed=rng.getrandbits(32)).start()
        wait_until(lambda: w.count() > 50, 30, "clients writing")
        if round_ == 0:
            # the standby stops for a moment: it holds the last checkpoint (in its socket) when
            # the primary dies without having heard it acknowledged, so the replies of that
            # epoch were never released: the standby releases them
            r.standby.signal(signal.SIGSTOP)
            time.sleep(0.1)
            r.primary.kill()
            r.standby.signal(signal.SIGCONT)
        took = kill_and_wait_takeover(r, 0 if round_ == 0 else rng.uniform(0, 1.5))
        before = w.count()
        wait_until(lambda: w.count() > before + 100, 30, "clients writing after the failover")
        w.stop()
        result = audit(r.port, w)
        _clean(result)
        colo = took["colo"]
        assert colo["x-took-over"] and colo["last-mode"] == "secondary", colo
        assert r.front.cmd("x-query-front")["failovers"] == 1
        # the standby is not replicated itself, and says so to the front
        assert r.front.cmd("x-query-front")["successor"] is None


@pytest.mark.timeout(150)
def test_two_failovers_in_a_row_and_direct_clients_are_refused_on_a_standby() -> None:
    """A standby that took over replicates to a new standby; the front follows twice."""
    with ProcHarness() as h:
        r = start_replicated(h)
        # a standby does not serve clients of its own address
        assert not answers(r.serve[r.standby.name])
        w = Writers(r.port, seed=SEED).start()
        wait_until(lambda: w.count() > 50, 30, "clients writing")
        kill_and_wait_takeover(r, 0.3)
        r.new_standby()
        wait_until(lambda: r.front.cmd("x-query-front")["successor"], 10, "the new standby")
        before = w.count()
        wait_until(lambda: w.count() > before + 50, 30, "clients writing, replicated again")
        kill_and_wait_takeover(r, random.Random(SEED).uniform(0, 0.5))
        before = w.count()
        wait_until(lambda: w.count() > before + 50, 30, "clients writing after the second")
        w.stop()
        _clean(audit(r.port, w))
        assert r.front.cmd("x-query-front")["failovers"] == 2


def _kill_while_sending(src: Any, dst: Any) -> None:
    """Stop the standby; once the primary is seen sending the same checkpoint twice 50 ms apart
    (blocked: a checkpoint of MBs does not fit the socket), SIGKILL it, then continue the
    standby. Each stop is far shorter than the heartbeat time-out."""
    for _ in range(40):
        dst.signal(signal.SIGSTOP)
        first = src.cmd("query-colo-status").get("x-sending")
        time.sleep(0.05)
        if first and src.cmd("query-colo-status").get("x-sending") == first:
            src.kill()
            dst.signal(signal.SIGCONT)
            return
        dst.signal(signal.SIGCONT)
        time.sleep(random.uniform(0.01, 0.05))
    raise AssertionError("the primary was never seen blocked sending a checkpoint")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inside", [True, False], ids=["inside-a-checkpoint", "at-random"])
def test_memstress_invariant_holds_on_a_standby_that_took_over(inside: bool) -> None:
    """A guest that dirties 80 MB/s makes checkpoints of MBs. ``inside``: the standby is
    stopped (SIGSTOP) for a moment, so that the primary's next checkpoint fills the socket and
    waits, and the primary is SIGKILLed right then: the standby gets part of a checkpoint, then
    the end of the stream. It drops that part and runs the guest on from the last whole
    checkpoint: the invariant holds and the guest keeps running. ``at-random``: a kill at a
    random moment."""
    with ProcHarness(memory="64M", smp=2) as h:
        src = h.source(append="ws=16M rate=20000")
        dst = h.destination()
        replicate(src, dst.incoming or "", 25)
        time.sleep(random.Random(SEED).uniform(0.2, 0.6))
        if inside:
            _kill_while_sending(src, dst)
        else:
            src.kill()
        dst.wait_status("running", 30)
        colo = dst.cmd("query-colo-status")
        assert colo["x-took-over"], colo
        if inside:
            assert colo["x-partial-discarded"] == 1, colo
            assert "received in part, is discarded" in colo["x-how"], colo
        report = dst.guest_check()
        assert report["ok"], report["problems"]
        dst.wait_passes_increase(report["total-passes"])


@pytest.mark.timeout(120)
def test_two_fronts_one_started_after_replication_both_fail_over() -> None:
    """A front that connects to a replicated guest learns its standby; two fronts' clients
    survive the same failover (each reopens its own connections only)."""
    with ProcHarness() as h:
        r = start_replicated(h)
        pf = free_tcp_port()
        late = h.front(f"tcp:127.0.0.1:{r.serve[r.primary.name]}", f"tcp:127.0.0.1:{pf}")
        wait_until(lambda: late.cmd("x-query-front")["successor"], 10, "the standby's address")
        writers = [Writers(port, seed=SEED + i, prefix=f"f{i}:").start()
                   for i, port in enumerate((r.port, pf))]  # fmt: skip
        wait_until(lambda: min(w.count() for w in writers) > 30, 30, "clients writing")
        kill_and_wait_takeover(r, 0.2)
        wait_until(lambda: late.cmd("x-query-front")["failovers"] == 1, 10, "its failover")
        before = [w.count() for w in writers]
        wait_until(lambda: all(w.count() > b + 50 for w, b in zip(writers, before, strict=True)),
                   30, "clients of both fronts writing after the failover")  # fmt: skip
        for w, port in zip(writers, (r.port, pf), strict=True):
            w.stop()
            _clean(audit(port, w))


@pytest.mark.timeout(120)
def test_the_standby_dies_and_the_primary_goes_on_unreplicated_and_says_so() -> None:
    with ProcHarness() as h:
        r = start_replicated(h)
        w = Writers(r.port, seed=SEED).start()
        wait_until(lambda: w.count() > 50, 30, "clients writing")
        r.standby.kill()
        wait_until(lambda: r.primary.cmd("query-colo-status")["mode"] == "none", 10,
                   "replication to end")  # fmt: skip
        colo = r.primary.cmd("query-colo-status")
        assert colo["reason"] == "error" and "standby" in colo["x-error"], colo
        assert r.primary.query_migrate()["status"] == "completed"
        exits = r.primary.event_names("COLO_EXIT")
        assert exits and exits[-1][1] == {"mode": "primary", "reason": "error"}
        wait_until(lambda: "UNREPLICATED" in r.primary.log(), 10, "the primary's word")
        wait_until(lambda: r.front.cmd("x-query-front")["successor"] is None, 10,
                   "the front to hear there is no standby")  # fmt: skip
        before = w.count()
        wait_until(lambda: w.count() > before + 200, 30, "clients writing, unreplicated")
        w.stop()
        _clean(audit(r.port, w))
        assert r.primary.status() == "running"


@pytest.mark.timeout(120)
def test_lost_heartbeat_on_either_side() -> None:
    """x-colo-lost-heartbeat on the primary ends replication and the standby stands down
    (X_EXIT: it must not take over); on a standby it takes over at once."""
    with ProcHarness() as h:
        r = start_replicated(h)
        r.primary.cmd("x-colo-lost-heartbeat")
        r.standby.wait_exit(15)  # stood down: a standby whose replication ended exits
        assert "stood down" in r.standby.log() and "X_EXIT" in r.standby.log()
        colo = r.primary.cmd("query-colo-status")
        assert (colo["mode"], colo["last-mode"], colo["reason"]) == ("none", "primary", "request")
        assert answers(r.port)
        with pytest.raises(Exception, match="not in COLO mode"):
            r.primary.cmd("x-colo-lost-heartbeat")
    with ProcHarness() as h:
        r = start_replicated(h)
        w = Writers(r.port, seed=SEED).start()
        wait_until(lambda: w.count() > 30, 30, "clients writing")
        r.standby.cmd("x-colo-lost-heartbeat")
        r.standby.wait_status("running", 10)
        colo = r.standby.cmd("query-colo-status")
        assert colo["x-took-over"] and colo["reason"] == "request", colo
        # the primary lost its standby (the takeover closed the connection) and says so
        wait_until(lambda: r.primary.cmd("query-colo-status")["mode"] == "none", 10, "primary")
        w.stop()
        _clean(audit(r.port, w))


@pytest.mark.timeout(120)
def test_the_primary_dies_during_the_first_migration() -> None:
    """No complete state yet: the standby must not run anything, and the front's clients are
    told the service is gone instead of waiting for ever."""
    with ProcHarness(memory="128M") as h:
        src = h.source(append="ws=64M rate=20000", memory="128M")
        dst = h.destination(memory="128M")
        src.cmd("migrate-set-capabilities", capabilities=[
            {"capability": c, "state": True} for c in ("return-path", "x-colo")])  # fmt: skip
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})  # a slow first pass
        src.cmd("migrate", uri=dst.incoming)
        wait_until(lambda: src.query_migrate().get("status") == "active", 30, "first migration")
        time.sleep(random.Random(SEED).uniform(0.1, 1.0))
        src.kill()
        assert dst.wait_exit(15) != 0
        assert "incoming migration failed" in dst.log()
