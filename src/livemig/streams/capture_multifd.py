"""The multifd side of a capture (``capture``): pages from the multifd channels, written into the
captured stream as page records, so that the file holds the guest's whole RAM.

With multifd, QEMU sends normal pages only on the multifd channels; main keeps the section
headers, zero pages and device state. At each sync point every channel stops at its SYNC
packet, so every page sent before the point has arrived and none sent after it has:

- QEMU 7.2 (and livemig's source with ``multifd-flush-after-each-section``): the EOS of every
  RAM section;
- 8.1+ (and livemig's source): a MULTIFD_FLUSH word. Its first one comes inside the setup
  section, before the setup's EOS, which tells the two apart.

There the pages received since the previous point are written as PAGE (or ZERO) records just
before the marker. QEMU sends a page at most once between two sync points, and the records of
an interval land after those of the one before, so the result loads as the same RAM: it is the
stream QEMU would have sent on one channel. It keeps QEMU's record encoding, where a record that
continues the previous record's RAMBlock does not name it (that carries across sections): the
records written end with the block main's last record was in.

Memory: the capture holds the guest's RAM once, and the inserted pages once more.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from livemig.errors import MigrationError, StreamError
from livemig.machine.abi import PAGE_SIZE
from livemig.migration.multifd import MultifdReceiver
from livemig.savevm.ram import PAGE_SHIFT, RamLoader
from livemig.transport import Channel
from livemig.wire import events as E
from livemig.wire.encoder import Encoder


class ImageBlock:
    """A RAMBlock as the receiver and loader see it: an array of the block's bytes."""

    def __init__(self, idstr: str, size: int) -> None:
        if size % PAGE_SIZE:
            raise StreamError(f"RAM block {idstr!r}: {size} bytes is not a whole number of pages")
        self.idstr = idstr
        self.size = size
        self.npages = size // PAGE_SIZE
        self.array = np.zeros(size, np.uint8)
        self.view = memoryview(self.array)
        self.pages = self.array.reshape(-1, PAGE_SIZE)


class MultifdCapture:
    """Receives the multifd channels and says what to insert into main's bytes, and where."""

    def __init__(
        self, channels: list[Channel], compression: str, timeout: float, main: Channel
    ) -> None:
        self.channels = channels
        self.compression = compression
        self.timeout = timeout
        self.main = main
        self.receiver: MultifdReceiver | None = None
        self.loader: RamLoader | None = None
        self.flush_words = False  # 8.1+: MULTIFD_FLUSH words mark the sync points
        self.inserts: list[tuple[int, bytes]] = []  # (offset in main's bytes, records)
        self.syncs = 0
        self.pages = 0  # normal pages by sync interval (a page sent twice in one counts once)
        self.zero_pages = 0  # pages the channels sent as zero (QEMU 9.0+ zero-page-detection)
        self._encoder = Encoder()

    def event(self, ev: E.Event, end: int, last_block: str | None) -> None:
        """One event decoded from main, ending at offset ``end``; ``last_block`` is the block
        main's latest page record was in (the next CONTINUE record's block)."""
        if isinstance(ev, E.Configuration) and "x-checksums" in (ev.capabilities or ()):
            # The capture rewrites the channels' pages into main: the checksums of the
            # livemig source would no longer describe the file.
            raise StreamError("the source is livemig sending checksums (x-checksums), which a "
                              "capture of its multifd channels into one stream cannot keep: "
                              "migrate with --no-checksums to capture it", end)  # fmt: skip
        if isinstance(ev, E.RamSetup):
            self._setup(ev, end)
        elif isinstance(ev, E.RamMultifdFlush):
            self.flush_words = True
            self._sync(end - 8, last_block)
        elif isinstance(ev, E.RamEos) and not self.flush_words and self.receiver is not None:
            self._sync(end - 8, last_block)
        elif isinstance(ev, E.RamZeroPages | E.RamPages):
            # main's pages, kept so that this side knows every page's content (and ``touched``
            # as the loader keeps it: a later zero page from a channel clears only those)
            idx = ev.offsets >> np.uint64(PAGE_SHIFT)
            block = self._block(ev.block, end)
            assert self.loader is not None
            zero = isinstance(ev, E.RamZeroPages)
            block.pages[idx] = ev.fill if zero else ev.data
            self.loader.touched[ev.block][idx] = not zero or ev.fill != 0
        elif isinstance(ev, E.RamXbzrlePage | E.RamCompressedPage):
            raise StreamError(f"{type(ev).__name__} on the main channel of a multifd migration: "
                              f"capture cannot place it", end)  # fmt: skip

    def _block(self, name: str, where: int) -> ImageBlock:
        if self.loader is None:
            raise StreamError("page record before the RAM setup section", where)
        b = self.loader.blocks.get(name)
        if b is None:
            raise StreamError(f"page for unknown RAM block {name!r}", where)
        return b  # type: ignore[no-any-return]

    def _setup(self, ev: E.RamSetup, end: int) -> None:
        if self.receiver is not None:
            raise StreamError("a second RAM setup section", end)
        self.loader = RamLoader([ImageBlock(b.idstr, b.used_length) for b in ev.blocks])

        def on_error(reason: str) -> None:
            self.main.shutdown()  # wake the reader of main: the capture fails with ``reason``

        self.receiver = MultifdReceiver(self.loader, self.channels, compression=self.compression,
                                        timeout=self.timeout, on_error=on_error)  # fmt: skip

    def _sync(self, at: int, last_block: str | None) -> None:
        if self.receiver is None:
            raise StreamError("multifd sync point before the RAM setup section", at)
        self.receiver.wait_synced()
        try:
            records = self._records(last_block)
        finally:
            self.receiver.release()
        if records:
            self.inserts.append((at, records))
        self.syncs += 1

    def _records(self, last_block: str | None) -> bytes:
        """The pages received since the previous sync point, as records; the last one is in
        ``last_block`` so that main's next CONTINUE record still means that block."""
        assert self.loader is not None
        enc = self._encoder
        enc.reset_block()
        names = [n for n, r in self.loader.received.items() if r.any()]
        if last_block in names:
            names.remove(last_block)
            names.append(last_block)
        out: list[Any] = []
        for name in names:
            block = self.loader.blocks[name]
            got = self.loader.received[name]
            idx = np.flatnonzero(got)
            got[:] = False  # in place: the receive threads hold this array
            # a page sent in a packet's zero list (QEMU 9.0+) is received but not touched
            zeros = int(np.count_nonzero(~self.loader.touched[name][idx]))
            self.pages += len(idx) - zeros
            self.zero_pages += zeros
            data = block.pages[idx].any(axis=1)
            offsets = idx.astype(np.uint64) << np.uint64(PAGE_SHIFT)
            out += enc.encode_zero_pages(name, offsets[~data])
            out += enc.encode_pages(name, offsets[data], block.view)
        if last_block is not None and names and names[-1] != last_block:
            # main goes on in a block that got no pages here: name it again with one page of
            # the content it has at this point
            out += enc.encode_pages(last_block, np.zeros(1, np.uint64),
                                    self._block(last_block, 0).view)  # fmt: skip
        return b"".join(out)

    def check(self) -> None:
        """Raise if a channel failed."""
        if self.receiver is not None and self.receiver.error is not None:
            raise MigrationError(self.receiver.error)

    def close(self, completed: bool) -> None:
        if self.receiver is not None:
            self.receiver.close(graceful=completed)
        else:
            for ch in self.channels:
                ch.close()
