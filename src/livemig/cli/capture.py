"""``livemig capture URI OUT``: receive a live pre-copy migration from QEMU and store it.

Listens on ``tcp:HOST:PORT`` or ``unix:PATH``, accepts the source's main channel, writes every
byte to OUT and decodes as it goes, acting as a destination on the return path: after
OPEN_RETURN_PATH it answers each PING with PONG and, when the stream is complete, sends SHUT
(0 if the whole stream decodes, 1 if not). Device sections cannot be decoded live (their layouts
come in the vmdesc trailer), so from the first device section on the capture only watches for
the trailer; the whole file is then decoded with it before SHUT. Every wait has a time-out.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

from livemig.errors import LivemigError, StreamError, UsageError
from livemig.wire import events as E
from livemig.wire.decoder import Decoder, UnknownLayoutError
from livemig.wire.returnpath import Pong, Shut, encode_rp
from livemig.wire.vmdesc import find_vmdesc


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("capture", help="receive a live migration from QEMU into a file")
    parser.add_argument("uri", help="tcp:HOST:PORT or unix:PATH to listen on")
    parser.add_argument("out", help="file to store the stream in")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (each)")
    parser.set_defaults(func=run)


def listen(uri: str) -> socket.socket:
    """A listening socket for ``tcp:HOST:PORT`` or ``unix:PATH``."""
    if uri.startswith("tcp:"):
        host, _, port = uri[4:].rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        if not port.isdigit():
            raise UsageError(f"bad tcp URI {uri!r}: expected tcp:HOST:PORT")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        addr: object = (host, int(port))
    elif uri.startswith("unix:"):
        path = uri[5:]
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = path
    else:
        raise UsageError(f"unsupported URI {uri!r}: expected tcp:HOST:PORT or unix:PATH")
    try:
        sock.bind(addr)  # type: ignore[arg-type]
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {uri}: {exc.strerror}") from None
    sock.listen(1)
    return sock


class Capture:
    """The destination side of one captured migration (sans the socket)."""

    def __init__(self) -> None:
        self.decoder = Decoder()
        self.data = bytearray()
        self.return_path = False
        self.live = True  # False once device sections are reached
        self.replies: list[bytes] = []
        self.pings = 0

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if not self.live:
            return
        self.decoder.receive_data(chunk)
        try:
            for ev in self.decoder.events():
                if isinstance(ev, E.OpenReturnPath):
                    self.return_path = True
                elif isinstance(ev, E.Ping):
                    self.pings += 1
                    if not self.return_path:
                        raise StreamError("PING without an open return path", self.decoder.offset)
                    self.replies.append(encode_rp(Pong(ev.value)))
        except UnknownLayoutError:
            self.live = False  # device sections: wait for the vmdesc trailer

    def complete(self) -> bool:
        """True when the stream ended cleanly: trailer seen (or EOF seen live)."""
        if self.live:
            return self.decoder.finished
        try:
            return find_vmdesc(self.data) is not None
        except StreamError:
            return False

    def verify(self) -> None:
        from livemig.cli.analyze import analyze

        analyze(bytes(self.data))


def run(args: argparse.Namespace) -> int:
    server = listen(args.uri)
    server.settimeout(args.timeout)
    try:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            raise LivemigError(
                f"no migration connected to {args.uri} in {args.timeout} s"
            ) from None
        with conn:
            cap = receive(conn, args.timeout)
    finally:
        server.close()
        if args.uri.startswith("unix:"):
            Path(args.uri[5:]).unlink(missing_ok=True)
    Path(args.out).write_bytes(cap.data)
    print(f"captured {len(cap.data)} bytes into {args.out}")
    return 0


def receive(conn: socket.socket, timeout: float) -> Capture:
    """Read one migration from ``conn``, answering its return path; verify it; send SHUT."""
    conn.settimeout(timeout)
    cap = Capture()
    deadline = time.monotonic() + 10 * timeout
    while True:
        if time.monotonic() > deadline:
            raise LivemigError("capture took too long; giving up")
        try:
            chunk = conn.recv(1 << 20)
        except TimeoutError:
            raise LivemigError(f"no data from the source for {timeout} s") from None
        if chunk:
            cap.feed(chunk)
        for reply in cap.replies:
            conn.sendall(reply)
        cap.replies.clear()
        if not chunk or cap.complete():
            break
    try:
        cap.verify()
    except StreamError:
        if cap.return_path:
            conn.sendall(encode_rp(Shut(1)))
        raise
    if cap.return_path:
        conn.sendall(encode_rp(Shut(0)))
        # Let the source read SHUT and close first.
        try:
            conn.recv(1)
        except OSError:
            pass
    return cap
