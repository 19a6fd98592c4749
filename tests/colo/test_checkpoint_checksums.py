"""Checkpoints are checked like any livemig stream (issue #22 after #19): one bit flipped in a
checkpoint on its way is caught before the standby applies any of it; the standby stands
down (it must not take over from a copy it can no longer keep up to date) and the primary
goes on unreplicated, saying so, its clients' writes all there."""

from __future__ import annotations

from livemig.testing.procs import ProcHarness, wait_until
from livemig.testing.relay import FlipRelay
from livemig.testing.replication import Writers, answers, audit, start_replicated


def test_a_bit_flipped_in_a_checkpoint_is_never_applied() -> None:
    with ProcHarness(memory="64M", smp=1) as h:
        r = start_replicated(h, defer=True)
        relay = FlipRelay(r.standby.incoming or "")  # flips once armed
        try:
            r.standby.incoming = relay.uri
            writers = Writers(r.port, n=2).start()
            r.start_replication(25)
            wait_until(lambda: writers.count() > 200, 30, "clients writing, replicated")
            relay.armed.set()
            wait_until(relay.flipped.is_set, 30, "a checkpoint chunk to corrupt")
            # the standby refuses it, stands down; the primary goes on alone and says so
            wait_until(lambda: r.primary.cmd("query-colo-status").get("x-replicated") is False,
                       30, "the primary to go on unreplicated")  # fmt: skip
            log = r.standby.log()
            assert "does not match its checksum" in log or "malformed checkpoint" in log, log
            # it never takes over: its incoming migration failed, and livemig run exits 1
            assert r.standby.wait_exit(30) == 1
            before = writers.count()
            wait_until(lambda: writers.count() > before + 100, 30, "clients writing on")
            writers.stop()
            report = audit(r.port, writers)
            assert report["lost"] == report["wrong"] == 0 and report["counter-exact"], report
            assert not report["errors"], report
            assert answers(r.port)
        finally:
            relay.close()
