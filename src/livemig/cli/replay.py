"""``livemig replay FILE URI``: send a stored migration stream to a listening destination as its
source would (``livemig.streams.replay``): a QEMU started with the same machine and
``-incoming``, for one. A capture can so be loaded again, or loaded with multifd
(``--multifd N``, ``--multifd-compression``); a post-copy capture is replayed as a post-copy
source (``--postcopy-preempt``, ``--max-postcopy-bandwidth``). The whole file is decoded and
checked before the first byte goes out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from livemig.cli.capture import add_multifd_arguments, check_arguments
from livemig.errors import LivemigError, UsageError
from livemig.streams.replay import Replay, preempt_supported, stream_events
from livemig.streams.replay_postcopy import PostcopyPlan
from livemig.transport import ChannelError, ChannelTimeout, connect
from livemig.transport.tls import load_creds, set_migration_tls
from livemig.wire import events as E


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
    src_uuid = check_arguments(args, args.uri)
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    # every channel (main, multifd) connects with these, as a source's do
    set_migration_tls("client", load_creds(args.tls_creds, "client", args.tls_hostname)
                      if args.tls_creds else None)  # fmt: skip
    # the whole file is read and checked before the first byte goes out: what cannot be
    # replayed is refused here, saying why, rather than after part of it
    events = list(stream_events(data))
    plan = PostcopyPlan.from_events(events)
    if args.max_postcopy_bandwidth < 0:
        raise UsageError("--max-postcopy-bandwidth is bytes/s, 0 or more")
    if args.postcopy_preempt:
        if plan is None:
            raise UsageError("--postcopy-preempt: the capture has no switch to post-copy")
        machine = next((ev.machine_type for ev, _r, _w in events
                        if isinstance(ev, E.Configuration)), "")  # fmt: skip
        if not preempt_supported(machine):
            raise UsageError(f"--postcopy-preempt with machine type {machine!r}: destinations "
                             "before 8.0 run preempt another way, which replay does not")  # fmt: skip
    if plan is not None and args.multifd:
        raise UsageError("a post-copy capture is replayed on the main channel only (QEMU "
                         "refuses post-copy with multifd since 9.1): drop --multifd")  # fmt: skip
    main = connect(args.uri, timeout=args.timeout)
    rep = Replay(main, args, src_uuid)
    rep.data = data
    rep.plan = plan
    try:
        for ev, raw, where in events:
            rep.event(ev, raw, where)
        rep.flush()
        if rep.sender is not None:
            rep.sender.close(graceful=True)
            rep.sender.check()
        if rep.rp is not None:
            if not rep.rp.done.wait(args.timeout):
                raise LivemigError(f"no SHUT from the destination within {args.timeout} s")
            if rep.rp.shut != 0:
                why = rep.rp.reason or rep.rp.error or (
                    "no SHUT" if rep.rp.shut is None else f"SHUT {rep.rp.shut}")  # fmt: skip
                raise LivemigError(f"the destination did not load the stream ({why})")
    except ChannelError as exc:
        if rep.sender is not None:
            rep.sender.close(graceful=False)
        if rep.post is not None and rep.preempt is None and isinstance(exc, ChannelTimeout):
            raise LivemigError(f"{exc} after the switch to post-copy: a destination with "
                               "postcopy-preempt waits for its preempt channel there; give "
                               "--postcopy-preempt") from None  # fmt: skip
        if rep.rp is not None and rep.rp.done.wait(1) and rep.rp.shut:
            # the destination gave up first and said so; the broken write only followed
            raise LivemigError(f"the destination did not load the stream ("
                               f"{rep.rp.reason or f'SHUT {rep.rp.shut}'}; then {exc})"
                               ) from None  # fmt: skip
        # QEMU exits when a load fails (exit-on-error), often without a SHUT
        raise LivemigError(f"{exc} (the destination went away: its own log says why)") from None
    except BaseException:
        if rep.sender is not None:
            rep.sender.close(graceful=False)
        raise
    finally:
        main.close()
        if rep.preempt is not None:
            rep.preempt.close()
    extra = (f", {rep.pages} pages over {args.multifd} multifd channels, {rep.syncs} sync "
             f"points" if args.multifd else "")  # fmt: skip
    if rep.post is not None:
        post = rep.post
        if post.unsent():
            raise LivemigError(f"{post.unsent()} post-copy pages were never sent (a bug)")
        extra += (f", post-copy: {plan.pages if plan else 0} pages after the switch, "
                  f"{post.served} sent on request ({post.requested} requests)")  # fmt: skip
    print(f"replayed {len(data)} bytes of {args.file}{extra}")
    return 0
