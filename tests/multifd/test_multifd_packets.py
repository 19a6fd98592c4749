"""Multifd packets on both sides of one channel. The source's fast path for a run of data pages
writes the same bytes as the general path (QEMU's layout). The destination places exactly the
pages each packet names: a packet that only looks like a run (out of order, repeated, past the
block's end) is placed page by page or refused."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.errors import MigrationError, StreamError
from livemig.machine.ram import RAMBlock
from livemig.migration.multifd import (
    JOB_PAGES,
    MAX_JOB_PAGES,
    MultifdReceiver,
    MultifdSender,
    _run_sum,
    _Scan,
)
from livemig.savevm.ram import Batch, RamLoader
from livemig.transport.channel import Channel
from livemig.wire.multifd import MultifdPacket

NPAGES = 1024
PAGE = 4096


class Rx:
    """One receive channel over a socketpair, the writer end kept by the test."""

    def __init__(self) -> None:
        self.block = RAMBlock("pc.ram", NPAGES * PAGE, prefault=True)
        self.loader = RamLoader([self.block])
        a, b = socket.socketpair()
        self.tx = a
        self.rx = MultifdReceiver(self.loader, [Channel.from_socket(b, "multifd 0")], timeout=5)
        self.num = 0
        self.sent: dict[int, bytes] = {}

    def send(self, pages: list[int]) -> None:
        """One packet of ``pages`` (in that order), each filled with a byte of its own."""
        data = b"".join(bytes([(p * 7 + self.num) % 251 + 1]) * PAGE for p in pages)
        offs = np.array(pages, np.uint64) << np.uint64(12)
        self.tx.sendall(MultifdPacket(0, self.num, "pc.ram", offs, len(pages)).pack() + data)
        for i, p in enumerate(pages):
            self.sent[p] = data[i * PAGE : (i + 1) * PAGE]
        self.num += 1

    def finish(self) -> str | None:
        self.tx.shutdown(socket.SHUT_WR)
        (w,) = self.rx.workers
        w.thread.join(5)
        assert not w.thread.is_alive()
        err = self.rx.error
        self.rx.close()
        self.tx.close()
        return err

    def check(self) -> None:
        arr = self.block.array.reshape(-1, PAGE)
        touched = self.loader.touched["pc.ram"]
        for p in range(NPAGES):
            if p in self.sent:
                assert arr[p].tobytes() == self.sent[p], f"page {p}"
            else:
                assert not arr[p].any(), f"page {p} written but never sent"
        assert sorted(np.flatnonzero(touched).tolist()) == sorted(self.sent)
        assert np.array_equal(touched, self.loader.received["pc.ram"])


@pytest.fixture
def rx() -> Rx:
    return Rx()


def test_runs_and_scattered_pages_land_where_named(rx: Rx, monkeypatch: pytest.MonkeyPatch) -> None:
    full = []
    unpack = MultifdPacket.unpack.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(MultifdPacket, "unpack",
                        classmethod(lambda cls, *a, **k: full.append(1) or unpack(cls, *a, **k)))  # fmt: skip
    rx.send(list(range(0, 128)))
    rx.send(list(range(128, 256)))  # same block, a run: the fast path
    rx.send([300, 302, 301, 303])  # a run's range, out of order: placed run by run
    rx.send(list(range(400, 410)))
    rx.send([500])
    rx.send(list(range(NPAGES - 128, NPAGES)))  # a run ending at the block's end
    assert rx.finish() is None
    rx.check()
    assert rx.rx.channels[0].packets == 6
    assert rx.rx.normal_pages == 128 + 128 + 4 + 10 + 1 + 128
    assert len(full) == 1  # the first packet; the others, runs or not, went fast


def test_repeated_page_in_a_run_shaped_packet(rx: Rx) -> None:
    rx.send(list(range(0, 128)))
    # first and last are a run's (600..603) but 601 comes twice and 602 never: only the pages
    # named are written, the second 601 last
    rx.send([600, 601, 601, 603])
    assert rx.finish() is None
    assert 602 not in rx.sent
    rx.check()


def test_run_past_the_block_end_is_refused(rx: Rx) -> None:
    rx.send(list(range(0, 128)))
    rx.send(list(range(NPAGES - 2, NPAGES + 2)))
    err = rx.finish()
    assert err is not None and "offset outside block 'pc.ram'" in err
    assert not rx.block.array.reshape(-1, PAGE)[NPAGES - 2 :].any()


def test_unaligned_run_is_refused(rx: Rx) -> None:
    rx.send(list(range(0, 128)))
    offs = (np.arange(4, dtype=np.uint64) << np.uint64(12)) + np.uint64(8)
    rx.tx.sendall(MultifdPacket(0, 9, "pc.ram", offs, 4).pack() + bytes(4 * PAGE))
    err = rx.finish()
    assert err is not None and "offset outside block" in err


def test_large_run_after_small_one(rx: Rx) -> None:
    # the cached block comes from the first packet, however small
    rx.send([7])
    rx.send(list(range(8, 136)))
    assert rx.finish() is None
    rx.check()


def _sent_bytes(idx: np.ndarray, zero_detect: bool = True) -> tuple[bytes, RAMBlock]:
    """What one multifd send channel writes for a job of pages ``idx`` (after its init
    packet)."""
    block = RAMBlock("pc.ram", NPAGES * PAGE, prefault=True)
    rows = block.array.reshape(-1, PAGE)
    rows[:] = (np.arange(NPAGES) % 250 + 1)[:, None]
    rows[5] = 0  # a zero page
    a, b = socket.socketpair()
    got: list[bytes] = []

    def drain() -> None:
        while chunk := b.recv(1 << 20):
            got.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    snd = MultifdSender([block], [Channel.from_socket(a, "multifd 0")], timeout=5,
                        zero_detect=zero_detect)  # fmt: skip
    snd.send_batches([Batch(block, idx, idx[:0])])
    snd.sync()
    snd.close()
    reader.join(5)
    b.close()
    return b"".join(got)[64:], block


@pytest.mark.parametrize("first,count", [(6, 128), (10, 300), (NPAGES - 129, 129), (3, 1)])
def test_sender_packets_of_a_run_are_qemus(first: int, count: int) -> None:
    """A job that is one run of data pages goes out byte for byte as the general path (and
    QEMU) lays it out: 128-page packets, offsets padded to pages_alloc, then the pages."""
    idx = np.arange(first, first + count)
    data, block = _sent_bytes(idx)
    want = b""
    for num, at in enumerate(range(0, count, 128)):
        pages = idx[at : at + 128]
        offs = pages.astype(np.uint64) << np.uint64(12)
        want += MultifdPacket(0, num, "pc.ram", offs, len(pages)).pack()
        want += block.view[int(pages[0]) * PAGE : (int(pages[-1]) + 1) * PAGE].tobytes()
    sync = MultifdPacket(1, count // 128 + bool(count % 128), "", np.empty(0, np.uint64), 0)
    assert data == want + sync.pack()


def _qemu_packets(idx: np.ndarray, block: RAMBlock, zero: set[int], first_num: int = 0) -> bytes:
    """QEMU's layout of a job, built packet by packet: the next 128 pages of the job each,
    its normal pages' offsets then its zero pages', then the normal pages' data."""
    out = b""
    for num, at in enumerate(range(0, len(idx), 128), first_num):
        chunk = idx[at : at + 128].tolist()
        normal = [p for p in chunk if p not in zero]
        zpages = [p for p in chunk if p in zero]
        offs = np.array(normal + zpages, np.uint64) << np.uint64(12)
        out += MultifdPacket(0, num, "pc.ram", offs, len(normal), len(zpages)).pack()
        out += b"".join(block.view[p * PAGE : (p + 1) * PAGE].tobytes() for p in normal)
    return out


