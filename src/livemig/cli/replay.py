"""``livemig replay FILE URI``: send a stored migration stream to a listening destination as its
source would: a QEMU started with the same machine and ``-incoming``, for one. A capture can so
be loaded again, or loaded with multifd.

The stream is decoded whole, with its vmdesc trailer. Everything but the RAM section's records
goes out byte for byte. The RAM records are encoded again, because with ``--multifd N`` the PAGE
records leave main: their pages go as QEMU's multifd packets over N more connections
(``--multifd-compression``). The sync points are the stream's own: where its source wrote
MULTIFD_FLUSH words (QEMU 8.1+, livemig), each channel sends a SYNC packet before main gets
the word; in a stream without them (QEMU 7.2, or one made without multifd), before the EOS of
every RAM section, and when the stream's machine type is a QEMU one from 8.1 on (the
destination's: QEMU refuses any other), main gets a MULTIFD_FLUSH word there too, since such a
destination syncs its channels at those words only (up to 8.0 at every EOS). A stream with
them has its first inside the setup section, before that EOS, which tells the two apart. Zero
pages stay ZERO records on main, as 7.2 sends them. A record that continues the previous record's
block is encoded against what main carried, not what the file did.

With ``--tls-creds DIR`` every channel is a mutual TLS client, as a QEMU source's with
``tls-creds`` (``--tls-hostname`` for a ``unix:`` URI, which names no host).

When the stream opens a return path, replay answers nothing (the destination answers it) but
reads it, and ends with the destination's SHUT: 0 is success. Every wait has a time-out.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from livemig.cli.capture import add_multifd_arguments, check_arguments
from livemig.errors import LivemigError, StreamError, UsageError
from livemig.transport import Channel, ChannelError, ChannelTimeout, connect
from livemig.transport.tls import load_creds, set_migration_tls
from livemig.wire import events as E
from livemig.wire.constants import CAP_MAPPED_RAM
from livemig.wire.decoder import Decoder
from livemig.wire.encoder import Encoder
from livemig.wire.returnpath import ReturnPathDecoder, Shut
from livemig.wire.vmdesc import find_vmdesc

PAGE_SHIFT = 12
_RAM_RECORDS = (E.RamSetup, E.RamPages, E.RamZeroPages, E.RamXbzrlePage, E.RamCompressedPage,
                E.RamEos, E.RamMultifdFlush, E.RamHook)  # fmt: skip
_FLUSH_BYTES = 1 << 20  # main's buffered bytes are sent once there are this many
_MAPPED_BATCH = 4096  # pages of a mapped-ram file taken at a time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="send a stored migration stream to a destination")
    p.add_argument("file", help="a stream file (livemig capture, migrate to file:/exec:cat)")
    p.add_argument("uri", help="tcp:HOST:PORT or unix:PATH the destination listens on")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (each)")
    add_multifd_arguments(
        p, "send the pages over N multifd channels (the destination needs capability multifd "
        "and multifd-channels N)", "VM UUID in the multifd handshake (the destination's -uuid)",
    )  # fmt: skip
    p.set_defaults(func=run)


class _ReturnPath:
    """Reads the destination's return path on main until SHUT or the end."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch
        self.shut: int | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="return path", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        dec = ReturnPathDecoder()
        try:
            while self.shut is None:
                try:
                    data = self.ch.recv(65536)
                except ChannelTimeout:
                    continue  # a long stream: the destination answers at its end

                if not data:
                    return
                dec.receive_data(data)
                for msg in dec.events():
                    if isinstance(msg, Shut):
                        self.shut = msg.status
        except (ChannelError, StreamError) as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug: say so rather than print a traceback
            self.error = f"internal error: {exc!r}"
        finally:
            self.done.set()


