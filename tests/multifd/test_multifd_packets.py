"""Multifd packets on both sides of one channel. The source's fast path for a run of data pages
writes the same bytes as the general path (QEMU's layout). The destination places exactly the
pages each packet names: a packet that only looks like a run (out of order, repeated, past the
block's end) is placed page by page or refused."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from livemig.errors import MigrationError, StreamError
from livemig.machine.ram import RAMBlock
from livemig.migration.multifd import MultifdReceiver, MultifdSender
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
    rx.send([300, 302, 301, 303])  # a run's range, out of order: placed page by page
    rx.send(list(range(400, 410)))
    rx.send([500])
    rx.send(list(range(NPAGES - 128, NPAGES)))  # a run ending at the block's end
    assert rx.finish() is None
    rx.check()
    assert rx.rx.channels[0].packets == 6
    assert rx.rx.normal_pages == 128 + 128 + 4 + 10 + 1 + 128
    assert len(full) == 2  # the first packet and the out-of-order one; the runs went fast


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
