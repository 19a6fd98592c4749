"""livemig's return-path XError: round trip, a long reason cut at a character boundary within
QEMU's 512-byte payload, and byte-at-a-time decoding."""

from __future__ import annotations

from livemig.wire import ReturnPathDecoder, Shut, XError, encode_rp
from livemig.wire.constants import MAX_RP_PAYLOAD, ReturnPathType


def test_x_error_round_trip_and_cut() -> None:
    msgs = [XError("section 'cpu' instance 1 has no device here"), XError("é" * 400, True),
            Shut(1)]  # fmt: skip
    wire = b"".join(encode_rp(m) for m in msgs)
    assert int.from_bytes(wire[:2], "big") == ReturnPathType.X_ERROR == 0x4C01
    dec = ReturnPathDecoder()
    for i in range(len(wire)):
        dec.receive_data(wire[i : i + 1])
    got = dec.events()
    assert got[0] == msgs[0] and got[2] == Shut(1)
    long = got[1]
    assert isinstance(long, XError) and long.reason.endswith("...") and long.not_started
    assert long.reason.startswith("é" * 200) and len(long.reason.encode()) < MAX_RP_PAYLOAD


def test_x_error_without_flags_is_refused() -> None:
    import pytest

    from livemig.errors import StreamError

    dec = ReturnPathDecoder()
    dec.receive_data(int(ReturnPathType.X_ERROR).to_bytes(2, "big") + bytes(2))
    with pytest.raises(StreamError, match="flags byte"):
        dec.events()
