"""x-io-timeout in post-copy: a quiet main channel is no failure; a source that leaves the
guest waiting for a page without a sign of life for x-io-timeout is one (postcopy-paused)."""

from __future__ import annotations

import time

from livemig.guests.memstress import check_invariant
from livemig.migration.postcopy_source import migrate_recover, start_postcopy

TIMEOUT_MS = 300


def _switch(p) -> None:
    p.wait_guest()
    p.start()
    p.wait_pass(1)
    start_postcopy(p.sm)
    p.wait("src", {"postcopy-active"})
    p.wait("dst", {"postcopy-active"})


def _finish_and_check(p) -> dict:
    assert p.wait("dst", {"completed", "failed"}) == "completed", p.dm.query_migrate()
    assert p.wait("src", {"completed", "failed"}) == "completed", p.sm.query_migrate()
    dst_q = p.dm.query_migrate()
    assert dst_q["x-verify"] == {"equal": True, "state-equal": True}
    p.dst.pause()
    report = check_invariant(p.dst.read_guest)
    assert report.ok, report
    return dst_q


def test_quiet_main_channel_does_not_pause(pair) -> None:
    # With preempt the requested pages travel on their own channel; a starved background push
    # (1 byte/s) leaves the main channel silent for many x-io-timeouts while the guest runs.
    p = pair(ram=32 << 20, append="ws=8M rate=1500")
    p.caps(postcopy_ram=True, postcopy_preempt=True, events=True)
    p.params(x_io_timeout=TIMEOUT_MS, max_postcopy_bandwidth=1, max_bandwidth=4 << 20)
    _switch(p)
    out = p.sm.outgoing
    sent0 = out.postcopy.pushed
    time.sleep(4 * TIMEOUT_MS / 1000)
    pc = p.dm.query_migrate()["x-postcopy"]
    assert p.dm.dest.status.value == "postcopy-active", p.dm.dest.error
    assert ("dst", "postcopy-paused") not in p.events
    assert out.postcopy.pushed - sent0 <= 1, "the background push was supposed to be starved"
    assert pc["requests"] > 0 and pc["pages-missing"] > 0  # the guest ran on requested pages
    out.rate.rate = 0  # let the push finish
    out._wake.set()
    dst_q = _finish_and_check(p)
    assert ("dst", "postcopy-paused") not in p.events
    assert dst_q["x-postcopy"]["pages-missing"] == 0


def test_unanswered_requests_pause(pair, tmp_path) -> None:
    p = pair(ram=32 << 20, append="ws=8M rate=1500")
    p.caps(postcopy_ram=True, events=True)
    p.params(x_io_timeout=TIMEOUT_MS, max_postcopy_bandwidth=1, max_bandwidth=4 << 20)
    _switch(p)
    # The source stops answering (its post-copy lock held: no request served, nothing pushed)
    # while the link itself stays up: the destination must give up on it by itself.
    pc = p.sm.outgoing.postcopy
    t0 = time.monotonic()
    with pc.lock:
        p.wait("dst", {"postcopy-paused"}, timeout=10)
        waited = time.monotonic() - t0
    assert TIMEOUT_MS / 1000 <= waited < 3 * TIMEOUT_MS / 1000 + 2
    assert "unanswered" in (p.dm.dest.error or "")
    p.wait("src", {"postcopy-paused"})
    new = f"unix:{tmp_path / 'recover.sock'}"
    migrate_recover(p.dm, new)
    p.sm.outgoing.rate.rate = 0
    p.sm.migrate(new, resume=True)
    _finish_and_check(p)
