"""``livemig capture URI OUT``: receive a live migration from QEMU and store it.

Listens on ``tcp:HOST:PORT`` or ``unix:PATH``, accepts the source's main channel, writes every
byte to OUT and decodes as it goes, acting as a destination on the return path: after
OPEN_RETURN_PATH it answers each PING with PONG and, when the stream is complete, sends SHUT
(0 if the whole stream decodes, 1 if not). Device sections cannot be decoded live (their layouts
come in the vmdesc trailer), so from the first device section on the capture only watches for
the trailer; the whole file is then decoded with it before SHUT. Every wait has a time-out.

After a post-copy switch the source pushes the rest of RAM and ends with EOF, with no vmdesc
trailer: the capture ends there (it requests no pages: no guest runs here). ``livemig analyze``
then rebuilds RAM, and reports the package's device sections, which have no layout to be read
by, as not decoded. A source with postcopy-preempt also connects its preempt channel; urgent
pages, the only ones it carries, are pages a destination asked for, so nothing travels on it
and the capture leaves it unaccepted.

With ``--switchover-ack`` it approves the switch-over on the return path as soon as that opens,
as a QEMU destination with capability switchover-ack and no device that needs approving does
(QEMU 8.1+; a source with it never switches over without one).

With ``--tls-creds DIR`` it is a mutual TLS server on every channel, as a QEMU destination
with ``tls-creds``.

With ``--multifd N`` it also accepts the source's N multifd channels and writes the pages they
carry into OUT at each sync point (``capture_multifd``), so that OUT is a one-channel stream.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from livemig.errors import LivemigError, StreamError, UsageError
from livemig.transport import Channel, ChannelError, ChannelTimeout, Listener, parse_uri
from livemig.transport.tls import load_creds
from livemig.wire import events as E
from livemig.wire.decoder import Decoder, UnknownLayoutError
from livemig.wire.returnpath import Pong, Shut, SwitchoverAck, encode_rp
from livemig.wire.vmdesc import find_vmdesc

if TYPE_CHECKING:
    from livemig.cli.capture_multifd import MultifdCapture


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("capture", help="receive a live migration from QEMU into a file")
    parser.add_argument("uri", help="tcp:HOST:PORT or unix:PATH to listen on")
    parser.add_argument("out", help="file to store the stream in")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (each)")
    parser.add_argument("--switchover-ack", action="store_true",
                        help="the source has capability switchover-ack: approve the switch-over "
                             "once the return path opens, as a QEMU destination with it does "
                             "(the source waits for it)")  # fmt: skip
    add_multifd_arguments(
        parser, "the source has capability multifd with multifd-channels N: accept N more "
        "channels and write their pages into OUT", "the source's -uuid, which its multifd "
        "channels carry (QEMU's destination checks them against its own)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def add_multifd_arguments(parser: argparse.ArgumentParser, multifd: str, uuid_: str) -> None:
    """``--multifd N``, ``--multifd-compression``, ``--uuid`` (capture and replay)."""
    parser.add_argument("--multifd", type=int, metavar="N", default=0, help=multifd)
    parser.add_argument("--multifd-compression", choices=("none", "zlib", "zstd"),
                        default="none", help="multifd-compression, as the other side's")  # fmt: skip
    parser.add_argument("--uuid", default=str(uuid.UUID(int=0)),
                        help=f"{uuid_}; default all zero")  # fmt: skip
    parser.add_argument("--tls-creds", metavar="DIR", default="",
                        help="TLS on every channel with a QEMU tls-creds-x509 directory (ca-cert, "
                             "server- and client- cert and key .pem), as the other side's")  # fmt: skip
    parser.add_argument("--tls-hostname", default="",
                        help="the name the server's certificate must carry (default: the URI's "
                             "host)")  # fmt: skip


def _check_uri(uri: str) -> None:
    if parse_uri(uri).scheme not in ("tcp", "unix"):
        raise UsageError(f"unsupported URI {uri!r}: expected tcp:HOST:PORT or unix:PATH")


def check_arguments(args: argparse.Namespace, uri: str) -> bytes:
    """Refuse a bad ``--multifd``, ``--uuid`` or URI before anything starts; the UUID's bytes."""
    if args.multifd < 0 or args.multifd > 255:
        raise UsageError(f"--multifd {args.multifd}: multifd-channels is 1..255")
    _check_uri(uri)
    try:
        return uuid.UUID(args.uuid).bytes
    except ValueError:
        raise UsageError(f"--uuid {args.uuid!r} is not a UUID") from None


def listen(uri: str, timeout: float, tls_creds: str = "") -> Listener:
    """A listener on ``tcp:HOST:PORT`` or ``unix:PATH``; TLS with a credentials directory."""
    _check_uri(uri)
    creds = load_creds(tls_creds, "server") if tls_creds else None
    return Listener(parse_uri(uri), timeout=timeout, tls=creds)