@pytest.mark.parametrize("pages", [
    [0, 2, 4, 5, 6, 9],  # gaps and the zero page 5 among data
    list(range(0, 300)),  # a run with a zero page: three packets, 5 in the first
    list(range(1, 5)) + list(range(6, 140, 2)) + list(range(700, 900)),  # scattered, no zero
    [5],  # a lone zero page: a packet without data
])  # fmt: skip
def test_sender_packets_with_zeros_and_gaps_are_qemus(pages: list[int]) -> None:
    """A job with zero pages or gaps (the vectorised path) goes out byte for byte as QEMU lays
    it out, with or without the migration thread's zero scan."""
    idx = np.array(pages)
    data, block = _sent_bytes(idx)
    npk = -(-len(idx) // 128)
    sync = MultifdPacket(1, npk, "", np.empty(0, np.uint64), 0).pack()
    assert data == _qemu_packets(idx, block, {5}) + sync
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MultifdSender, "scan_ahead", False)
        again, _ = _sent_bytes(idx)
    assert again == data


def test_migration_thread_scans_while_the_channels_are_full() -> None:
    """With no room in any channel queue the migration thread scans the job itself (numpy,
    without the interpreter lock) instead of waiting: the job arrives marked scanned, with
    its zero pages, and goes out as if the channel had scanned it."""
    block = RAMBlock("pc.ram", NPAGES * PAGE, prefault=True)
    block.array.reshape(-1, PAGE)[::3] = 1  # every third page data, the rest zero
    a, b = socket.socketpair()
    snd = MultifdSender([block], [Channel.from_socket(a, "multifd 0")], timeout=5)
    jobs: list[tuple] = []
    snd._room = threading.Semaphore(0)  # the queues are full: never room at once
    snd._put = lambda job, room=False: jobs.append(job)  # type: ignore[method-assign]
    idx = np.arange(0, NPAGES)
    snd.send_batches([Batch(block, idx, idx[:0])])
    assert len(jobs) == 1 and len(jobs[0]) == 4 and jobs[0][3] is True
    assert np.array_equal(np.flatnonzero(jobs[0][2]), np.flatnonzero(idx % 3))
    snd._room = threading.Semaphore(1)  # room: the channel scans, unless the migration thread
    jobs.clear()  # gets to it first
    snd.send_batches([Batch(block, idx, idx[:0])])
    assert len(jobs) == 1 and len(jobs[0]) == 3 and isinstance(jobs[0][2], _Scan)
    assert not jobs[0][2].done
    snd.close(graceful=False)
    b.close()


