"""Replay: send a stored migration stream to a listening destination as its source would: a
QEMU started with the same machine and ``-incoming``, for one. A capture can so be loaded
again, or loaded with multifd. ``replay_stream`` is the operation (``livemig replay``); its
options are ``ReplayOptions`` (the command line's flags by the same names).

The stream is decoded whole, with its vmdesc trailer. Everything but the RAM section's records
goes out byte for byte. The RAM records are encoded again, because with ``multifd`` N the PAGE
records leave main: their pages go as QEMU's multifd packets over N more connections
(``multifd_compression``). The sync points are the stream's own: where its source wrote
MULTIFD_FLUSH words (QEMU 8.1+, livemig), each channel sends a SYNC packet before main gets
the word; in a stream without them (QEMU 7.2, or one made without multifd), before the EOS of
every RAM section, and when the stream's machine type is a QEMU one from 8.1 on (the
destination's: QEMU refuses any other), main gets a MULTIFD_FLUSH word there too, since such a
destination syncs its channels at those words only (up to 8.0 at every EOS). A stream with
them has its first inside the setup section, before that EOS, which tells the two apart. Zero
pages stay ZERO records on main, as 7.2 sends them. A record that continues the previous record's
block is encoded against what main carried, not what the file did. A mapped-ram file's pages,
which lie at fixed offsets rather than in records, go out as PAGE records.

With ``tls_creds`` every channel is a mutual TLS client, as a QEMU source's with ``tls-creds``
(``tls_hostname`` for a ``unix:`` URI, which names no host).

When the stream opens a return path, replay answers nothing (the destination answers it) but
reads it, and ends with the destination's SHUT: 0 is success. Every wait has a time-out.

A post-copy capture (one with a PACKAGED command) is replayed as a post-copy source: after the
package replay serves the destination's page requests from the pages the capture holds after
the switch, each page once, before the rest of the recorded push (``replay_postcopy``;
``max_postcopy_bandwidth`` paces the push; ``postcopy_preempt`` sends requested pages on a
preempt channel). The destination needs capability postcopy-ram. ``postcopy_drain`` and
``pipe_pings`` add what livemig's own post-copy source sends at and after the switch (the
drain before it, PINGs that bound the push: ``replay_postcopy`` says how).

Every PING replay sends (the capture's and its own) is recorded, and every PONG the
destination answers: ``ReplayResult.pings`` and ``pongs``.

The whole file is decoded and checked before the first byte goes out: a stream that does not
decode, a post-copy capture without what a destination needs to run it, or options that do not
fit the capture are refused then, saying why.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from os import PathLike
from typing import Any

import numpy as np

from livemig.errors import MigrationError, StreamError, UsageError
from livemig.migration.postcopy_source import BACKGROUND_PAGES
from livemig.streams.analyze import read_stream
from livemig.streams.capture import ZERO_UUID, check_channels, check_uri, parse_uuid
from livemig.streams.replay_postcopy import (
    PIPE_PING_FLAG,
    SERVE_BATCH,
    PipeLimit,
    Pongs,
    PostcopyPlan,
    PostcopyServer,
)
from livemig.transport import Channel, ChannelError, ChannelTimeout, connect
from livemig.transport.tls import load_creds, migration_tls, set_migration_tls
from livemig.wire import events as E
from livemig.wire.constants import CAP_MAPPED_RAM, X_DRAIN_PING
from livemig.wire.decoder import Decoder
from livemig.wire.encoder import Encoder
from livemig.wire.returnpath import Pong, ReqPages, ReturnPathDecoder, Shut, XError
from livemig.wire.vmdesc import find_vmdesc

PAGE_SHIFT = 12
_RAM_RECORDS = (E.RamSetup, E.RamPages, E.RamZeroPages, E.RamXbzrlePage, E.RamCompressedPage,
                E.RamEos, E.RamMultifdFlush, E.RamHook)  # fmt: skip
_FLUSH_BYTES = 1 << 20  # main's buffered bytes are sent once there are this many
_MAPPED_BATCH = 4096  # pages of a mapped-ram file taken at a time
_PING_BYTES = len(Encoder().to_bytes(E.Ping(PIPE_PING_FLAG)))


@dataclasses.dataclass(frozen=True)
class ReplayOptions:
    """How a stream is replayed (``replay_stream``'s keywords; ``livemig replay``'s options)."""

    timeout: float = 60.0  # seconds any one wait may take
    multifd: int = 0  # send the pages over this many multifd channels (0: all on main)
    multifd_compression: str = "none"  # none, zlib, zstd: as the destination's
    uuid: str = ZERO_UUID  # the VM UUID in the multifd handshakes (the destination's -uuid)
    tls_creds: str = ""  # a QEMU tls-creds-x509 directory: every channel a TLS client
    tls_hostname: str = ""  # the name the destination's certificate must carry
    postcopy_preempt: bool = False  # a post-copy capture: requested pages on a preempt channel
    max_postcopy_bandwidth: int = 0  # bytes/s of the post-copy background push (0: unlimited)
    postcopy_drain: bool = False  # discard the pages to come and await a PONG before the switch
    pipe_pings: bool = False  # push after PONG 4, within PIPE_LIMIT of the last pipe PONG


@dataclasses.dataclass(frozen=True)
class PostcopyFigures:
    """What a post-copy replay sent after the switch."""

    pages: int  # pages the capture holds after the switch (each sent once)
    served: int  # of those, sent because the destination asked for them
    requests: int  # page requests received
    drain_pages: int = 0  # --postcopy-drain: pages discarded before the switch
    drain_wait: float = 0.0  # seconds the drain's PONG took
    switch_discarded: int = 0  # pages the capture's own discards named that were left to drop
    listening_wait: float = 0.0  # --pipe-pings: seconds from the package to PONG 4
    pipe_pings: int = 0  # --pipe-pings: PINGs sent between PARTs of the push
    pipe_answered: int = 0  # of those, answered by the destination
    pipe_holds: int = 0  # times the push waited for a PONG
    pipe_most_ahead: int = 0  # the most bytes sent beyond what the last PONG vouched for
    pipe_off: bool = False  # a PING went unanswered for PIPE_SILENT s: the limit was dropped


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    """One replayed stream: what went out, and the destination's answer."""

    nbytes: int  # the stream's length
    channels: int  # multifd channels used (0: main only)
    pages: int  # pages sent over the multifd channels
    syncs: int  # multifd sync points
    postcopy: PostcopyFigures | None  # a post-copy capture's figures
    shut: int | None  # the destination's SHUT (0: loaded) when the stream opens a return path
    pings: tuple[int, ...] = ()  # the PINGs sent on main, in order (a package's not seen)
    pongs: tuple[int, ...] = ()  # the destination's PONGs, in the order they came


