"""``livemig capture URI OUT``: receive a live migration from QEMU and store it.

The capture itself is ``livemig.streams.capture``: a destination on the return path that
keeps the stream, checks it whole and answers SHUT. ``--multifd N`` also accepts the source's
multifd channels and writes their pages into OUT, so that OUT is a one-channel stream;
``--switchover-ack`` approves the switch-over as a QEMU destination with that capability does;
``--tls-creds DIR`` makes every channel a mutual TLS server.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from livemig.errors import LivemigError, UsageError
from livemig.streams.capture import _stray_multifd, check_uri, listen, receive
from livemig.transport import ChannelError, ChannelTimeout

if TYPE_CHECKING:
    from livemig.streams.capture_multifd import MultifdCapture


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


def check_arguments(args: argparse.Namespace, uri: str) -> bytes:
    """Refuse a bad ``--multifd``, ``--uuid`` or URI before anything starts; the UUID's bytes."""
    if args.multifd < 0 or args.multifd > 255:
        raise UsageError(f"--multifd {args.multifd}: multifd-channels is 1..255")
    check_uri(uri)
    try:
        return uuid.UUID(args.uuid).bytes
    except ValueError:
        raise UsageError(f"--uuid {args.uuid!r} is not a UUID") from None


def run(args: argparse.Namespace) -> int:
    src_uuid = check_arguments(args, args.uri)
    listener = listen(args.uri, args.timeout, args.tls_creds)
    multifd: MultifdCapture | None = None
    try:
        try:
            if args.multifd:
                from livemig.migration.multifd import accept_channels
                from livemig.streams.capture_multifd import MultifdCapture

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