def test_queued_scans_are_shared_and_bounded() -> None:
    """A job queued for its channel thread to scan is scanned once, by whichever thread
    comes first: the migration thread takes the newest before a sync or instead of waiting for
    room. Once two queued jobs wait unscanned, the migration thread scans new jobs itself: a
    pass never ends with a queue full of work for one thread."""
    block = RAMBlock("pc.ram", 8 * JOB_PAGES * PAGE, prefault=True)
    block.array.reshape(-1, PAGE)[::3] = 1
    a, b = socket.socketpair()
    snd = MultifdSender([block], [Channel.from_socket(a, "multifd 0")], timeout=5)
    jobs: list[tuple] = []
    snd._put = lambda job, room=False: jobs.append(job)  # type: ignore[method-assign]
    snd._room = threading.Semaphore(100)  # always room
    idx = np.arange(4 * JOB_PAGES)
    snd.send_batches([Batch(block, idx, idx[:0])])
    # two jobs left to the channel threads, then the migration thread scans the rest itself
    assert [len(j) for j in jobs] == [3, 3, 4, 4]
    assert snd._unscanned() == 2
    first, second = jobs[0][2], jobs[1][2]
    assert snd._scan_one_queued()  # the newest first
    assert second.done and not first.done and snd._unscanned() == 1
    mask = first.run(snd.words["pc.ram"], jobs[0][1])  # a channel thread takes the oldest
    assert np.array_equal(np.flatnonzero(mask), np.flatnonzero(jobs[0][1] % 3))
    assert not snd._scan_one_queued()  # nothing left: never scanned twice
    assert np.array_equal(np.flatnonzero(second.mask), np.flatnonzero(jobs[1][1] % 3))
    snd.close(graceful=False)
    b.close()


