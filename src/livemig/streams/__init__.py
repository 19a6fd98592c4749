"""Recorded migration streams: a live migration kept as a file, run again, and read.

A migration stream is QEMU's format (``wire``) on one channel: the header, the RAM section's
passes, the device sections, EOF, and QEMU's vmdesc trailer that describes the devices. A file
holding one is a snapshot (``migrate file:``, QEMU's ``savevm``-style save) or a recording of
a live migration. Three operations work on such streams, each for QEMU's streams (7.2 to 10.0)
as for livemig's own:

``capture_stream`` (``capture``, ``capture_multifd``): a destination that records. It listens
where a source migrates to and plays the destination's part of the protocol without a guest:
it answers the return path (PONG for PING, switchover-ack when asked, SHUT at the end), accepts
multifd channels and folds their pages into the main stream at each sync point, so that what it
keeps is a one-channel stream. Nothing is written until the whole stream decodes; SHUT tells
the source whether it did.

``replay_stream`` (``replay``, ``replay_postcopy``): a source that plays a recording back.
The whole stream is decoded and checked first, then sent to a listening destination as its
source would send it: everything but the RAM records byte for byte, the RAM records encoded
again, so that they can go over multifd channels with the stream's own sync points, or come
from a mapped-ram file's page regions. A post-copy recording is replayed as a post-copy source
that serves the destination's page requests from the pages it holds after the switch.

``analyze_stream`` (``analyze``): a reader. It decodes a whole stream (its vmdesc trailer
first, for the device layouts), counts what it holds, rebuilds each RAM block from the page
records alone (``dump_ram``), and with ``verify`` checks livemig's checksums and RAM digests as
a destination would (``verify_file`` reads back a file a migration wrote).

The layer sits beside ``migration``, which it does not replace: a migration moves a running
guest between two machines; a stream here has no guest behind it, only bytes and the
protocol's rules. It is built from the layers below it: ``transport`` channels and listeners,
``wire``'s sans-IO codec and return-path messages, ``savevm``'s RAM loader and checksum rules,
and ``migration``'s multifd sender and receiver and mapped-ram layout. Errors are livemig's:
``UsageError`` for options that do not fit (refused before anything is sent or written),
``StreamError`` with its offset for a stream that breaks the format, ``MigrationError`` when
the peer does not come, stalls, or does not load what was sent; every wait has a time-out.
``livemig capture``, ``replay`` and ``analyze`` (``livemig.cli``) are their command lines and
only print what these return.
"""

from livemig.streams.analyze import (
    Analysis,
    StreamVerifier,
    analyze_stream,
    dump_ram,
    read_stream,
    verify_file,
)
from livemig.streams.capture import (
    ZERO_UUID,
    Capture,
    CaptureResult,
    CaptureServer,
    capture_stream,
)
from livemig.streams.replay import (
    PostcopyFigures,
    Replay,
    ReplayOptions,
    ReplayResult,
    flush_words_expected,
    preempt_supported,
    replay_stream,
    stream_events,
)
from livemig.streams.replay_postcopy import PostcopyPlan, PostcopyServer

__all__ = [
    "ZERO_UUID",
    "Analysis",
    "Capture",
    "CaptureResult",
    "CaptureServer",
    "PostcopyFigures",
    "PostcopyPlan",
    "PostcopyServer",
    "Replay",
    "ReplayOptions",
    "ReplayResult",
    "StreamVerifier",
    "analyze_stream",
    "capture_stream",
    "dump_ram",
    "flush_words_expected",
    "preempt_supported",
    "read_stream",
    "replay_stream",
    "stream_events",
    "verify_file",
]
