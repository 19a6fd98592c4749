"""Who may talk to a TLS migration listener, and what each side says when TLS refuses a peer.

Each failed before: an idle client that connected first held the listener until its handshake
timed out (``x-io-timeout``, 30 s) while the real source waited; a source whose certificate the
destination refused said "the stream was corrupted or tampered with"; a source without TLS
into a TLS destination said only "Broken pipe".
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.testing.procs import ProcHarness, free_tcp_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def harness() -> Iterator[ProcHarness]:
    with ProcHarness(memory="32M", smp=1) as h:
        yield h


def _tls(d: Path) -> list[str]:
    return ["--tls-creds", str(d)]


def test_idle_client_does_not_hold_the_listener(harness: ProcHarness,
                                                creds: dict[str, Path]) -> None:  # fmt: skip
    port = free_tcp_port()
    uri = f"tcp:127.0.0.1:{port}"
    src = harness.source(append="ws=4M rate=5000", extra=_tls(creds["good"]))
    dst = harness.destination(incoming=uri, extra=_tls(creds["good2"]))
    src.wait_passes_increase(0, timeout=20)
    idle = socket.create_connection(("127.0.0.1", port))  # connects first, never says a word
    try:
        t0 = time.monotonic()
        harness.migrate(src, uri, caps={"return-path": True, "x-verify": True})
        info = src.wait_migration(timeout=60)
        took = time.monotonic() - t0
        assert info["status"] == "completed", info
        assert info["x-verified"] is True
        # the handshakes run side by side: the idle client cost the source nothing (it waited
        # for the whole 30 s x-io-timeout before)
        assert took < 15, took
        dst.wait_status("running", timeout=15)
        # and the idle client was dropped after its short handshake time-out
        idle.settimeout(15)
        assert idle.recv(1) == b""
    finally:
        idle.close()


def test_source_told_its_certificate_was_refused(harness: ProcHarness, creds: dict[str, Path],
                                                 tmp_path: Path) -> None:  # fmt: skip
    # the source trusts the destination (the good CA) but its own certificate is the rogue
    # CA's: only the destination refuses, after the source's half of the handshake (TLS 1.3)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(creds["good"] / "ca-cert.pem", mixed)
    for name in ("client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(creds["rogue"] / name, mixed)
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    src = harness.source(append="ws=4M rate=5000", extra=_tls(mixed))
    dst = harness.destination(incoming=uri, extra=_tls(creds["good"]))
    src.wait_passes_increase(0, timeout=20)
    harness.migrate(src, uri, caps={"return-path": True})
    info = src.wait_migration(timeout=40)
    assert info["status"] == "failed", info
    desc = info["error-desc"]
    assert "refused this side's TLS certificate" in desc, desc
    assert "corrupted or tampered" not in desc, desc
    assert src.guest_check()["ok"]
    assert dst.wait_exit(timeout=30) == 1
    assert "certificate" in dst.log(), dst.log()


def test_plain_source_into_tls_destination_says_why(harness: ProcHarness,
                                                     creds: dict[str, Path]) -> None:  # fmt: skip
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    src = harness.source(append="ws=4M rate=5000")
    dst = harness.destination(incoming=uri, extra=_tls(creds["good"]))
    src.wait_passes_increase(0, timeout=20)
    harness.migrate(src, uri, caps={"return-path": True})
    info = src.wait_migration(timeout=40)
    assert info["status"] == "failed", info
    assert "tls-creds" in info["error-desc"], info["error-desc"]
    assert src.guest_check()["ok"]
    assert dst.wait_exit(timeout=30) == 1
    log = dst.log()
    assert "plain migration stream (no TLS)" in log and "requires TLS" in log, log