class Capture:
    """The destination side of one captured migration (sans the socket)."""

    def __init__(self, multifd: MultifdCapture | None = None, switchover_ack: bool = False) -> None:
        self.decoder = Decoder()
        self.switchover_ack = switchover_ack
        self.data = bytearray()
        self.return_path = False
        self.live = True  # False once device sections are reached
        self.replies: list[bytes] = []
        self.pings = 0
        self.multifd = multifd
        self.postcopy = False  # a PACKAGED command came: no vmdesc trailer follows the EOF
        self.eof = False
        self._stream: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if not self.live:
            return
        dec = self.decoder
        dec.receive_data(chunk)
        try:
            while (ev := dec.next_event()) is not E.NEED_DATA:
                if isinstance(ev, E.OpenReturnPath):
                    self.return_path = True
                    if self.switchover_ack:
                        # no device here needs to approve it (QEMU: VFIO's do), so at once
                        self.replies.append(encode_rp(SwitchoverAck()))
                elif isinstance(ev, E.Ping):
                    self.pings += 1
                    if not self.return_path:
                        raise StreamError("PING without an open return path", dec.offset)
                    self.replies.append(encode_rp(Pong(ev.value)))
                elif isinstance(ev, E.Packaged):
                    self.postcopy = True
                elif isinstance(ev, E.Eof):
                    self.eof = True
                if self.multifd is not None:
                    self.multifd.event(ev, dec.offset, dec.last_block)  # type: ignore[arg-type]
        except UnknownLayoutError:
            self.live = False  # device sections: wait for the vmdesc trailer

    def complete(self) -> bool:
        """True when the stream ended cleanly: trailer seen (or EOF seen live)."""
        if self.live:
            # after a post-copy switch QEMU ends with EOF alone, and waits for SHUT
            return self.decoder.finished or (self.postcopy and self.eof)
        try:
            return find_vmdesc(self.data) is not None
        except StreamError:
            return False

    def stream(self) -> bytes:
        """The captured stream once complete; with multifd, the channels' pages written into
        it. Made once: verifying it and storing it need the same bytes (a guest's RAM)."""
        if self._stream is None:
            parts: list[bytes | memoryview] = []
            view = memoryview(self.data)
            at = 0
            for offset, records in self.multifd.inserts if self.multifd is not None else ():
                parts += (view[at:offset], records)
                at = offset
            parts.append(view[at:])
            self._stream = b"".join(parts)
        return self._stream

    def verify(self) -> None:
        from livemig.cli.analyze import analyze

        analyze(self.stream())


def run(args: argparse.Namespace) -> int:
    src_uuid = check_arguments(args, args.uri)
    listener = listen(args.uri, args.timeout, args.tls_creds)
    multifd: MultifdCapture | None = None
    try:
        try:
            if args.multifd:
                from livemig.cli.capture_multifd import MultifdCapture
                from livemig.migration.multifd import accept_channels

                main, chans = accept_channels(lambda t: listener.accept(timeout=t),
                                              args.multifd, src_uuid, args.timeout)  # fmt: skip
                multifd = MultifdCapture(chans, args.multifd_compression, args.timeout, main)
            else:
                main = listener.accept(timeout=args.timeout)
        except ChannelTimeout:
            raise LivemigError(
                f"no migration connected to {args.uri} in {args.timeout} s"
            ) from None
        with main:
            try:
                cap = receive(main, args.timeout, multifd,
                              None if multifd else lambda: _stray_multifd(listener),
                              switchover_ack=args.switchover_ack)  # fmt: skip
            except ChannelError:
                # a failed multifd channel shuts main down, under a read or a reply: say why
                if multifd is not None:
                    multifd.check()
                raise
    finally:
        if multifd is not None:
            multifd.close(completed=False)
        listener.close()
    out = cap.stream()
    Path(args.out).write_bytes(out)
    extra = ""
    if multifd is not None:
        zero = multifd.zero_pages
        zeros = f" and {zero} zero pages" if zero else ""  # QEMU 9.0+: zero-page-detection
        extra = (f" ({multifd.pages} pages{zeros} from {args.multifd} multifd channels, "
                 f"{multifd.syncs} sync points)")  # fmt: skip
    print(f"captured {len(out)} bytes into {args.out}{extra}")
    return 0


def _stray_multifd(listener: Listener) -> int:
    """How many multifd channels wait, never accepted, on ``listener``: a source with multifd
    opens them right after main, and its pages travel on them, so a capture without
    ``--multifd`` would otherwise store a stream without its RAM."""
    from livemig.wire.multifd import MultifdInit

    found = 0
    while True:
        try:
            ch = listener.accept(timeout=0.05, name="extra")
        except ChannelTimeout:
            return found
        with ch:
            ch.timeout = 1.0
            try:
                MultifdInit.unpack(ch.recv_exact(64))
                found += 1
            except (ChannelError, StreamError):
                pass  # not a multifd channel: not ours to judge


def _check_stray(stray: Callable[[], int] | None) -> None:
    n = stray() if stray is not None else 0
    if n:
        raise StreamError(f"the source opened {n} multifd channel(s) besides main and sent its "
                          f"pages there: capture it with --multifd {n} (and its "
                          f"multifd-compression)")  # fmt: skip


def receive(
    conn: Channel,
    timeout: float,
    multifd: MultifdCapture | None = None,
    stray: Callable[[], int] | None = None,
    switchover_ack: bool = False,
) -> Capture:
    """Read one migration from ``conn``, answering its return path; verify it; send SHUT.
    ``stray()`` counts multifd channels nobody accepted, checked before the SHUT."""
    conn.timeout = timeout
    cap = Capture(multifd, switchover_ack)
    deadline = time.monotonic() + 10 * timeout
    while True:
        if time.monotonic() > deadline:
            raise LivemigError("capture took too long; giving up")
        try:
            chunk = conn.recv(1 << 20)
        except ChannelTimeout:
            _check_stray(stray)  # a source stalled on channels nobody reads
            raise LivemigError(f"no data from the source for {timeout} s") from None
        if multifd is not None:
            multifd.check()
        if chunk:
            cap.feed(chunk)
        for reply in cap.replies:
            conn.send(reply)
        cap.replies.clear()
        if not chunk or cap.complete():
            break
    try:
        _check_stray(stray)
        cap.verify()
    except StreamError:
        if cap.return_path:
            conn.send(encode_rp(Shut(1)))
        raise
    if cap.return_path:
        conn.send(encode_rp(Shut(0)))
        # Let the source read SHUT and close first.
        try:
            conn.recv(1)
        except (ChannelError, OSError):
            pass
    return cap
