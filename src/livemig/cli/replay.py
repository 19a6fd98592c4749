"""``livemig replay FILE URI``: send a stored migration stream to a listening destination as its
source would (``livemig.streams.replay``): a QEMU started with the same machine and
``-incoming``, for one. A capture can so be loaded again, or loaded with multifd
(``--multifd N``, ``--multifd-compression``); a post-copy capture is replayed as a post-copy
source (``--postcopy-preempt``, ``--max-postcopy-bandwidth``). The whole file is decoded and
checked before the first byte goes out.
"""

from __future__ import annotations

import argparse

from livemig.cli.capture import add_multifd_arguments
from livemig.streams.replay import replay_stream


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="send a stored migration stream to a destination")
    p.add_argument("file", help="a stream file (livemig capture, migrate to file:/exec:cat)")
    p.add_argument("uri", help="tcp:HOST:PORT or unix:PATH the destination listens on")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (each)")
    p.add_argument("--postcopy-preempt", action="store_true",
                   help="a post-copy capture into a destination with postcopy-preempt: open "
                        "its preempt channel and send requested pages there (machine types "
                        "from 8.0 on)")  # fmt: skip
    p.add_argument("--max-postcopy-bandwidth", type=int, default=0, metavar="BYTES",
                   help="a post-copy capture: bytes/s of the background push after the switch "
                        "(QEMU's max-postcopy-bandwidth; requested pages are not held back); "
                        "default unlimited")  # fmt: skip
    add_multifd_arguments(
        p, "send the pages over N multifd channels (the destination needs capability multifd "
        "and multifd-channels N)", "VM UUID in the multifd handshake (the destination's -uuid)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = replay_stream(
        args.file, args.uri, timeout=args.timeout, multifd=args.multifd,
        multifd_compression=args.multifd_compression, uuid=args.uuid, tls_creds=args.tls_creds,
        tls_hostname=args.tls_hostname, postcopy_preempt=args.postcopy_preempt,
        max_postcopy_bandwidth=args.max_postcopy_bandwidth,
    )  # fmt: skip
    extra = (f", {result.pages} pages over {result.channels} multifd channels, {result.syncs} "
             f"sync points" if result.channels else "")  # fmt: skip
    if result.postcopy is not None:
        pc = result.postcopy
        extra += (f", post-copy: {pc.pages} pages after the switch, {pc.served} sent on request "
                  f"({pc.requests} requests)")  # fmt: skip
    print(f"replayed {result.nbytes} bytes of {args.file}{extra}")
    return 0
