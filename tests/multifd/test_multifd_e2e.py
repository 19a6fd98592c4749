"""End-to-end multifd migrations between two machines in this process: every channel count and
compression method, the memstress invariant and the RAM hashes checked on the destination."""

from __future__ import annotations

import time

import pytest

from livemig.guests.memstress import check_invariant
from livemig.migration.multifd import MAX_JOB_PAGES, MultifdSender

from .conftest import MakePair


@pytest.mark.parametrize(
    ("channels", "compression"),
    [(1, "none"), (2, "none"), (4, "none"), (2, "zlib"), (2, "zstd"), (4, "zstd")],
)
def test_multifd_migration(make_pair: MakePair, channels: int, compression: str) -> None:
    p = make_pair("ws=4M rate=20000")
    # 2 MiB of text-like data in RAM memstress does not use: compressible, unlike its pages
    words = b" ".join(b"page%d migration multifd" % i for i in range(80000))
    p.src.write_guest(14 << 20, words[: 2 << 20])
    time.sleep(0.3)  # let memstress fill its working set
    p.configure(
        {"x-verify": True, "return-path": True, "multifd": True},
        {"multifd-channels": channels, "multifd-compression": compression},
    )
    src, dst = p.migrate()
    assert src["status"] == "completed", src
    assert dst["status"] == "completed", dst
    assert src["x-verified"] is True and dst["x-verify"]["equal"] is True
    ram = src["ram"]
    assert ram["multifd-bytes"] > 0
    assert ram["normal"] >= 1024  # the 4 MiB working set went through the channels
    if compression != "none":
        # memstress pages are a hash pattern (incompressible), the text is compressible
        assert ram["multifd-bytes"] < ram["normal-bytes"]
    assert ram["dirty-sync-count"] >= 2
    p.dst.pause()
    report = check_invariant(p.dst.read_guest)
    assert report.ok, report.problems


def test_multifd_zero_pages_found_by_channels(make_pair: MakePair) -> None:
    """A guest whose RAM is mostly zero: the channel threads send those as zero pages."""
    p = make_pair("ws=1M rate=1000")
    time.sleep(0.2)
    p.configure({"x-verify": True, "return-path": True, "multifd": True}, {"multifd-channels": 2})
    src, _ = p.migrate()
    assert src["status"] == "completed", src
    assert src["ram"]["duplicate"] > src["ram"]["normal"]
    assert src["x-verified"] is True  # RAM hashes equal at switch-over


