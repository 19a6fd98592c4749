"""Pre-copy over mutual TLS between real processes: success, refused peers, tampered stream.

A peer without a certificate from the right CA is refused in the handshake, before the first
byte of the migration stream: the source guest keeps running, the destination never leaves
``inmigrate`` with guest data (it fails and exits 1). A byte flipped in the TCP stream by a
proxy is caught by TLS record authentication: the migration fails, the source guest runs on
with its memory intact, and a second migration over a clean link succeeds.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig.testing.procs import LivemigProcess, ProcHarness, free_tcp_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def harness() -> Iterator[ProcHarness]:
    with ProcHarness(memory="32M", smp=1) as h:
        yield h


def _tls(d: Path) -> list[str]:
    return ["--tls-creds", str(d)]


def source_unharmed(src: LivemigProcess) -> None:
    src.wait_status("running", timeout=15)
    now = src.guest_check()
    assert now["ok"], now["problems"]
    later = src.wait_passes_increase(now["total-passes"], timeout=20)
    assert later["ok"], later["problems"]


def test_tls_migration_completes(harness: ProcHarness, creds: dict[str, Path]) -> None:
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    src = harness.source(append="ws=4M rate=5000", extra=_tls(creds["good"]))
    dst = harness.destination(incoming=uri, extra=_tls(creds["good2"]))
    src.wait_passes_increase(0, timeout=20)
    assert src.cmd("query-migrate-parameters")["tls-creds"] == str(creds["good"])
    harness.migrate(src, uri, caps={"return-path": True, "x-verify": True})
    info = src.wait_migration(timeout=60)
    assert info["status"] == "completed", info
    assert info["x-verified"] is True
    dst.wait_status("running", timeout=15)
    assert dst.guest_check()["ok"]


@pytest.mark.parametrize(
    ("src_dir", "dst_dir"),
    [
        pytest.param("rogue", "good", id="source-wrong-cert"),
        pytest.param("good", "rogue", id="destination-wrong-cert"),
        pytest.param(None, "good", id="source-no-tls"),
        pytest.param("good", None, id="destination-no-tls"),
    ],
)
def test_invalid_peer_refused(
    harness: ProcHarness, creds: dict[str, Path], src_dir: str | None, dst_dir: str | None
) -> None:
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    src = harness.source(append="ws=4M rate=5000",
                         extra=_tls(creds[src_dir]) if src_dir else ())  # fmt: skip
    dst = harness.destination(incoming=uri, extra=_tls(creds[dst_dir]) if dst_dir else ())
    src.wait_passes_increase(0, timeout=20)
    harness.migrate(src, uri, caps={"return-path": True})
    info = src.wait_migration(timeout=40)
    assert info["status"] == "failed", info
    if src_dir is not None:
        # the source's own view: the handshake (or the first TLS read) failed
        assert "TLS" in info.get("error-desc", ""), info
    source_unharmed(src)
    # The destination refused (or was refused) before loading anything: it never got past
    # its handshake, so no RAM record was written; QEMU's exit-on-error ends it with 1.
    assert dst.wait_exit(timeout=30) == 1, dst.log()
    log = dst.log()
    assert "incoming migration failed" in log
    assert "TLS" in log or "magic" in log or "stream" in log, log


class FlipProxy:
    """TCP proxy that forwards a connection and flips one byte at ``flip_at`` (source->dest)."""

    def __init__(self, target: tuple[str, int], flip_at: int) -> None:
        self.target = target
        self.flip_at = flip_at
        self.flipped = False
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        self.lsock.settimeout(60)
        try:
            a, _ = self.lsock.accept()
        except OSError:
            return
        b = socket.create_connection(self.target, timeout=10)
        self.socks += [a, b]
        for src, dst, flip in ((a, b, True), (b, a, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, flip), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        src.settimeout(60)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if flip and not self.flipped and seen + len(data) > self.flip_at:
                    buf = bytearray(data)
                    buf[self.flip_at - seen] ^= 0x01
                    data = bytes(buf)
                    self.flipped = True
                seen += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in [self.lsock, *self.socks]:
            s.close()
        for t in self.threads:
            t.join(5)


def test_tampered_stream_detected(harness: ProcHarness, creds: dict[str, Path]) -> None:
    port = free_tcp_port()
    uri = f"tcp:127.0.0.1:{port}"
    src = harness.source(append="ws=8M rate=5000", extra=_tls(creds["good"]))
    dst = harness.destination(incoming=uri, extra=_tls(creds["good"]))
    before = src.wait_passes_increase(0, timeout=20)
    proxy = FlipProxy(("127.0.0.1", port), flip_at=256 << 10)  # well inside the RAM pages
    try:
        # max-bandwidth keeps the flip inside pre-copy, with the guest still running
        harness.migrate(src, f"tcp:localhost:{proxy.port}", caps={"return-path": True},
                        params={"max-bandwidth": 16 << 20})  # fmt: skip
        info = src.wait_migration(timeout=60)
    finally:
        proxy.close()
    assert proxy.flipped
    assert info["status"] == "failed", info
    source_unharmed(src)
    assert src.guest_check()["total-passes"] >= before["total-passes"]
    assert dst.wait_exit(timeout=30) == 1
    assert "TLS" in dst.log(), dst.log()
    # a second migration over a clean link succeeds
    uri2 = f"tcp:127.0.0.1:{free_tcp_port()}"
    dst2 = harness.destination(incoming=uri2, extra=_tls(creds["good"]))
    harness.migrate(src, uri2, params={"max-bandwidth": 1 << 30})
    assert src.wait_migration(timeout=60)["status"] == "completed"
    dst2.wait_status("running", timeout=15)
    assert dst2.guest_check()["ok"]


def _tls_pair(
    harness: ProcHarness,
    creds: dict[str, Path],
    caps: dict[str, bool],
    dst_params: dict[str, Any] | None = None,
) -> tuple[LivemigProcess, LivemigProcess, str]:
    """A running source and a ``--incoming defer`` destination, both with TLS, the
    destination given ``caps`` (and ``dst_params``) and listening on a fresh port."""
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    src = harness.source(append="ws=4M rate=5000", extra=_tls(creds["good"]))
    dst = harness.destination(incoming="defer", extra=_tls(creds["good2"]))
    dst.cmd("migrate-set-capabilities",
            capabilities=[{"capability": k, "state": v} for k, v in caps.items()])  # fmt: skip
    if dst_params:
        dst.cmd("migrate-set-parameters", **dst_params)
    dst.cmd("migrate-incoming", uri=uri)
    src.wait_passes_increase(0, timeout=20)
    return src, dst, uri


def _completed(src: LivemigProcess, dst: LivemigProcess, timeout: float = 60) -> dict[str, Any]:
    """Wait for the source to complete with RAM verified and the guest running on the
    destination; the source's last query-migrate."""
    info = src.wait_migration(timeout=timeout)
    # both logs: a failed recovery attempt says why only there
    assert info["status"] == "completed", (info, src.log(), dst.log())
    assert info["x-verified"] is True
    dst.wait_status("running", timeout=15)
    assert dst.guest_check()["ok"]
    return info


