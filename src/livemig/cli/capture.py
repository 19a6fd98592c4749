"""``livemig capture URI OUT``: receive a live migration from QEMU and store it.

The capture itself is ``livemig.streams.capture``: a destination on the return path that
keeps the stream, checks it whole and answers SHUT. ``--multifd N`` also accepts the source's
multifd channels and writes their pages into OUT, so that OUT is a one-channel stream;
``--switchover-ack`` approves the switch-over as a QEMU destination with that capability does;
``--tls-creds DIR`` makes every channel a mutual TLS server.
"""

from __future__ import annotations

import argparse
import sys

from livemig.cli.argtypes import seconds
from livemig.streams.capture import ZERO_UUID, capture_stream


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("capture", help="receive a live migration from QEMU into a file")
    parser.add_argument("uri", help="tcp:HOST:PORT or unix:PATH to listen on")
    parser.add_argument("out", help="file to store the stream in")
    parser.add_argument("--timeout", type=seconds(), default=60.0, help="seconds to wait (each)")
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
    parser.add_argument("--uuid", default=ZERO_UUID,
                        help=f"{uuid_}; default all zero")  # fmt: skip
    parser.add_argument("--tls-creds", metavar="DIR", default="",
                        help="TLS on every channel with a QEMU tls-creds-x509 directory (ca-cert, "
                             "server- and client- cert and key .pem), as the other side's")  # fmt: skip
    parser.add_argument("--tls-hostname", default="",
                        help="the name the server's certificate must carry (default: the URI's "
                             "host)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    def listening(address: str) -> None:
        # where to point the source: the real port of a tcp: port 0, which was told nowhere
        print(f"livemig capture: waiting on {address}", file=sys.stderr, flush=True)

    result = capture_stream(args.uri, args.out, timeout=args.timeout, multifd=args.multifd,
                            multifd_compression=args.multifd_compression, uuid=args.uuid,
                            tls_creds=args.tls_creds, switchover_ack=args.switchover_ack,
                            on_listening=listening)  # fmt: skip
    extra = ""
    if result.channels:
        zero = result.zero_pages
        zeros = f" and {zero} zero pages" if zero else ""  # QEMU 9.0+: zero-page-detection
        extra = (f" ({result.pages} pages{zeros} from {result.channels} multifd channels, "
                 f"{result.syncs} sync points)")  # fmt: skip
    print(f"captured {len(result.stream)} bytes into {args.out}{extra}")
    return 0
