"""``livemig replay FILE URI``: send a stored migration stream to a listening destination as its
source would (``livemig.streams.replay``): a QEMU started with the same machine and
``-incoming``, for one. A capture can so be loaded again, or loaded with multifd
(``--multifd N``, ``--multifd-compression``); a post-copy capture is replayed as a post-copy
source (``--postcopy-preempt``, ``--max-postcopy-bandwidth``), with ``--postcopy-drain`` and
``--pipe-pings`` as livemig's own source sends it. The whole file is decoded and checked
before the first byte goes out.
"""

from __future__ import annotations

import argparse

from livemig.cli.argtypes import seconds
from livemig.cli.capture import add_multifd_arguments
from livemig.streams.replay import replay_stream


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="send a stored migration stream to a destination")
    p.add_argument("file", help="a stream file (livemig capture, migrate to file:/exec:cat)")
    p.add_argument("uri", help="tcp:HOST:PORT or unix:PATH the destination listens on")
    p.add_argument("--timeout", type=seconds(), default=60.0, help="seconds to wait (each)")
    p.add_argument("--postcopy-preempt", action="store_true",
                   help="a post-copy capture into a destination with postcopy-preempt: open "
                        "its preempt channel and send requested pages there (machine types "
                        "from 8.0 on)")  # fmt: skip
    p.add_argument("--max-postcopy-bandwidth", type=int, default=0, metavar="BYTES",
                   help="a post-copy capture: bytes/s of the background push after the switch "
                        "(QEMU's max-postcopy-bandwidth; requested pages are not held back); "
                        "default unlimited")  # fmt: skip
    p.add_argument("--postcopy-drain", action="store_true",
                   help="a post-copy capture: before its switch, discard every page it sends "
                        "after it and wait for the destination's PONG to a PING, as livemig's "
                        "source does (x-postcopy-drain); the capture's own discards then go "
                        "without the pages already discarded")  # fmt: skip
    p.add_argument("--pipe-pings", action="store_true",
                   help="a post-copy capture: push only once the destination answered the "
                        "PING after the package, in small PARTs with PINGs between them, never "
                        "more than 512 KiB beyond what its last PONG vouches for, as livemig's "
                        "source does")  # fmt: skip
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
        max_postcopy_bandwidth=args.max_postcopy_bandwidth, postcopy_drain=args.postcopy_drain,
        pipe_pings=args.pipe_pings,
    )  # fmt: skip
    extra = (f", {result.pages} pages over {result.channels} multifd channels, {result.syncs} "
             f"sync points" if result.channels else "")  # fmt: skip
    if result.postcopy is not None:
        pc = result.postcopy
        extra += (f", post-copy: {pc.pages} pages after the switch, {pc.served} sent on request "
                  f"({pc.requests} requests)")  # fmt: skip
        if args.postcopy_drain:
            extra += (f", drain: {pc.drain_pages} pages discarded, PONG after "
                      f"{pc.drain_wait * 1000:.2f} ms")  # fmt: skip
        if args.pipe_pings:
            extra += (f", pipe: PONG {pc.listening_wait * 1000:.2f} ms after the package, "
                      f"{pc.pipe_pings} PINGs ({pc.pipe_answered} answered), push held "
                      f"{pc.pipe_holds} times, at most {pc.pipe_most_ahead} bytes ahead"
                      f"{' (limit dropped: a PING went unanswered)' if pc.pipe_off else ''}")  # fmt: skip
    if result.pongs or result.pings:
        missing = _unanswered(result.pings, result.pongs)
        extra += (f", {len(result.pings)} PINGs, "
                  + (f"{len(missing)} unanswered: {', '.join(hex(v) for v in missing)}"
                     if missing else "each answered by its PONG"))  # fmt: skip
    print(f"replayed {result.nbytes} bytes of {args.file}{extra}")
    return 0


def _unanswered(pings: tuple[int, ...], pongs: tuple[int, ...]) -> list[int]:
    """The PINGs no PONG of the same value answered (one PONG answers one PING)."""
    left = list(pongs)
    out = []
    for v in pings:
        if v in left:
            left.remove(v)
        else:
            out.append(v)
    return out
