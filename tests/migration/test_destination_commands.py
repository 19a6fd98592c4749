"""A livemig destination and the commands QEMU 10.0's sources add to a stream."""

from __future__ import annotations

from pathlib import Path

from livemig.testing.fuzz import feed, record_livemig_stream
from livemig.wire import events as E
from livemig.wire.decoder import Decoder


def test_switchover_start_is_taken(tmp_path: Path) -> None:
    """MIG_CMD_SWITCHOVER_START, which a QEMU 10.0 source sends before the final RAM section:
    a livemig destination loads the stream with it (it was refused: 'SwitchoverStart is not
    supported in a pre-copy stream')."""
    corpus = record_livemig_stream(tmp_path / "s.mig")
    dec = Decoder(with_header=True)
    dec.receive_data(corpus.data)
    at = None
    while True:
        before = dec.offset
        ev = dec.next_event()
        if isinstance(ev, E.SectionEnd):
            at = before
            break
        assert ev is not E.NEED_DATA, "no END section"
    data = corpus.data[:at] + bytes.fromhex("08000b0000") + corpus.data[at:]
    outcome, detail, _peak, _guards = feed(corpus, data)
    assert outcome == "completed", detail