def test_mostly_zero_guest_in_big_jobs_with_checksums(
    make_pair: MakePair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle-like guest (one page in 64 holds data) goes in jobs of up to MAX_JOB_PAGES
    pages, each closed by its checksum trailer: the destination checks them all and its RAM
    equals the source's."""
    sizes: list[int] = []
    send_batches = MultifdSender.send_batches

    def spy(self: MultifdSender, batches: list) -> int:
        sizes.append(self.job_pages)
        return send_batches(self, batches)

    monkeypatch.setattr(MultifdSender, "send_batches", spy)
    p = make_pair("ws=1M rate=1000", ram=96 << 20)
    time.sleep(0.2)
    p.src.write_guest(16 << 20, bytes(80 << 20))  # zero pages, but populated: sent
    marks = b"".join(b"%-4096d" % i for i in range(0, 80 << 20 >> 12, 64))
    for i in range(0, len(marks), 4096):
        p.src.write_guest((16 << 20) + i * 64, marks[i : i + 4096])
    p.configure({"x-verify": True, "x-checksums": True, "return-path": True, "multifd": True},
                {"multifd-channels": 2})  # fmt: skip
    src, dst = p.migrate()
    assert src["status"] == "completed", src
    assert dst["status"] == "completed", dst
    assert src["x-verified"] is True and dst["x-verify"]["equal"] is True
    assert src["ram"]["duplicate"] > 10 * src["ram"]["normal"]
    assert max(sizes) == MAX_JOB_PAGES


def test_multifd_is_held_to_max_bandwidth(make_pair: MakePair) -> None:
    """Pages queued to the channels are charged to max-bandwidth when queued, so pre-copy never
    runs faster than the limit (a busy host can only make it slower)."""
    p = make_pair("ws=16M rate=100", ram=64 << 20, smp=1)
    time.sleep(0.5)  # memstress has filled its working set
    limit = 8 << 20
    p.configure({"multifd": True}, {"multifd-channels": 2})
    p.src_mgr.set_parameters({"max-bandwidth": limit})
    src, _ = p.migrate(timeout=60)
    assert src["status"] == "completed", src
    ram = src["ram"]
    precopy_s = (src["total-time"] - src["downtime"] - src["setup-time"]) / 1000
    assert ram["precopy-bytes"] > 8 << 20
    # at most the limit, with one 100 ms window of slack
    assert ram["precopy-bytes"] <= limit * (precopy_s + 0.1) * 1.05, (ram, precopy_s)


@pytest.mark.parametrize(
    ("multifd", "detection"),
    [(True, "multifd"), (True, "legacy"), (True, "none"), (False, "legacy"), (False, "none")],
)
def test_zero_page_detection(make_pair: MakePair, multifd: bool, detection: str) -> None:
    """QEMU 9.0's zero-page-detection: "multifd" finds zero pages in the channel threads,
    "legacy" in the migration thread (sent as ZERO records on the main channel), "none"
    nowhere (every populated page goes as a normal one). The guest arrives intact each way."""
    p = make_pair("ws=1M rate=1000")
    zeros = 2 << 20
    p.src.write_guest(12 << 20, bytes(zeros))  # populated pages that read as zero
    time.sleep(0.2)
    caps = {"x-verify": True, "return-path": True, "multifd": multifd}
    p.configure(caps, {"zero-page-detection": detection})
    src, dst = p.migrate()
    assert src["status"] == "completed", src
    assert dst["status"] == "completed", dst
    assert src["x-verified"] is True and dst["x-verify"]["equal"] is True
    ram = src["ram"]
    if detection == "none":
        # the zeroed region and the working set, all as data
        assert ram["normal"] >= (zeros + (1 << 20)) // 4096, ram
    else:
        assert ram["duplicate"] >= zeros // 4096, ram
    if multifd:
        found_by_channels = p.dst_mgr.incoming.multifd.zero_pages
        if detection == "multifd":
            assert found_by_channels >= zeros // 4096
        else:
            assert found_by_channels == 0
    p.dst.pause()
    report = check_invariant(p.dst.read_guest)
    assert report.ok, report.problems


@pytest.mark.parametrize("detection", ["multifd", "none"])
def test_postcopy_after_multifd_finds_zero_pages_itself(
    make_pair: MakePair, detection: str
) -> None:
    """Post-copy pages never go by multifd: after the switch the page walk sorts out zero
    pages again (QEMU's migration thread does), unless zero-page-detection is none."""
    from livemig.migration.postcopy_source import start_postcopy

    p = make_pair("ws=1M rate=1000")
    zeros = 2 << 20
    p.src.write_guest(12 << 20, bytes(zeros))  # populated pages that read as zero, high in RAM
    time.sleep(0.2)
    p.configure({"x-verify": True, "return-path": True, "multifd": True, "postcopy-ram": True},
                {"zero-page-detection": detection})  # fmt: skip
    # slow enough that the first pass is still in the low megabytes at the switch
    p.src_mgr.set_parameters({"max-bandwidth": 4 << 20})
    wait = p.migrate_later()
    time.sleep(0.3)
    start_postcopy(p.src_mgr)
    src, dst = wait()
    assert src["status"] == "completed", src
    assert dst["status"] == "completed", dst
    assert src["x-verified"] is True
    ram = src["ram"]
    # The zeroed region, high in RAM, was still dirty at the switch: as data it alone is more
    # than the 1 MiB working set and everything else sent in post-copy; as zero pages, a few
    # bytes a page.
    if detection == "none":
        assert ram["postcopy-bytes"] > zeros, ram
    else:
        assert ram["postcopy-bytes"] < zeros, ram


def test_switchover_ack(make_pair: MakePair) -> None:
    """Capability switchover-ack (QEMU 8.1+): the source switches over only once the destination
    approved; a livemig destination does when its return path opens (no device needs more
    time). Without the approval the source keeps iterating, as QEMU's does, until cancelled;
    it was listed and refused before."""
    p = make_pair("ws=1M rate=2000")
    p.configure({"return-path": True, "switchover-ack": True})
    src, dst = p.migrate()
    assert src["status"] == "completed" and dst["status"] == "completed", (src, dst)

    q = make_pair("ws=1M rate=2000")
    q.src_mgr.set_capabilities([{"capability": c, "state": True}
                                for c in ("return-path", "switchover-ack")])  # fmt: skip
    wait = q.migrate_later(timeout=10)
    time.sleep(1.5)
    info = q.src_mgr.query_migrate()
    assert info["status"] == "active" and info["ram"]["dirty-sync-count"] > 2, info
    q.src_mgr.cancel()
    src, _dst = wait()
    assert src["status"] == "cancelled"
    assert q.src.runstate.value == "running"


def test_query_migrationthreads_lists_the_multifd_send_threads(make_pair: MakePair) -> None:
    """QEMU 10.0's query-migrationthreads: the source's main thread and its multifd send
    threads, by QEMU's names (also their kernel names); the multifd threads were missing.
    With a thread per channel (x-multifd-threads 3) it lists what QEMU would."""
    p = make_pair("ws=8M rate=20000", ram=32 << 20)
    p.configure({"multifd": True}, {"multifd-channels": 3, "max-bandwidth": 4 << 20,
                                    "x-multifd-threads": 3})  # fmt: skip
    wait = p.migrate_later(timeout=30)
    deadline = time.monotonic() + 10
    names: list[str] = []
    while time.monotonic() < deadline:
        names = [t["name"] for t in p.src_mgr.query_threads()]
        if len(names) == 4:
            break
        time.sleep(0.02)
    assert sorted(names) == ["mig/src/main", "mig/src/send_0", "mig/src/send_1", "mig/src/send_2"]
    assert p.dst_mgr.query_threads() == []  # QEMU lists none on a destination
    p.src_mgr.set_parameters({"max-bandwidth": 0})
    src, _dst = wait()
    assert src["status"] == "completed", src


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_channels_and_threads_are_decoupled(make_pair: MakePair, threads: int) -> None:
    """4 channels on the wire (what a QEMU peer needs) filled by 1, 2 or 4 threads on each
    side (x-multifd-threads): the thread list shows the threads, every page arrives, and the
    packet numbers of all channels add up at every sync (the receiver checks)."""
    p = make_pair("ws=8M rate=20000", ram=32 << 20)
    p.configure({"multifd": True}, {"multifd-channels": 4, "x-multifd-threads": threads,
                                    "max-bandwidth": 8 << 20})  # fmt: skip
    wait = p.migrate_later(timeout=60)
    deadline = time.monotonic() + 10
    names: list[str] = []
    while time.monotonic() < deadline and len(names) != threads + 1:
        names = [t["name"] for t in p.src_mgr.query_threads()]
        time.sleep(0.02)
    assert sorted(names) == ["mig/src/main", *(f"mig/src/send_{i}" for i in range(threads))]
    p.src_mgr.set_parameters({"max-bandwidth": 0})
    src, dst = wait()
    assert src["status"] == dst["status"] == "completed", (src, dst)
    p.dst.pause()
    assert check_invariant(p.dst.read_guest).ok
