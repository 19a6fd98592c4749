"""The migration state tables, capabilities and parameters."""

from __future__ import annotations

import re

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
    """QEMU 10.0's capability list and migrate_caps_check, message for message."""
    caps = Capabilities()
    assert [c["capability"] for c in caps.query()] == list(CAPABILITIES)
    assert "compress" not in CAPABILITIES and "block" not in CAPABILITIES  # gone in 9.1
    caps.set([{"capability": "events", "state": True}])
    assert "events" in caps
    for bad, words in [
        ({"multifd": True, "xbzrle": True}, "Multifd is not compatible with xbzrle"),
        ({"mapped-ram": True, "xbzrle": True}, "Mapped-ram migration is incompatible with xbzrle"),
        ({"postcopy-preempt": True}, "Postcopy preempt requires postcopy-ram"),
        ({"switchover-ack": True}, "Capability 'switchover-ack' requires capability "
                                   "'return-path'"),
        ({"x-colo": True}, "Capability 'x-colo' requires capability 'return-path'"),
        ({"x-colo": True, "return-path": True, "multifd": True},
         "Capability 'x-colo' is not compatible with 'multifd'"),
        ({"dirty-limit": True}, "dirty-limit requires KVM"),
        ({"background-snapshot": True}, "Background-snapshot is not supported by livemig"),
        ({"warp-drive": True}, "Parameter 'capability' does not accept value 'warp-drive'"),
    ]:  # fmt: skip
        with pytest.raises(UsageError, match=re.escape(words)):
            caps.set(bad)
    with pytest.raises(UsageError, match="Multifd must be set before incoming starts"):
        caps.set({"multifd": True}, incoming_started=True)
    with pytest.raises(
        UsageError, match=re.escape("'capabilities[0].capability', expected: string")
    ):
        caps.set([{"capability": 3, "state": True}])
    assert caps.enabled() == {"events"}  # refused sets changed nothing
    caps.set({"rdma-pin-all": True, "dirty-bitmaps": True})  # nothing to act on here
    assert "rdma-pin-all" in caps


def test_parameters_defaults_and_checks() -> None:
    """QEMU 10.0's parameters, QAPI types and migrate_params_check, message for message."""
    p = Parameters()
    assert p["downtime-limit"] == 300
    assert p["max-bandwidth"] == 128 << 20
    assert p["announce-step"] == 100 and p["mode"] == "normal" and p["direct-io"] is False
    p.set({"downtime-limit": 50, "max-bandwidth": 0})
    assert p["downtime-limit"] == 50
    for bad, words in [
        ({"downtime-limit": 2000001},
         "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
        ({"downtime-limit": -1}, "'downtime_limit' expects an integer in the range"),  # wraps
        ({"max-bandwidth": "fast"}, "Parameter 'max-bandwidth' expects uint64"),
        ({"multifd-channels": 300}, "Parameter 'multifd-channels' expects uint8_t"),
        ({"multifd-channels": 0}, "Parameter 'multifd_channels' expects a value between 1 and 255"),
        ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"xbzrle-cache-size": 5000}, "a power of two no less than the target page size"),
        ({"multifd-compression": "lz4"}, "Parameter 'multifd-compression' does not accept value "
                                         "'lz4'"),
        ({"max-cpu-throttle": 10}, "in the range of cpu_throttle_initial to 99"),
        ({"tls-creds": 5}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
        ({"cpu-throttle-tailslow": 1}, "'cpu-throttle-tailslow', expected: boolean"),
    ]:  # fmt: skip
        with pytest.raises(UsageError, match=re.escape(words)):
            p.set(bad)
    p.set({"max-bandwidth": -1})  # QEMU's "backward compatibility": a negative size wraps
    assert p["max-bandwidth"] == (1 << 64) - 1
    p.set({"tls-creds": None})  # null is ""
    assert p["tls-creds"] == ""
    assert p["zero-page-detection"] == "multifd"  # QEMU 9.0's default
    p.set({"zero-page-detection": "none"})
    assert p["zero-page-detection"] == "none"
    with pytest.raises(UsageError):
        p.set({"downtime-limit": 10, "cpu-throttle-initial": 0})
    assert p["downtime-limit"] == 50  # all or nothing


def test_migrate_channels_as_qemu_10_takes_them() -> None:
    """QEMU 10.0's ``channels`` argument: the URI QEMU's migrate_uri_parse gives the same
    address, and QEMU's errors."""
    from livemig.migration.channels import channels_uri
    from livemig.migration.manager import qmp_uri

    def main(addr: dict) -> list:
        return [{"channel-type": "main", "addr": addr}]

    sock = {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"}
    assert channels_uri(main(sock), False) == "tcp:127.0.0.1:4444"
    assert channels_uri(main({**sock, "host": "::1"}), False) == "tcp:[::1]:4444"
    assert channels_uri(main({"transport": "socket", "type": "unix", "path": "/p"}),
                        True) == "unix:/p"  # fmt: skip
    assert channels_uri(main({"transport": "socket", "type": "unix", "path": "/p",
                              "abstract": False}), True) == "unix:/p"  # fmt: skip
    assert channels_uri(main({**sock, "keep-alive": True, "numeric": True}),
                        False) == "tcp:127.0.0.1:4444"  # fmt: skip
    assert channels_uri(main({"transport": "exec", "args": ["/bin/sh", "-c", "cat > f"]}),
                        False) == "exec:cat > f"  # fmt: skip
    assert channels_uri(main({"transport": "exec", "args": ["cat", "a b"]}),
                        False) == "exec:cat 'a b'"  # fmt: skip
    assert channels_uri(main({"transport": "file", "filename": "/f", "offset": 4096}),
                        False) == "file:/f,offset=4096"  # fmt: skip
    for chans, words in [
        ([*main(sock), *main(sock)], "Channel list has more than one main entry"),
        ([{"channel-type": "cpr", "addr": sock}], "Channel list has no main entry"),
        (main({**sock, "port": 4444}), "Invalid parameter type for 'channels[0].addr.port', "
                                       "expected: string"),
        (main({"transport": "socket", "type": "inet", "host": "h"}),
         "Parameter 'channels[0].addr.port' is missing"),
        (main({"transport": "pigeon"}), "Parameter 'transport' does not accept value 'pigeon'"),
        (main({"transport": "rdma", "host": "h", "port": "1"}), "RDMA migration is not supported"),
        # what would change the address reached is refused, not dropped: an abstract socket
        # was taken as a file named like it, a port range as its first port
        (main({"transport": "socket", "type": "unix", "path": "x", "abstract": True}),
         "abstract unix sockets are not supported by livemig"),
        (main({**sock, "to": 4450}), "'channels[0].addr.to' (a range of ports to listen on)"),
        (main({**sock, "mptcp": True}), "MPTCP is not supported by livemig"),
    ]:  # fmt: skip
        with pytest.raises(UsageError, match=re.escape(words)):
            channels_uri(chans, False)
    with pytest.raises(UsageError, match="must have only one entry"):
        channels_uri([*main(sock), {"channel-type": "cpr", "addr": sock}], True)
    with pytest.raises(UsageError, match="need either 'uri' or 'channels' argument"):
        qmp_uri("tcp:h:1", main(sock))
    assert qmp_uri(None, main(sock)) == "tcp:127.0.0.1:4444"