class _ReturnPath:
    """Reads the destination's return path on main until SHUT or the end; page requests go to
    ``on_request(block, start, length)`` (post-copy)."""

    def __init__(self, ch: Channel, on_request: Any = None, on_pong: Any = None) -> None:
        self.ch = ch
        self.on_request = on_request
        self.on_pong = on_pong
        self.pongs = Pongs()
        self.shut: int | None = None
        self.error: str | None = None
        self.reason: str | None = None  # a livemig destination's own words (XError)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="return path", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        dec = ReturnPathDecoder()
        last: str | None = None
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
                    elif isinstance(msg, XError):
                        self.reason = msg.reason
                    elif isinstance(msg, Pong):
                        if self.on_pong is not None:
                            self.on_pong(msg.value)
                        self.pongs.add(msg.value)
                    elif isinstance(msg, ReqPages):
                        block = msg.block or last
                        if block is None or self.on_request is None:
                            raise StreamError("a page request, but no post-copy to serve it"
                                              if self.on_request is None else
                                              "REQ_PAGES before any REQ_PAGES_ID named a block")  # fmt: skip
                        last = block
                        self.on_request(block, msg.start, msg.length)
        except (ChannelError, StreamError) as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug: say so rather than print a traceback
            self.error = f"internal error: {exc!r}"
        finally:
            self.done.set()


