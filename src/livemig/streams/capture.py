"""Capture: receive a live migration (QEMU's or livemig's) and keep its stream.

A capture listens on ``tcp:HOST:PORT`` or ``unix:PATH``, accepts the source's main channel,
keeps every byte and decodes as it goes, acting as a destination on the return path: after
OPEN_RETURN_PATH it answers each PING with PONG and, when the stream is complete, sends SHUT
(0 if the whole stream decodes, 1 if not). Device sections cannot be decoded live (their layouts
come in the vmdesc trailer), so from the first device section on the capture only watches for
the trailer; the whole stream is then decoded with it before SHUT. Every wait has a time-out.

After a post-copy switch the source pushes the rest of RAM and ends with EOF, with no vmdesc
trailer: the capture ends there (it requests no pages: no guest runs here). ``analyze``
then rebuilds RAM, and reports the package's device sections, which have no layout to be read
by, as not decoded. A source with postcopy-preempt also connects its preempt channel; urgent
pages, the only ones it carries, are pages a destination asked for, so nothing travels on it
and the capture leaves it unaccepted.

With ``switchover_ack`` it approves the switch-over on the return path as soon as that opens,
as a QEMU destination with capability switchover-ack and no device that needs approving does
(QEMU 8.1+; a source with it never switches over without one).

With TLS credentials it is a mutual TLS server on every channel, as a QEMU destination with
``tls-creds``.

With multifd channels it also accepts the source's N multifd channels and writes the pages they
carry into the stream at each sync point (``capture_multifd``), so that the result is a
one-channel stream.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from livemig.errors import MigrationError, StreamError, UsageError
from livemig.transport import Channel, ChannelError, ChannelTimeout, Listener, parse_uri
from livemig.transport.open import check_file
from livemig.transport.tls import load_creds
from livemig.transport.uri import MigrationURI
from livemig.wire import events as E
from livemig.wire.decoder import Decoder, UnknownLayoutError
from livemig.wire.returnpath import Pong, Shut, SwitchoverAck, encode_rp
from livemig.wire.vmdesc import find_vmdesc

if TYPE_CHECKING:
    from livemig.streams.capture_multifd import MultifdCapture


ZERO_UUID = str(uuid.UUID(int=0))  # QEMU's -uuid default: what its multifd channels carry


def check_channels(n: int) -> None:
    """Refuse a multifd channel count QEMU would not have (0: no multifd)."""
    if n < 0 or n > 255:
        raise UsageError(f"--multifd {n}: multifd-channels is 1..255")


def parse_uuid(text: str) -> bytes:
    """A VM UUID as text (a source's ``-uuid``) to the 16 bytes multifd handshakes carry."""
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        raise UsageError(f"--uuid {text!r} is not a UUID") from None


def check_uri(uri: str) -> None:
    """Refuse a URI other than ``tcp:`` or ``unix:`` (where a source connects, channels and all)."""
    if parse_uri(uri).scheme not in ("tcp", "unix"):
        raise UsageError(f"unsupported URI {uri!r}: expected tcp:HOST:PORT or unix:PATH")


def listen(uri: str, timeout: float, tls_creds: str = "") -> Listener:
    """A listener on ``tcp:HOST:PORT`` or ``unix:PATH``; TLS with a credentials directory."""
    check_uri(uri)
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
        from livemig.streams.analyze import analyze_stream

        analyze_stream(self.stream())


def stray_multifd(listener: Listener) -> int:
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
            raise MigrationError("capture took too long; giving up")
        try:
            chunk = conn.recv(1 << 20)
        except ChannelTimeout:
            _check_stray(stray)  # a source stalled on channels nobody reads
            raise MigrationError(f"no data from the source for {timeout} s") from None
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


@dataclasses.dataclass(frozen=True)
class CaptureResult:
    """One captured migration: its stream as stored (with multifd, the channels' pages written
    into it) and what it took to get it."""

    stream: bytes
    path: Path | None  # where it was written, if anywhere
    channels: int  # multifd channels received besides main (0: none)
    pages: int  # normal pages the multifd channels carried (a page sent twice in one interval counts once)
    zero_pages: int  # pages the multifd channels sent as zero (QEMU 9.0+ zero-page-detection)
    syncs: int  # multifd sync points
    return_path: bool  # the source opened one (and got SHUT 0 on it)
    postcopy: bool  # a post-copy migration (a PACKAGED command, no vmdesc trailer)


class CaptureServer:
    """A destination that records: listens on ``tcp:HOST:PORT`` or ``unix:PATH`` (``address``
    is where, a port 0 resolved) and ``receive`` takes one migration from the first source
    that connects. Options are checked, and the socket bound, before anything else happens;
    every wait is bounded by ``timeout`` seconds."""

    def __init__(
        self,
        uri: str,
        *,
        timeout: float = 60.0,
        multifd: int = 0,
        multifd_compression: str = "none",
        uuid: str = ZERO_UUID,
        tls_creds: str = "",
        switchover_ack: bool = False,
    ) -> None:
        check_channels(multifd)
        check_uri(uri)
        self.uuid = parse_uuid(uuid)
        self.uri = uri
        self.timeout = timeout
        self.multifd = multifd
        self.multifd_compression = multifd_compression
        self.switchover_ack = switchover_ack
        self.listener = listen(uri, timeout, tls_creds)

    @property
    def address(self) -> str:
        return self.listener.address

    def receive(self) -> CaptureResult:
        """Accept the source's channels, receive and check its stream, send SHUT; then close
        the listener. Raises ``StreamError`` for a stream that does not decode (or multifd
        channels nobody asked for), ``MigrationError`` when the source does not come or stalls."""
        multifd: MultifdCapture | None = None
        try:
            main, multifd = self._accept()
            with main:
                try:
                    cap = receive(main, self.timeout, multifd,
                                  None if multifd else lambda: stray_multifd(self.listener),
                                  switchover_ack=self.switchover_ack)  # fmt: skip
                except ChannelError:
                    # a failed multifd channel shuts main down, under a read or a reply: say why
                    if multifd is not None:
                        multifd.check()
                    raise
        finally:
            if multifd is not None:
                multifd.close(completed=False)
            self.close()
        return CaptureResult(
            stream=cap.stream(), path=None, channels=self.multifd,
            pages=multifd.pages if multifd else 0, zero_pages=multifd.zero_pages if multifd else 0,
            syncs=multifd.syncs if multifd else 0, return_path=cap.return_path,
            postcopy=cap.postcopy,
        )  # fmt: skip

    def _accept(self) -> tuple[Channel, MultifdCapture | None]:
        nobody = MigrationError(f"no migration connected to {self.uri} in {self.timeout} s")
        try:
            if not self.multifd:
                return self.listener.accept(timeout=self.timeout), None
        except ChannelTimeout:
            raise nobody from None
        from livemig.migration.multifd import accept_channels
        from livemig.streams.capture_multifd import MultifdCapture

        # accept_channels waits for ever for the first channel, as a destination does; a
        # capture gives up after its time-out (its time-outs after that are accept_channels')
        give_up = time.monotonic() + self.timeout
        came = False

        def accept(timeout: float) -> Channel:
            nonlocal came
            if not came and time.monotonic() > give_up:
                raise nobody
            ch = self.listener.accept(timeout=timeout)
            came = True
            return ch

        main, chans = accept_channels(accept, self.multifd, self.uuid, self.timeout)
        return main, MultifdCapture(chans, self.multifd_compression, self.timeout, main)

    def close(self) -> None:
        self.listener.close()

    def __enter__(self) -> CaptureServer:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def capture_stream(
    uri: str,
    out: str | PathLike[str] | None = None,
    *,
    timeout: float = 60.0,
    multifd: int = 0,
    multifd_compression: str = "none",
    uuid: str = ZERO_UUID,
    tls_creds: str = "",
    switchover_ack: bool = False,
    on_listening: Callable[[str], None] | None = None,
) -> CaptureResult:
    """Receive one live migration on ``uri`` (``tcp:`` or ``unix:``) and write its stream to
    ``out`` (if given) once it is complete and checked: ``livemig capture``.

    ``multifd`` (with ``multifd_compression`` and the source's ``uuid``) accepts that many
    multifd channels and writes their pages into the stream; ``switchover_ack`` approves the
    switch-over as a QEMU destination with that capability does; ``tls_creds`` (a QEMU
    tls-creds-x509 directory) makes every channel a TLS server. ``on_listening`` is told the
    address listened on (a ``tcp:`` port 0 resolved) before the wait begins."""
    if out is not None:
        # before listening: found only at the end, the source had sent its whole migration
        # (and stopped its guest for it) into a capture that could not keep it
        check_file(MigrationURI("file", path=str(out)), writing=True)
    with CaptureServer(uri, timeout=timeout, multifd=multifd,
                       multifd_compression=multifd_compression, uuid=uuid,
                       tls_creds=tls_creds, switchover_ack=switchover_ack) as server:  # fmt: skip
        if on_listening is not None:
            on_listening(server.address)
        result = server.receive()
    if out is None:
        return result
    Path(out).write_bytes(result.stream)
    return dataclasses.replace(result, path=Path(out))
