"""Checkpoints are checked like any livemig stream (issue #22 after #19): one bit flipped in a
checkpoint on its way is caught before the standby applies any of it; the standby stands
down (it must not take over from a copy it can no longer keep up to date) and the primary
goes on unreplicated, saying so, its clients' writes all there."""

from __future__ import annotations

import contextlib
import socket
import threading

from livemig.testing.procs import ProcHarness, wait_until
from livemig.testing.replication import Writers, answers, audit, start_replicated


class ArmedFlipRelay:
    """Relays one TCP connection; once ``armed``, flips a bit in the middle of the next chunk
    of at least 8 KiB from the primary (a checkpoint's page data, not a heartbeat)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.armed = threading.Event()
        self.flipped = threading.Event()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.uri = f"tcp:127.0.0.1:{self.lsock.getsockname()[1]}"
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            a, _ = self.lsock.accept()
            host, port = self.target.split(":")[1:]
            b = socket.create_connection((host, int(port)), timeout=10)
            self.socks += [a, b]
            threading.Thread(target=self._pump, args=(a, b, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if flip and self.armed.is_set() and not self.flipped.is_set() \
                        and len(data) >= 8192:  # fmt: skip
                    buf = bytearray(data)
                    buf[len(buf) // 2] ^= 0x10
                    data = bytes(buf)
                    self.flipped.set()
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.lsock.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


def test_a_bit_flipped_in_a_checkpoint_is_never_applied() -> None:
    with ProcHarness(memory="64M", smp=1) as h:
        r = start_replicated(h, defer=True)
        relay = ArmedFlipRelay(r.standby.incoming or "")
        try:
            r.standby.incoming = relay.uri
            writers = Writers(r.port, n=2).start()
            r.start_replication(25)
            wait_until(lambda: writers.count() > 200, 30, "clients writing, replicated")
            relay.armed.set()
            wait_until(relay.flipped.is_set, 30, "a checkpoint chunk to corrupt")
            # the standby refuses it, stands down; the primary goes on alone and says so
            wait_until(lambda: r.primary.cmd("query-colo-status").get("x-replicated") is False,
                       30, "the primary to go on unreplicated")  # fmt: skip
            log = r.standby.log()
            assert "does not match its checksum" in log or "malformed checkpoint" in log, log
            # it never takes over: its incoming migration failed, and livemig run exits 1
            assert r.standby.wait_exit(30) == 1
            before = writers.count()
            wait_until(lambda: writers.count() > before + 100, 30, "clients writing on")
            writers.stop()
            report = audit(r.port, writers)
            assert report["lost"] == report["wrong"] == 0 and report["counter-exact"], report
            assert not report["errors"], report
            assert answers(r.port)
        finally:
            relay.close()