class Replay:
    """Turns the file's events into main's bytes and, with multifd, the channels' packets."""

    def __init__(
        self,
        main: Channel,
        uri: str,
        opts: ReplayOptions,
        vm_uuid: bytes,
        data: bytes = b"",
        plan: PostcopyPlan | None = None,
    ) -> None:
        self.main = main
        self.uri = uri
        self.opts = opts
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
        self.plan = plan  # a post-copy capture's pages after the switch
        self.post: PostcopyServer | None = None  # once switched: serves the requests
        self.preempt: Channel | None = None  # --postcopy-preempt: the urgent pages' channel
        self.penc: Encoder | None = None
        self.data = data  # the whole stream: a mapped-ram file's pages are read from it
        self.pings: list[int] = []  # every PING sent on main
        self.ram_sid = 0  # the RAM section's id (the stream's START names it)
        self.prediscarded: dict[str, np.ndarray] | None = None  # --postcopy-drain's pages
        self.drain_wait = 0.0
        self.switch_discarded = 0
        self.pipe: PipeLimit | None = None  # --pipe-pings, once switched
        self.listening_wait = 0.0
        self.listening = False  # --pipe-pings: the destination answered the PING after the package
        self.end_section = False  # --pipe-pings: inside the capture's END section of RAM
        self.t_package = 0.0  # when the package went
        self.wake = threading.Event()  # a page request or a pipe PONG came

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
        if (self.plan is not None and self.opts.postcopy_drain and self.prediscarded is None
                and where == self.plan.switch_at):  # fmt: skip
            self._drain()
        if isinstance(ev, E.Ping):
            self.pings.append(ev.value)
        elif isinstance(ev, E.SectionStart) and ev.idstr == "ram":
            self.ram_sid = ev.section_id
        if isinstance(ev, E.PostcopyRamDiscard) and self.prediscarded is not None:
            self._switch_discard(ev)
            return
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
            self.rp = _ReturnPath(self.main, self._on_request, self._on_pong)
        if self.post is not None:
            self._postcopy(ev, raw)
            return
        if isinstance(ev, E.Packaged):
            # the switch: the destination runs the guest from here and asks for its pages
            assert self.plan is not None  # checked before the first byte
            self.flush()
            if self.opts.postcopy_preempt:
                # as QEMU's postcopy_start: the channel for urgent pages is there before the
                # package (a destination with postcopy-preempt waits for it to load one)
                self.preempt = connect(self.uri, timeout=self.opts.timeout)
                self.penc = Encoder()
            # ready for requests before the package goes: the destination's device loads in
            # it may fault already (QEMU 10.0 asked for 0xc0000 while the package was loading;
            # a request before this was set ended the return path: a failure under load)
            batch = BACKGROUND_PAGES if self.opts.pipe_pings else SERVE_BATCH
            self.post = PostcopyServer(self.plan, self.opts.max_postcopy_bandwidth, batch)
            self._emit(raw)
            self.flush()
            if self.opts.pipe_pings:
                self.pipe = PipeLimit(self.main.bytes_sent)
                self.t_package = time.monotonic()
            return
        if not isinstance(ev, _RAM_RECORDS):
            self._emit(raw)
            return
        if self.mapped_ram and isinstance(ev, E.RamSetup):
            self._mapped_ram_setup(ev, where)
            return
        if self.opts.multifd:
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

    def _urgent(self, events: list[E.Event]) -> None:
        """Requested pages: on the preempt channel when there is one, else on main, sent at
        once: inside the capture's current RAM section, or with ``pipe_pings`` (which sends
        the push in PARTs of its own) as a PART of their own, as livemig's source does."""
        if not events:
            return
        if self.preempt is not None:
            assert self.penc is not None
            self.preempt.sendv([b for e in events for b in self.penc.send(e)])
            return
        self._emit(self._part(events) if self.pipe is not None else
                   [b for e in events for b in self.enc.send(e)])  # fmt: skip
        self.flush()

    def _part(self, events: list[E.Event]) -> list[Any]:
        """Page records as a RAM PART section of their own."""
        out = [*self.enc.send(E.SectionPart(self.ram_sid))]
        for e in events:
            out += self.enc.send(e)
        return [*out, *self.enc.send(E.RamEos()), *self.enc.send(E.SectionFooter(self.ram_sid))]

    def _ping(self, value: int) -> None:
        self.pings.append(value)
        self._emit(self.enc.send(E.Ping(value)))

    def _on_pong(self, value: int) -> None:
        if self.pipe is not None and self.pipe.on_pong(value):
            self.wake.set()

    def _serve(self) -> None:
        """Requests that came meanwhile, served now (while a wait for a PONG lasts)."""
        if self.post is not None:
            self._urgent(self.post.serve())

    def _drain(self) -> None:
        """``postcopy_drain``, where the capture's switch begins: discard on the destination
        every page the capture sends after the switch (livemig's ``discard_commands``), PING
        ``X_DRAIN_PING``, and wait for its PONG, as livemig's source does before it stops its
        guest (``OutgoingMigration._drain``)."""
        from livemig.migration.postcopy_source import discard_commands

        assert self.plan is not None and self.rp is not None  # checked before the first byte
        self.prediscarded = {b: w >= 0 for b, w in self.plan.where.items()}
        for cmd in discard_commands({b: m for b, m in self.prediscarded.items() if m.any()}):
            self._emit(self.enc.send(cmd))
        since = len(self.rp.pongs)
        self._ping(X_DRAIN_PING)
        self.flush()
        t0 = time.monotonic()
        if not self.rp.pongs.wait(X_DRAIN_PING, since, self.opts.timeout):
            raise MigrationError(f"no PONG to the drain's PING ({X_DRAIN_PING:#x}) within "
                                 f"{self.opts.timeout:g} s: {self._rp_state()}")  # fmt: skip
        self.drain_wait = time.monotonic() - t0

    def _switch_discard(self, ev: E.PostcopyRamDiscard) -> None:
        """A discard of the capture's switch after the drain: only the pages not discarded
        yet (livemig's source discards a page once: the pages dirtied since the drain)."""
        from livemig.migration.postcopy_source import discard_commands

        assert self.prediscarded is not None
        pre = self.prediscarded.get(ev.block)
        if pre is None:
            raise StreamError(f"POSTCOPY_RAM_DISCARD of unknown RAM block {ev.block!r}")
        left = np.zeros(len(pre), bool)
        for start, length in ev.ranges:
            left[start >> PAGE_SHIFT : -(-(start + length) // 4096)] = True
        left &= ~pre
        self.switch_discarded += int(np.count_nonzero(left))
        for cmd in discard_commands({ev.block: left}):
            self._emit(self.enc.send(cmd))

    def _rp_state(self) -> str:
        rp = self.rp
        if rp is None:
            return "no return path"
        if rp.done.is_set():
            return f"the return path ended ({rp.reason or rp.error or f'SHUT {rp.shut}'})"
        return f"PONGs so far: {[hex(v) for v in rp.pongs.values]}"

    def _await_listening(self, value: int, raw: memoryview) -> None:
        """``pipe_pings``: send the PING that follows the package (``raw``), then no page of
        the push until its PONG (the destination reads main: pages pushed before only queue
        up in front of the first requests), serving requests meanwhile."""
        assert self.rp is not None
        # counted before the PING goes: its PONG can be back before the send returns
        since = len(self.rp.pongs)
        self._emit(raw)
        self.flush()
        if not self.rp.pongs.wait(value, since, self.opts.timeout, idle=self._serve):
            raise MigrationError(f"no PONG to PING {value} after the package within "
                                 f"{self.opts.timeout:g} s: {self._rp_state()}")  # fmt: skip
        self.listening_wait = time.monotonic() - self.t_package
        self.listening = True

    def _on_request(self, block: str, start: int, length: int) -> None:
        if self.post is None:
            raise StreamError(f"the destination asked for pages ({block!r} at {start:#x}) "
                              "before the switch to post-copy")  # fmt: skip
        self.post.request(block, start, length)
        self.wake.set()

    def _postcopy(self, ev: E.Event, raw: memoryview) -> None:
        """After the switch: pages once each, requested ones first, sent without delay."""
        post = self.post
        assert post is not None
        if self.pipe is not None and self._pipe_framing(ev):
            return
        if isinstance(ev, E.RamPages | E.RamZeroPages):
            for e in post.push(ev, self._urgent):
                if self.pipe is not None:
                    self._hold(post)
                    self._emit(self._part([e]))
                else:
                    self._emit(self.enc.send(e))
                sent = self.pending
                self.flush()
                if self.pipe is not None:
                    value = self.pipe.ping(self.main.bytes_sent, _PING_BYTES)
                    if value is not None:
                        self._ping(value)
                        self.flush()
                if isinstance(e, E.RamPages) and post.pace(sent):
                    self._urgent(post.serve())
            return
        if self.pipe is not None and not self.listening and isinstance(ev, E.Ping):
            # the PING right after the package (checked before the first byte)
            self._await_listening(ev.value, raw)
            return
        if isinstance(ev, E.RamEos):
            self._urgent(post.serve())  # still inside the section: page records may go here
        if isinstance(ev, _RAM_RECORDS):
            self._emit(self.enc.send(ev))
        else:
            self._emit(raw)
        self.flush()

    def _hold(self, post: PostcopyServer) -> None:
        """``pipe_pings``: before a piece of the push, wait while the destination is more than
        ``PIPE_LIMIT`` behind (serving requests meanwhile)."""
        assert self.pipe is not None and self.rp is not None
        held = False
        # (a destination that gave up is left for the next send to report)
        while self.pipe.full(self.main.bytes_sent) and not self.rp.done.is_set():
            held = True
            self.wake.clear()
            self._serve()
            if self.pipe.full(self.main.bytes_sent):
                self.wake.wait(0.05)  # a PONG or a request sets it
        self.pipe.holds += held
        self.pipe.going(self.main.bytes_sent)

    def _pipe_framing(self, ev: E.Event) -> bool:
        """``pipe_pings`` sends the push in PARTs of its own: the capture's RAM section framing
        after the switch is dropped (True), but for its END, sent empty where it ends."""
        sid = self.ram_sid
        if isinstance(ev, E.SectionPart) and ev.section_id == sid:
            return True
        if isinstance(ev, E.SectionEnd) and ev.section_id == sid:
            self.end_section = True
            return True
        if isinstance(ev, E.RamEos):
            self._serve()
            return True
        if isinstance(ev, E.SectionFooter) and ev.section_id == sid:
            if self.end_section:
                self.end_section = False
                self._emit([*self.enc.send(E.SectionEnd(sid)), *self.enc.send(E.RamEos()),
                            *self.enc.send(E.SectionFooter(sid))])  # fmt: skip
                self.flush()
            return True
        return False

    def _mapped_ram_setup(self, ev: E.RamSetup, where: int) -> None:
        """A mapped-ram file's block list, then its pages as PAGE records (or by the multifd
        channels): what the file's bitmaps mark, as a QEMU destination restoring the file
        with mapped-ram reads it (pages not marked are left as the destination has them)."""
        from livemig.migration.mapped_ram import file_pages

        plain = tuple(dataclasses.replace(b, mapped_ram=None) for b in ev.blocks)
        setup = E.RamSetup(ev.total, plain)
        if self.opts.multifd:
            self._setup(setup)
        self._emit(self.enc.send(setup))
        for info in ev.blocks:
            idx, pages = file_pages(self.data, info, where)
            for at in range(0, len(idx), _MAPPED_BATCH):
                part = idx[at : at + _MAPPED_BATCH]
                offsets = part.astype(np.uint64) << np.uint64(PAGE_SHIFT)
                self.event(E.RamPages(info.idstr, offsets, pages[part]), memoryview(b""), where)

    def _setup(self, ev: E.RamSetup) -> None:
        from livemig.migration.multifd import MultifdSender
        from livemig.streams.capture_multifd import ImageBlock

        a = self.opts
        # main's first bytes go before the channels connect, as a source's do: a destination
        # that tells main from multifd by peeking at them need not wait
        self.flush()
        self.blocks = {b.idstr: ImageBlock(b.idstr, b.used_length) for b in ev.blocks}
        self.staged = {n: np.zeros(b.npages, bool) for n, b in self.blocks.items()}
        self.sender = MultifdSender.connect(
            self.uri, list(self.blocks.values()), a.multifd, compression=a.multifd_compression,
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


def preempt_supported(machine_type: str) -> bool:
    """Whether replay can be the preempt source of a destination of ``machine_type``: QEMU
    8.0+ (before, ``preempt-pre-7-2``: the channel made at the start, ended by an EOS)."""
    m = re.fullmatch(r"pc(?:-i440fx|-q35)?-(\d+)\.(\d+)", machine_type)
    return m is None or (int(m[1]), int(m[2])) >= (8, 0)


def stream_events(data: bytes) -> Any:
    """The events of a whole stream (vmdesc found first) as ``(event, raw bytes, offset)``;
    ``StreamError`` at the first that does not decode, or if it does not end cleanly."""
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


def replay_stream(
    stream: bytes | bytearray | str | PathLike[str],
    uri: str,
    *,
    timeout: float = 60.0,
    multifd: int = 0,
    multifd_compression: str = "none",
    uuid: str = ZERO_UUID,
    tls_creds: str = "",
    tls_hostname: str = "",
    postcopy_preempt: bool = False,
    max_postcopy_bandwidth: int = 0,
    postcopy_drain: bool = False,
    pipe_pings: bool = False,
) -> ReplayResult:
    """Send a stored stream (its bytes, or a file's path) to the destination listening on
    ``uri`` (``tcp:`` or ``unix:``) as its source would: ``livemig replay``; the options are
    ``ReplayOptions``'. The whole stream is decoded and checked first: ``UsageError`` for
    options that do not fit it, ``StreamError`` for a stream that does not decode, both before
    the first byte goes out; ``MigrationError`` when the destination does not load it.

    With ``tls_creds`` every channel is a TLS client: the process's migration TLS client
    credentials are set for the replay (the multifd channels read them there, as a source's
    do) and put back after it."""
    opts = ReplayOptions(timeout=timeout, multifd=multifd,
                         multifd_compression=multifd_compression, uuid=uuid,
                         tls_creds=tls_creds, tls_hostname=tls_hostname,
                         postcopy_preempt=postcopy_preempt,
                         max_postcopy_bandwidth=max_postcopy_bandwidth,
                         postcopy_drain=postcopy_drain, pipe_pings=pipe_pings)  # fmt: skip
    check_channels(opts.multifd)
    check_uri(uri)
    vm_uuid = parse_uuid(opts.uuid)
    data = bytes(stream) if isinstance(stream, bytes | bytearray) else read_stream(stream)
    creds = load_creds(opts.tls_creds, "client", opts.tls_hostname) if opts.tls_creds else None
    before = migration_tls("client")
    set_migration_tls("client", creds)
    try:
        return _replay(data, uri, opts, vm_uuid)
    finally:
        set_migration_tls("client", before)


def _replay(data: bytes, uri: str, opts: ReplayOptions, vm_uuid: bytes) -> ReplayResult:
    # the whole file is read and checked before the first byte goes out: what cannot be
    # replayed is refused here, saying why, rather than after part of it
    events = list(stream_events(data))
    plan = PostcopyPlan.from_events(events)
    _check_fit(events, plan, opts)
    main = connect(uri, timeout=opts.timeout)
    rep = Replay(main, uri, opts, vm_uuid, data, plan)
    try:
        for ev, raw, where in events:
            rep.event(ev, raw, where)
        rep.flush()
        if rep.sender is not None:
            rep.sender.close(graceful=True)
            rep.sender.check()
        _await_shut(rep, opts.timeout)
    except ChannelError as exc:
        if rep.sender is not None:
            rep.sender.close(graceful=False)
        raise _broken(rep, exc) from None
    except BaseException:
        if rep.sender is not None:
            rep.sender.close(graceful=False)
        raise
    finally:
        main.close()
        if rep.preempt is not None:
            rep.preempt.close()
    figures = None
    if rep.post is not None:
        post = rep.post
        if post.unsent():
            raise MigrationError(f"{post.unsent()} post-copy pages were never sent (a bug)")
        pipe = rep.pipe
        drained = rep.prediscarded or {}
        figures = PostcopyFigures(
            plan.pages if plan else 0, post.served, post.requested,
            drain_pages=sum(int(np.count_nonzero(m)) for m in drained.values()),
            drain_wait=rep.drain_wait, switch_discarded=rep.switch_discarded,
            listening_wait=rep.listening_wait,
            pipe_pings=pipe.pings if pipe else 0, pipe_answered=pipe.answered if pipe else 0,
            pipe_holds=pipe.holds if pipe else 0, pipe_most_ahead=pipe.most_ahead if pipe else 0,
            pipe_off=pipe.off if pipe else False,
        )  # fmt: skip
    return ReplayResult(nbytes=len(data), channels=opts.multifd, pages=rep.pages,
                        syncs=rep.syncs, postcopy=figures,
                        shut=rep.rp.shut if rep.rp is not None else None,
                        pings=tuple(rep.pings),
                        pongs=tuple(rep.rp.pongs.values) if rep.rp is not None else ())  # fmt: skip


def _check_fit(events: list[Any], plan: PostcopyPlan | None, opts: ReplayOptions) -> None:
    """Options that do not fit the stream, refused before anything is sent."""
    if opts.max_postcopy_bandwidth < 0:
        raise UsageError("--max-postcopy-bandwidth is bytes/s, 0 or more")
    if opts.postcopy_preempt:
        if plan is None:
            raise UsageError("--postcopy-preempt: the capture has no switch to post-copy")
        machine = next((ev.machine_type for ev, _r, _w in events
                        if isinstance(ev, E.Configuration)), "")  # fmt: skip
        if not preempt_supported(machine):
            raise UsageError(f"--postcopy-preempt with machine type {machine!r}: destinations "
                             "before 8.0 run preempt another way, which replay does not")  # fmt: skip
    for on, flag in ((opts.postcopy_drain, "--postcopy-drain"), (opts.pipe_pings, "--pipe-pings")):
        if on and plan is None:
            raise UsageError(f"{flag}: the capture has no switch to post-copy")
    if opts.pipe_pings and plan is not None and plan.listening_ping is None:
        raise UsageError("--pipe-pings: no PING follows the capture's package (QEMU's and "
                         "livemig's sources send PING 4 there): nothing says when the "
                         "destination reads the main channel")  # fmt: skip
    if plan is not None and opts.multifd:
        raise UsageError("a post-copy capture is replayed on the main channel only (QEMU "
                         "refuses post-copy with multifd since 9.1): drop --multifd")  # fmt: skip


def _await_shut(rep: Replay, timeout: float) -> None:
    """A stream with a return path ends with the destination's SHUT: 0, or it failed."""
    if rep.rp is None:
        return
    if not rep.rp.done.wait(timeout):
        raise MigrationError(f"no SHUT from the destination within {timeout} s")
    if rep.rp.shut != 0:
        why = rep.rp.reason or rep.rp.error or (
            "no SHUT" if rep.rp.shut is None else f"SHUT {rep.rp.shut}")  # fmt: skip
        raise MigrationError(f"the destination did not load the stream ({why})")


def _broken(rep: Replay, exc: ChannelError) -> MigrationError:
    """The error for a channel that broke under the replay, with the likeliest reason."""
    if rep.post is not None and rep.preempt is None and isinstance(exc, ChannelTimeout):
        return MigrationError(f"{exc} after the switch to post-copy: a destination with "
                              "postcopy-preempt waits for its preempt channel there; give "
                              "--postcopy-preempt")  # fmt: skip
    if rep.rp is not None and rep.rp.done.wait(1) and rep.rp.shut:
        # the destination gave up first and said so; the broken write only followed
        return MigrationError(f"the destination did not load the stream ("
                              f"{rep.rp.reason or f'SHUT {rep.rp.shut}'}; then {exc})")  # fmt: skip
    # QEMU exits when a load fails (exit-on-error), often without a SHUT
    return MigrationError(f"{exc} (the destination went away: its own log says why)")