def test_tls_multifd_migration_completes(harness: ProcHarness, creds: dict[str, Path]) -> None:
    """Every multifd channel is a TLS connection too (QEMU: migration/tls.c for each)."""
    src, dst, uri = _tls_pair(harness, creds, {"multifd": True})
    harness.migrate(src, uri, caps={"return-path": True, "x-verify": True, "multifd": True})
    assert _completed(src, dst)["ram"]["multifd-bytes"] > 0


POSTCOPY_CAPS = {"multifd": True, "postcopy-ram": True, "postcopy-preempt": True}
# slow enough that post-copy is still running when it is paused (no readahead: its windows
# are not held back by max-postcopy-bandwidth)
POSTCOPY_SLOW = {"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 2 << 20,
                 "x-postcopy-readahead": 0}  # fmt: skip


def test_tls_postcopy_preempt_multifd_pause_and_recover(
    harness: ProcHarness, creds: dict[str, Path]
) -> None:
    """Pre-copy on multifd channels, post-copy with a preempt channel, a migrate-pause and a
    recovery on a new port: every one of these connections over TLS. The preempt channel's
    handshake can finish only once the destination reads POSTCOPY_LISTEN (or RESUME); made
    before those were sent, it hung the switch until the handshake time-out. The pause comes
    as soon as the state says postcopy-active, which is before the switch is over: it must
    wait for the switch, not break it (that failed the migration, 1 run in ~5)."""
    src, dst, uri = _tls_pair(harness, creds, POSTCOPY_CAPS)
    harness.migrate(src, uri, caps={"return-path": True, "x-verify": True, **POSTCOPY_CAPS},
                    params=POSTCOPY_SLOW)  # fmt: skip
    src.cmd("migrate-start-postcopy")
    info = src.wait_migration(30, frozenset({"postcopy-active", "failed", "completed"}))
    assert info["status"] == "postcopy-active", info
    src.cmd("migrate-pause")
    info = src.wait_migration(30, frozenset({"postcopy-paused", "failed"}))
    assert info["status"] == "postcopy-paused", info
    assert dst.wait_migration(30, frozenset({"postcopy-paused", "failed"}))["status"] == \
        "postcopy-paused"  # fmt: skip
    new = f"tcp:127.0.0.1:{free_tcp_port()}"
    dst.cmd("migrate-recover", uri=new)
    src.cmd("migrate", uri=new, resume=True)
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    assert _completed(src, dst)["x-postcopy"]["recoveries"] >= 1


def test_tls_destination_pause_then_auto_recover(
    harness: ProcHarness, creds: dict[str, Path]
) -> None:
    """A migrate-pause on the destination as soon as it is in post-copy; the source finds the
    link gone and, with x-postcopy-auto-recover, reconnects by itself over TLS (main and
    preempt channels) to the original URI, and the migration completes."""
    src, dst, uri = _tls_pair(harness, creds, POSTCOPY_CAPS, {"x-postcopy-auto-recover": 5})
    harness.migrate(src, uri, caps={"return-path": True, "x-verify": True, **POSTCOPY_CAPS},
                    params={**POSTCOPY_SLOW, "x-postcopy-auto-recover": 5})  # fmt: skip
    src.cmd("migrate-start-postcopy")
    info = dst.wait_migration(30, frozenset({"postcopy-active", "failed", "completed"}))
    assert info["status"] == "postcopy-active", info
    dst.cmd("migrate-pause")
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    assert _completed(src, dst, timeout=90)["x-postcopy"]["recoveries"] >= 1