def test_channel_thread_sends_a_job_the_migration_thread_scanned() -> None:
    """A queued job that the migration thread scanned goes out byte for byte as one its
    channel thread scans: its zero pages as zero pages."""
    block = RAMBlock("pc.ram", NPAGES * PAGE, prefault=True)
    block.array.reshape(-1, PAGE)[::3] = 1
    idx = np.arange(NPAGES)
    sent = []
    for scanned in (False, True):
        a, b = socket.socketpair()
        got: list[bytes] = []
        reader = threading.Thread(target=lambda b=b, got=got: got.extend(iter(
            lambda: b.recv(1 << 20), b"")))  # fmt: skip
        reader.start()
        snd = MultifdSender([block], [Channel.from_socket(a, "multifd 0")], timeout=5)
        scan = _Scan()
        if scanned:
            scan.run(snd.words["pc.ram"], idx)  # the migration thread got there first
        snd.channels[0].send_job(block, idx, scan)
        assert snd.take_stats()[1:] == (NPAGES // 3 + 1, NPAGES - NPAGES // 3 - 1)
        snd.close()
        reader.join(5)
        b.close()
        sent.append(b"".join(got))
    assert sent[0] == sent[1] and len(sent[0]) > 64


def test_jobs_of_mostly_zero_pages_are_bigger() -> None:
    """A job carries about ``JOB_PAGES`` data pages: the channel threads report the share of
    zero pages they find, and the migration thread cuts bigger jobs while it is high (up to
    what a checksum trailer can name), the usual ones when the pages are data."""
    npages = 2 * MAX_JOB_PAGES
    block = RAMBlock("pc.ram", npages * PAGE, prefault=True)
    block.array.reshape(-1, PAGE)[::64, 8] = 1  # one page in 64 holds data
    a, b = socket.socketpair()
    snd = MultifdSender([block], [Channel.from_socket(a, "multifd 0")], timeout=5)
    assert snd.job_pages == JOB_PAGES  # nothing seen yet: as for data
    snd.channels[0].send_job(block, np.arange(JOB_PAGES, 2 * JOB_PAGES))  # the channel scans
    assert snd.zero_share > 0.2
    snd.zero_share = 63 / 64
    assert snd.job_pages == MAX_JOB_PAGES
    snd.zero_share = 0.5
    assert snd.job_pages == 2 * JOB_PAGES
    snd.zero_share = 0.0
    assert snd.job_pages == JOB_PAGES
    jobs: list[tuple] = []
    snd._put = lambda job, room=False: jobs.append(job)  # type: ignore[method-assign]
    idx = np.arange(npages)
    for share, size in ((63 / 64, MAX_JOB_PAGES), (0.0, JOB_PAGES)):
        snd.zero_share = share
        jobs.clear()
        snd.send_batches([Batch(block, idx, idx[:0])])
        assert [len(j[1]) for j in jobs] == [size] * (npages // size)
    snd.close(graceful=False)
    b.close()


def test_receiver_places_zero_and_data_pages_of_mixed_packets(rx: Rx) -> None:
    """Packets with zero pages go through the fast path: data lands where named, a zero page
    written before is cleared, one never written is left alone (not even touched)."""
    rx.send(list(range(0, 16)))
    offs = np.array([20, 22, 3, 30], np.uint64) << np.uint64(12)  # 2 data, 2 zero pages
    data = bytes([7]) * PAGE + bytes([8]) * PAGE
    rx.tx.sendall(MultifdPacket(0, rx.num, "pc.ram", offs, 2, 2).pack() + data)
    rx.num += 1
    rx.sent.update({20: bytes([7]) * PAGE, 22: bytes([8]) * PAGE})
    del rx.sent[3]
    assert rx.finish() is None
    arr = rx.block.array.reshape(-1, PAGE)
    assert not arr[3].any()
    assert rx.rx.channels[0].packets == 2
    assert rx.rx.normal_pages == 18 and rx.rx.zero_pages == 2
    touched = rx.loader.touched["pc.ram"]
    received = rx.loader.received["pc.ram"]
    assert not touched[3] and not touched[30] and received[3] and received[30]
    for p, want in rx.sent.items():
        assert arr[p].tobytes() == want, p


def test_receiver_refuses_a_zero_page_outside_the_block(rx: Rx) -> None:
    rx.send(list(range(0, 16)))
    offs = np.array([20, NPAGES + 3], np.uint64) << np.uint64(12)
    rx.tx.sendall(MultifdPacket(0, rx.num, "pc.ram", offs, 1, 1).pack() + bytes([7]) * PAGE)
    err = rx.finish()
    assert err is not None and "offset outside block 'pc.ram'" in err
    assert not rx.block.array.reshape(-1, PAGE)[20].any()


def test_sender_zero_page_detection_off_sends_zero_pages_as_data() -> None:
    idx = np.arange(0, 16)
    with_detection, _ = _sent_bytes(idx)
    without, _ = _sent_bytes(idx, zero_detect=False)
    # with detection page 5 is a zero page (an offset, no data); without, it is data
    assert len(without) == len(with_detection) + PAGE
    pkt = MultifdPacket.unpack(memoryview(without), 0)
    assert (pkt.normal_pages, pkt.zero_pages) == (16, 0)
    pkt = MultifdPacket.unpack(memoryview(with_detection), 0)
    assert (pkt.normal_pages, pkt.zero_pages) == (15, 1)
    assert int(pkt.offsets[15]) == 5 * PAGE


def _raw(flags: int, num: int, pages: list[int], data: bytes = b"") -> bytes:
    offs = np.array(pages, np.uint64) << np.uint64(12)
    return MultifdPacket(flags, num, "pc.ram" if pages else "", offs, len(pages)).pack() + data


def _sync_point(rx: Rx) -> str | None:
    """Wait for the channel's SYNC as a MULTIFD_FLUSH would; the error, if any."""
    try:
        rx.rx.wait_synced()
    except MigrationError as exc:
        return str(exc)
    rx.rx.release()
    return None


def test_qemu72_sync_riding_on_pages_skips_a_packet_number(rx: Rx) -> None:
    """QEMU 7.2, one channel: pages queued as packet 1 are still unsent when the SYNC comes,
    which takes number 2 and carries them; an empty flags-0 packet repeats number 2. Seen on
    the wire from 7.2; the numbers 0, 2 are complete."""
    page = bytes([9]) * PAGE
    rx.tx.sendall(_raw(1, 0, []))
    assert _sync_point(rx) is None
    rx.tx.sendall(_raw(1, 2, [3], page) + _raw(0, 2, []))
    assert _sync_point(rx) is None
    rx.sent[3] = page
    assert rx.finish() is None
    rx.check()


def test_a_packet_number_never_seen_fails_the_sync_point(rx: Rx) -> None:
    """Packet 1 went to a channel this side does not read (the source has more channels)."""
    rx.tx.sendall(_raw(1, 0, []) + _raw(0, 2, [4], bytes([1]) * PAGE))
    assert _sync_point(rx) is None
    rx.tx.sendall(_raw(1, 3, []))
    err = _sync_point(rx)
    assert err is not None and "1 channels brought 3 distinct packet numbers" in err, err
    assert "source used 0..3" in err and "different multifd-channels" in err
    rx.finish()


def test_page_less_sync_packet_needs_no_compression_flag() -> None:
    """7.2 leaves the compression bits out of packets without pages (QEMU checks them only
    where there are pages); a zlib receiver takes such a SYNC."""
    block = RAMBlock("pc.ram", NPAGES * PAGE, prefault=True)
    a, b = socket.socketpair()
    rx = MultifdReceiver(RamLoader([block]), [Channel.from_socket(b, "multifd 0")],
                         compression="zlib", timeout=5)  # fmt: skip
    a.sendall(_raw(1, 0, []))
    rx.wait_synced()
    rx.release()
    assert rx.error is None
    a.sendall(_raw(0, 1, [0], bytes(PAGE)))  # pages without the zlib bit: refused
    a.shutdown(socket.SHUT_WR)
    rx.workers[0].thread.join(5)
    assert rx.error is not None and "compression flags 0x0, this side uses 'zlib'" in rx.error
    rx.close()
    a.close()


def _qemu9_sync(num: int) -> bytes:
    """A QEMU 9.0+ SYNC packet: pages_alloc 0 (its RAM part left zero), yet as long as every
    other packet of the migration (QEMU's receiver reads a fixed packet_len)."""
    raw = bytearray(_raw(1, num, []))
    raw[12:16] = bytes(4)  # pages_alloc
    return bytes(raw)


@pytest.mark.parametrize("first", [True, False])
def test_qemu9_sync_packet_without_page_slots(rx: Rx, first: bool) -> None:
    """QEMU 9.0+ fills only the header of a SYNC packet (pages_alloc 0) but sends it whole;
    it was refused ('0+0 pages with pages_alloc 0'), and the first packet of a channel (QEMU
    10.0's first packet on a channel is often a SYNC) set the packet size to the header alone,
    misreading everything after it. Before or after packets with pages, it is a sync point."""
    if not first:
        rx.send([1, 2])
    rx.tx.sendall(_qemu9_sync(rx.num))
    rx.num += 1
    assert _sync_point(rx) is None
    rx.send([3, 7, 8])
    rx.tx.sendall(_qemu9_sync(rx.num))
    rx.num += 1
    assert _sync_point(rx) is None
    assert rx.finish() is None
    rx.check()


def test_page_slots_zero_with_pages_is_refused() -> None:
    raw = bytearray(_raw(0, 0, [1], bytes(PAGE)))
    raw[12:16] = bytes(4)
    with pytest.raises(StreamError, match="1\\+0 pages with pages_alloc 0"):
        MultifdPacket.unpack(memoryview(raw), 0)


def test_default_threads_use_every_core_only_to_compress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncompressed, a thread per spare core (the GIL-bound copy path fights the migration
    thread for the others); compressed, a thread per core, since zlib and zstd run without the
    interpreter lock. Never more threads than channels."""
    from livemig.migration import multifd

    monkeypatch.setattr(multifd.os, "cpu_count", lambda: 2)
    assert multifd.default_threads(4) == 1
    assert multifd.default_threads(4, "zstd") == 2 and multifd.default_threads(4, "zlib") == 2
    assert multifd.default_threads(1, "zstd") == 1
    monkeypatch.setattr(multifd.os, "cpu_count", lambda: 8)
    assert multifd.default_threads(4) == 4 and multifd.default_threads(2, "zstd") == 2
    monkeypatch.setattr(multifd.os, "cpu_count", lambda: None)
    assert multifd.default_threads(4) == 1 and multifd.default_threads(4, "zstd") == 1


@given(st.integers(0, (1 << 52) - 257), st.integers(1, 256))
def test_run_sum_is_the_offsets_of_a_run(page: int, n: int) -> None:
    """The receiver's run test: ``n`` big-endian offsets read as one integer equal
    ``_run_sum`` exactly when they step by one page from the first (a run that fits in 64
    bits: the receiver asks only once the run ends inside the block)."""
    first = page << 12
    offs = (np.arange(n, dtype=np.uint64) << np.uint64(12)) + np.uint64(first)
    assert int.from_bytes(offs.astype(">u8").tobytes(), "big") == _run_sum(first, n)
    if n > 1:
        offs[n // 2] += np.uint64(PAGE)  # one page out of step
        assert int.from_bytes(offs.astype(">u8").tobytes(), "big") != _run_sum(first, n)


def test_runs_are_read_whole_without_a_split(rx: Rx, monkeypatch: pytest.MonkeyPatch) -> None:
    """A packet whose offsets are a run is placed with one read, never split page by page
    (the run test failing silently would still place pages right, only slower)."""
    from livemig.migration import multifd

    split: list[int] = []
    runs = multifd.page_runs
    monkeypatch.setattr(multifd, "page_runs", lambda idx, *a, **k: split.append(len(idx))
                        or runs(idx, *a, **k))  # fmt: skip
    rx.send(list(range(0, 128)))  # the first packet: the full path (splits its runs)
    split.clear()
    rx.send(list(range(128, 256)))
    rx.send(list(range(300, 301)))
    rx.send(list(range(NPAGES - 7, NPAGES)))
    assert rx.finish() is None
    rx.check()
    assert split == []


def test_next_header_read_with_the_pages_is_not_forgotten() -> None:
    """Two channels on one receiving thread: a packet's pages and the SYNC packet right after
    them arrive in one piece, so the SYNC header is read with the pages and nothing is left
    on the socket for poll to report; the channel must still reach its sync point."""
    block = RAMBlock("pc.ram", NPAGES * PAGE, prefault=True)
    loader = RamLoader([block])
    pairs = [socket.socketpair() for _ in range(2)]
    rx = MultifdReceiver(loader, [Channel.from_socket(b, f"multifd {i}")
                                  for i, (_, b) in enumerate(pairs)], timeout=5, threads=1)  # fmt: skip
    assert len(rx.workers) == 1
    page = bytes([5]) * PAGE
    try:
        pairs[0][0].sendall(_raw(0, 0, [1], page))  # the full path: the block is cached
        pairs[0][0].sendall(_raw(0, 1, [2, 3], page * 2) + _raw(1, 2, []))
        pairs[1][0].sendall(_raw(1, 3, []))
        rx.wait_synced()  # timed out (5 s) if the SYNC held in the buffer was never read
        rx.release()
        assert rx.error is None
        assert rx.normal_pages == 3
        assert block.array.reshape(-1, PAGE)[1:4].tobytes() == page * 3
    finally:
        for a, _ in pairs:
            a.close()
        rx.close(graceful=False)
