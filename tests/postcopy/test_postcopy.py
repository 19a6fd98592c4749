"""Post-copy end to end in one process: switch, requests, background push, verification."""

from __future__ import annotations

from livemig.guests.memstress import check_invariant
from livemig.machine.runstate import RunState


def test_postcopy_completes_and_verifies(pair) -> None:
    p = pair()
    p.caps(postcopy_ram=True, postcopy_blocktime=True, events=True)
    p.params(max_bandwidth=64 << 20)  # slow enough that pre-copy is still busy
    p.start()
    p.wait_pass(1)
    p.sm.outgoing.postcopy.start_postcopy()
    assert p.wait("dst", {"completed", "failed"}) == "completed", p.dm.query_migrate()
    assert p.wait("src", {"completed", "failed"}) == "completed", p.sm.query_migrate()
    src_q, dst_q = p.sm.query_migrate(), p.dm.query_migrate()
    assert src_q["x-verified"] is True
    assert dst_q["x-verify"] == {"equal": True}
    assert p.src.runstate == RunState.POSTMIGRATE
    assert p.dst.runstate == RunState.RUNNING
    assert "postcopy-blocktime" in dst_q
    assert ("src", "postcopy-active") in p.events and ("dst", "postcopy-active") in p.events
    p.dst.pause()
    report = check_invariant(p.dst.read_guest)
    assert report.ok, report
