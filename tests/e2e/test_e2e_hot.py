"""Hot chunks end to end: a flat-out guest's working set is left writable between syncs during
pre-copy (``x-hot-pages`` in query-migrate), and the migration still delivers identical RAM;
``x-dirty-hot-chunks`` off keeps every page protected."""

from __future__ import annotations

import pytest

from livemig.testing.procs import ProcHarness, free_tcp_port, wait_until

from .test_e2e_precopy import check_completed_source, check_guest_continues

# 16 MiB rewritten flat out over a 32 MiB/s link, 50 ms allowed downtime: every pass finds the
# whole working set dirty, so it never converges until the limit is raised.
GUEST = "ws=16M rate=0"
HELD = {"max-bandwidth": 32 << 20, "downtime-limit": 50}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("hot", [True, False], ids=["hot", "off"])
def test_hot_chunks_then_complete_verified(harness: ProcHarness, hot: bool) -> None:
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    src = harness.source(append=GUEST)
    dst = harness.destination(incoming=uri)
    before = src.wait_passes_increase(0, timeout=20)
    assert before["ok"], before["problems"]
    harness.migrate(src, uri, caps={"events": True, "return-path": True, "x-verify": True},
                    params={**HELD, "x-dirty-hot-chunks": hot})  # fmt: skip
    seen: list[int] = []

    def synced(n: int) -> bool:
        ram = src.query_migrate().get("ram", {})
        seen.append(ram.get("x-hot-pages", 0))
        return ram.get("dirty-sync-count", 0) >= n

    wait_until(lambda: synced(5), 40, "5 dirty syncs")
    if hot:
        # most of the 16 MiB (4096 pages, eight 2 MiB chunks) stayed writable at some point
        assert max(seen) >= 2048, seen
    else:
        assert max(seen) == 0, seen
    src.cmd("migrate-set-parameters", **{"downtime-limit": 2000})  # now it fits: complete
    info = src.wait_migration(timeout=60)
    check_completed_source(src, info)
    at_source = src.guest_check()
    assert at_source["ok"], at_source["problems"]
    assert dst.query_migrate()["x-verify"] == {"equal": True, "state-equal": True}
    check_guest_continues(dst, at_source)
