"""The migration state tables, capabilities and parameters."""

from __future__ import annotations

import pytest

from livemig.errors import MigrationError, UsageError
from livemig.migration.options import CAPABILITIES, Capabilities, Parameters
from livemig.migration.state import MigrationState, MigrationStatus, to_dot

S = MigrationStatus


def test_source_happy_path_and_events() -> None:
    st = MigrationState("source")
    seen: list[tuple[str, str]] = []
    st.add_listener(lambda a, b: seen.append((a.value, b.value)))
    for s in (S.SETUP, S.ACTIVE, S.COMPLETED):
        st.move(s)
    assert seen == [("none", "setup"), ("setup", "active"), ("active", "completed")]
    st.move(S.SETUP)  # a new migration after a finished one


def test_illegal_move_refused() -> None:
    st = MigrationState("source")
    with pytest.raises(MigrationError, match="illegal migration state change none -> completed"):
        st.move(S.COMPLETED)
    assert st.status == S.NONE


def test_destination_table_differs() -> None:
    st = MigrationState("destination")
    st.move(S.ACTIVE)  # 7.2: none -> active on connect
    assert not st.can_move(S.CANCELLING)


def test_try_move_loses_race_cleanly() -> None:
    st = MigrationState("source")
    st.move(S.SETUP)
    st.move(S.CANCELLING)
    assert not st.try_move(S.ACTIVE, S.COMPLETED)
    assert st.status == S.CANCELLING


def test_dot_lists_every_move() -> None:
    dot = to_dot("source")
    assert '"active" -> "completed"' in dot


def test_capabilities_query_order_and_refusals() -> None:
    caps = Capabilities()
    assert [c["capability"] for c in caps.query()] == list(CAPABILITIES)
    caps.set([{"capability": "events", "state": True}])
    assert "events" in caps
    with pytest.raises(UsageError, match="not supported by livemig"):
        caps.set([{"capability": "rdma-pin-all", "state": True}])
    with pytest.raises(UsageError, match="not a migration capability"):
        caps.set([{"capability": "warp-drive", "state": True}])
    with pytest.raises(UsageError, match="'capability' must be a string"):
        caps.set([{"capability": 3, "state": True}])
    assert caps.enabled() == {"events"}  # refused sets changed nothing


def test_parameters_defaults_and_checks() -> None:
    p = Parameters()
    assert p["downtime-limit"] == 300
    assert p["max-bandwidth"] == 128 << 20
    p.set({"downtime-limit": 50, "max-bandwidth": 0})
    assert p["downtime-limit"] == 50
    with pytest.raises(UsageError, match="'downtime-limit' expects 0 to 2000000 milliseconds"):
        p.set({"downtime-limit": 2000001})
    with pytest.raises(UsageError, match="expected: integer"):
        p.set({"max-bandwidth": "fast"})
    with pytest.raises(UsageError, match="'bogus' is unexpected"):
        p.set({"bogus": 1})
    with pytest.raises(UsageError, match="power of two"):
        p.set({"xbzrle-cache-size": 5000})
    with pytest.raises(UsageError, match="does not accept value 'lz4'"):
        p.set({"multifd-compression": "lz4"})
    assert p["zero-page-detection"] == "multifd"  # QEMU 9.0's default
    p.set({"zero-page-detection": "none"})
    with pytest.raises(UsageError, match=r"'zero-page-detection' does not accept value 'all' "
                       r"\(one of: none, legacy, multifd\)"):  # fmt: skip
        p.set({"zero-page-detection": "all"})
    assert p["zero-page-detection"] == "none"
    with pytest.raises(UsageError):
        p.set({"downtime-limit": 10, "cpu-throttle-initial": 0})
    assert p["downtime-limit"] == 50  # all or nothing
