"""Test helpers shipped with livemig, for its own suite and for anyone testing against it.

- ``livemig.testing.streams``: codec pairs, in-memory byte streams, fault-injecting readers,
  re-exported here (``decode_all``, ``encode_all``, ``CodecPair``, ``flatten``, ...).
- ``livemig.testing.procs``: real ``livemig run`` processes driven over QMP (``ProcHarness``).
- ``livemig.testing.fuzz``: mutated real streams fed to a real destination.

``procs`` and ``fuzz`` are imported on demand: they pull in the machine and the migration code,
while the stream helpers are cheap.
"""

from livemig.testing.streams import (
    CodecPair,
    FaultyReader,
    MemoryPipe,
    decode_all,
    encode_all,
    feed_until_error,
    flatten,
    pipe_pair,
    random_pages,
)

__all__ = [
    "CodecPair",
    "FaultyReader",
    "MemoryPipe",
    "decode_all",
    "encode_all",
    "feed_until_error",
    "flatten",
    "pipe_pair",
    "random_pages",
]