class Replay:
    """Turns the file's events into main's bytes and, with multifd, the channels' packets."""

    def __init__(self, main: Channel, args: argparse.Namespace, vm_uuid: bytes) -> None:
        self.main = main
        self.args = args
        self.uuid = vm_uuid
        self.enc = Encoder()  # its last block is main's: what a CONTINUE record refers to
        self.out: list[Any] = []
        self.pending = 0
        self.sender: Any = None
        self.blocks: dict[str, Any] = {}
        self.batches: list[Any] = []
        self.staged: dict[str, np.ndarray] = {}  # pages given to the channels since the sync
        self.pages = 0
        self.syncs = 0
        self.flush_words = False  # the stream's sync points are MULTIFD_FLUSH words
        # where it has none: does the destination's machine type sync at MULTIFD_FLUSH words
        # (QEMU 8.1+), or at every EOS (up to 8.0)?
        self.flush_style = True
        self.rp: _ReturnPath | None = None
        self.mapped_ram = False  # a mapped-ram file: its pages are sent from the page regions
        self.data: bytes = b""

    def _emit(self, bufs: list[Any] | bytes | memoryview) -> None:
        if isinstance(bufs, bytes | memoryview):
            bufs = [bufs]
        self.out += bufs
        self.pending += sum(memoryview(b).nbytes for b in bufs)
        if self.pending >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.out:
            self.main.sendv(self.out)
        self.out, self.pending = [], 0

    def event(self, ev: E.Event, raw: memoryview, where: int) -> None:
        if isinstance(ev, E.Configuration):
            self.flush_style = flush_words_expected(ev.machine_type)
            if CAP_MAPPED_RAM in (ev.capabilities or ()):
                self.mapped_ram = True
                caps = tuple(c for c in ev.capabilities or () if c != CAP_MAPPED_RAM)
                ev = dataclasses.replace(ev, capabilities=caps or None)
            # through the encoder: it lays the block list out by the capabilities
            self._emit(self.enc.send(ev))
            return
        if isinstance(ev, E.OpenReturnPath) and self.rp is None:
            self.rp = _ReturnPath(self.main)
        if isinstance(ev, E.Packaged | E.PostcopyListen | E.PostcopyRun):
            raise StreamError("a post-copy stream: replay sends pre-copy streams only", where)
        if not isinstance(ev, _RAM_RECORDS):
            self._emit(raw)
            return
        if self.mapped_ram and isinstance(ev, E.RamSetup):
            self._mapped_ram_setup(ev, where)
            return
        if self.args.multifd:
            if isinstance(ev, E.RamSetup):
                self._setup(ev)
            elif isinstance(ev, E.RamPages):
                self._stage(ev, where)
                return
            elif isinstance(ev, E.RamMultifdFlush):
                self.flush_words = True
                self._sync()
            elif isinstance(ev, E.RamEos) and not self.flush_words:
                self._sync()
                if self.flush_style:
                    # the destination syncs its channels at MULTIFD_FLUSH words only
                    self._emit(self.enc.send(E.RamMultifdFlush()))
        self._emit(self.enc.send(ev))

    def _mapped_ram_setup(self, ev: E.RamSetup, where: int) -> None:
        """A mapped-ram file's block list, then its pages as PAGE records (or by the multifd
        channels): what the file's bitmaps mark, as a QEMU destination restoring the file
        with mapped-ram reads it (pages not marked are left as the destination has them)."""
        from livemig.migration.mapped_ram import file_pages

        plain = tuple(dataclasses.replace(b, mapped_ram=None) for b in ev.blocks)
        setup = E.RamSetup(ev.total, plain)
        if self.args.multifd:
            self._setup(setup)
        self._emit(self.enc.send(setup))
        for info in ev.blocks:
            idx, pages = file_pages(self.data, info, where)
            for at in range(0, len(idx), _MAPPED_BATCH):
                part = idx[at : at + _MAPPED_BATCH]
                offsets = part.astype(np.uint64) << np.uint64(PAGE_SHIFT)
                self.event(E.RamPages(info.idstr, offsets, pages[part]), memoryview(b""), where)

    def _setup(self, ev: E.RamSetup) -> None:
        from livemig.cli.capture_multifd import ImageBlock
        from livemig.migration.multifd import MultifdSender

        a = self.args
        # main's first bytes go before the channels connect, as a source's do: a destination
        # that tells main from multifd by peeking at them need not wait
        self.flush()
        self.blocks = {b.idstr: ImageBlock(b.idstr, b.used_length) for b in ev.blocks}
        self.staged = {n: np.zeros(b.npages, bool) for n, b in self.blocks.items()}
        self.sender = MultifdSender.connect(
            a.uri, list(self.blocks.values()), a.multifd, compression=a.multifd_compression,
            uuid=self.uuid, timeout=a.timeout, zero_detect=False,
        )  # fmt: skip

    def _stage(self, ev: E.RamPages, where: int) -> None:
        from livemig.savevm.ram import Batch

        block = self.blocks.get(ev.block)
        if block is None:
            raise StreamError(f"page for unknown RAM block {ev.block!r}", where)
        idx = (ev.offsets >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        staged = self.staged[ev.block]
        if len(idx) and (int(idx.max()) >= block.npages or staged[idx].any()):
            # a second copy could land before the first on another channel
            raise StreamError(f"a page of {ev.block!r} outside it, or sent twice between two "
                              f"sync points: cannot replay this stream with multifd", where)  # fmt: skip
        block.pages[idx] = ev.data
        staged[idx] = True
        self.batches.append(Batch(block, idx, idx[:0]))
        self.pages += len(idx)
        if len(self.batches) >= 64:
            self.sender.send_batches(self.batches)
            self.batches = []

    def _sync(self) -> None:
        if self.sender is None:
            return
        self.flush()
        self.sender.send_batches(self.batches)
        self.batches = []
        self.sender.sync()  # every channel's pages, then its SYNC, are out before main's EOS
        for s in self.staged.values():
            s[:] = False
        self.syncs += 1


def flush_words_expected(machine_type: str) -> bool:
    """Whether a destination of ``machine_type`` syncs its multifd channels at MULTIFD_FLUSH
    words (QEMU's machine types from 8.1 on, livemig's) rather than at every RAM section's EOS
    (QEMU's ``multifd-flush-after-each-section``, on for machine types up to 8.0). A QEMU
    destination refuses a stream whose machine type is not its own, so the stream's names the
    destination's."""
    m = re.fullmatch(r"pc(?:-i440fx|-q35)?-(\d+)\.(\d+)", machine_type)
    if m is None:
        return True
    return (int(m[1]), int(m[2])) >= (8, 1)


def _events(data: bytes) -> Any:
    vmdesc = find_vmdesc(data)
    dec = Decoder(vmdesc=vmdesc)
    dec.receive_data(data)
    dec.receive_data(b"")
    view = memoryview(data)
    while True:
        start = dec.offset
        ev = dec.next_event()
        if ev is E.NEED_DATA:
            if not dec.finished:
                raise StreamError("stream did not end cleanly", dec.offset)
            return
        yield ev, view[start : dec.offset], start


def run(args: argparse.Namespace) -> int:
    src_uuid = check_arguments(args, args.uri)
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    # every channel (main, multifd) connects with these, as a source's do
    set_migration_tls("client", load_creds(args.tls_creds, "client", args.tls_hostname)
                      if args.tls_creds else None)  # fmt: skip
    main = connect(args.uri, timeout=args.timeout)
    rep = Replay(main, args, src_uuid)
    rep.data = data
    try:
        for ev, raw, where in _events(data):
            rep.event(ev, raw, where)
        rep.flush()
        if rep.sender is not None:
            rep.sender.close(graceful=True)
            rep.sender.check()
        if rep.rp is not None:
            if not rep.rp.done.wait(args.timeout):
                raise LivemigError(f"no SHUT from the destination within {args.timeout} s")
            if rep.rp.shut != 0:
                why = rep.rp.error or ("no SHUT" if rep.rp.shut is None else f"SHUT {rep.rp.shut}")
                raise LivemigError(f"the destination did not load the stream ({why})")
    except ChannelError as exc:
        if rep.sender is not None:
            rep.sender.close(graceful=False)
        if rep.rp is not None and rep.rp.done.wait(1) and rep.rp.shut:
            # the destination gave up first and said so; the broken write only followed
            raise LivemigError(f"the destination did not load the stream (SHUT "
                               f"{rep.rp.shut}; then {exc})") from None  # fmt: skip
        # QEMU exits when a load fails (exit-on-error), often without a SHUT
        raise LivemigError(f"{exc} (the destination went away: its own log says why)") from None
    except BaseException:
        if rep.sender is not None:
            rep.sender.close(graceful=False)
        raise
    finally:
        main.close()
    extra = (f", {rep.pages} pages over {args.multifd} multifd channels, {rep.syncs} sync "
             f"points" if args.multifd else "")  # fmt: skip
    print(f"replayed {len(data)} bytes of {args.file}{extra}")
    return 0
