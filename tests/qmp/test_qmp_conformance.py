"""QMP conformance: the same requests to QEMU 10.0 and to livemig, replies compared.

Twelve scenarios, each with a fresh QEMU 10.0 (``-M pc``, no guest to speak of) and a fresh
``livemig run`` (the idle guest): a source at rest, a destination waiting with ``-incoming
defer``, a source in the middle of a migration (to a peer that accepts the connection and
reads nothing, so it stays ``active``), a destination in the middle of one (a peer that sent
the stream's header and configuration, then nothing), a source whose migration failed
(``tcp::PORT``, a host that does not resolve), a destination listening on every address
(``tcp::0``), a destination whose load failed (``exit-on-error: false``, garbage sent), a
monitor before negotiation, a source held in ``setup`` (a full accept queue), one in
``pre-switchover`` then ``device`` (a peer that reads all and never answers), one with
``return-path`` on a ``file:`` and a ``tcp:`` port no service has. Every request goes over a
raw socket (``exec-oob`` included, with the ``oob`` capability negotiated); replies are compared as JSON
after ``_normal`` has replaced what must differ between two machines (timestamps, sizes,
times, counters, thread ids).

Every difference left is listed, with its reason, in ``docs/qmp-conformance.md``; the test reads
that table and fails when the differences found and the ones documented are not the same set,
so the document cannot go stale and no new difference goes unnoticed.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig.testing.qemu import QemuBinary, QemuVM, find_qemu

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "qmp-conformance.md"
TIMEOUT = 10.0


def _x(cmd: str, **args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"execute": cmd}
    if args:
        out["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
    return out


def _caps(*pairs: tuple[str, bool]) -> dict[str, Any]:
    return _x("migrate-set-capabilities",
              capabilities=[{"capability": c, "state": s} for c, s in pairs])  # fmt: skip


def _params(**kw: Any) -> dict[str, Any]:
    return _x("migrate-set-parameters", **kw)


# (id, request): the id names the request in docs/qmp-conformance.md
COMMON: list[tuple[str, Any]] = [
    ("query-version", _x("query-version")),
    ("query-status", _x("query-status")),
    ("query-name", _x("query-name")),
    ("query-migrate", _x("query-migrate")),
    ("query-migrate-capabilities", _x("query-migrate-capabilities")),
    ("query-migrate-parameters", _x("query-migrate-parameters")),
    ("query-migrationthreads", _x("query-migrationthreads")),
    ("query-dirty-rate", _x("query-dirty-rate")),
    ("unknown-command", _x("nope")),
    ("unexpected-argument", _x("query-status", x=1)),
    ("execute-not-a-string", {"execute": 5}),
    ("no-execute", {"arguments": {}}),
    ("null-request", None),
    ("list-request", [{"execute": "query-status"}]),
    ("unexpected-member", {"execute": "query-status", "foo": 1}),
    ("arguments-not-an-object", {"execute": "query-status", "arguments": []}),
    ("oob-not-allowed", {"exec-oob": "query-status"}),
    ("execute-and-exec-oob", {"execute": "query-status", "exec-oob": "query-status"}),
    ("exec-oob-and-execute", {"exec-oob": "query-status", "execute": "query-status"}),
    ("id-object-echoed", {"execute": "query-status", "id": {"a": [1, "b"]}}),
    ("id-on-error", {"execute": "nope", "id": "x1"}),
    ("id-on-argument-error", {"execute": "query-status", "id": 7, "arguments": {"x": 1}}),
    ("qmp-capabilities-again", _x("qmp_capabilities")),
    ("calc-dirty-rate-0", _x("calc-dirty-rate", calc_time=0)),
    ("calc-dirty-rate-61", _x("calc-dirty-rate", calc_time=61)),
    ("calc-dirty-rate-49ms", _x("calc-dirty-rate", calc_time=49, calc_time_unit="millisecond")),
    ("calc-dirty-rate-ring", _x("calc-dirty-rate", calc_time=1, mode="dirty-ring")),
    ("calc-dirty-rate-0-ring", _x("calc-dirty-rate", calc_time=0, mode="dirty-ring")),
    ("calc-dirty-rate-sample-pages", _x("calc-dirty-rate", calc_time=1, sample_pages=1)),
    (
        "calc-dirty-rate-sample-pages-bitmap",
        _x("calc-dirty-rate", calc_time=1, sample_pages=256, mode="dirty-bitmap"),
    ),
    ("oob-migrate-pause", {"exec-oob": "migrate-pause"}),
    (
        "oob-migrate-recover",
        {"exec-oob": "migrate-recover", "arguments": {"uri": "tcp:127.0.0.1:1"}},
    ),
    ("migrate-pause", _x("migrate-pause")),
    ("migrate-recover", _x("migrate-recover", uri="tcp:127.0.0.1:1")),
    ("migrate-start-postcopy", _x("migrate-start-postcopy")),
    ("migrate-cancel-alias", _x("migrate-cancel")),
    ("migrate-continue", _x("migrate-continue", state="pre-switchover")),
    ("migrate-continue-bad-state", _x("migrate-continue", state="nope")),
    ("migrate-bad-scheme", _x("migrate", uri="nope:x")),
    ("migrate-bad-tcp", _x("migrate", uri="tcp:127.0.0.1")),
    ("migrate-no-uri", _x("migrate")),
    (
        "migrate-uri-and-channels",
        _x(
            "migrate",
            uri="tcp:127.0.0.1:1",
            channels=[
                {
                    "channel-type": "main",
                    "addr": {
                        "transport": "socket",
                        "type": "inet",
                        "host": "127.0.0.1",
                        "port": "1",
                    },
                }
            ],
        ),
    ),
    ("migrate-resume-none", _x("migrate", uri="tcp:127.0.0.1:1", resume=True)),
    ("migrate-blk", _x("migrate", uri="tcp:127.0.0.1:1", blk=True)),
    ("migrate-uri-type", _x("migrate", uri=5)),
    ("caps-multifd-xbzrle", _caps(("multifd", True), ("xbzrle", True))),
    ("caps-mapped-ram-xbzrle", _caps(("mapped-ram", True), ("xbzrle", True))),
    ("caps-mapped-ram-postcopy", _caps(("mapped-ram", True), ("postcopy-ram", True))),
    ("caps-postcopy-multifd", _caps(("postcopy-ram", True), ("multifd", True))),
    # livemig took the pair (docs/qmp-conformance.md): back to where QEMU is
    ("caps-reset", _caps(("postcopy-ram", False), ("multifd", False))),
    ("caps-preempt-alone", _caps(("postcopy-preempt", True))),
    # QEMU's incompatibilities of background-snapshot come before livemig's "not supported"
    ("caps-background-snapshot-xbzrle", _caps(("background-snapshot", True), ("xbzrle", True))),
    (
        "caps-background-snapshot-return-path",
        _caps(("return-path", True), ("background-snapshot", True), ("auto-converge", True)),
    ),
    ("caps-switchover-ack-alone", _caps(("switchover-ack", True))),
    ("caps-zero-copy-alone", _caps(("zero-copy-send", True))),
    ("caps-dirty-limit", _caps(("dirty-limit", True))),
    ("caps-compress", _caps(("compress", True))),
    ("caps-block", _caps(("block", True))),
    ("caps-unknown", _caps(("nope", True))),
    (
        "caps-state-missing",
        _x("migrate-set-capabilities", capabilities=[{"capability": "xbzrle"}]),
    ),
    (
        "caps-state-type",
        _x("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": 1}]),
    ),
    ("caps-not-a-list", _x("migrate-set-capabilities", capabilities={})),
    (
        "caps-extra-member",
        _x(
            "migrate-set-capabilities",
            capabilities=[{"capability": "xbzrle", "state": True, "x": 1}],
        ),
    ),
    ("caps-ok", _caps(("xbzrle", True), ("auto-converge", True), ("events", True))),
    ("caps-off", _caps(("xbzrle", False), ("auto-converge", False))),
    # mapped-ram on a URI that cannot seek: refused before connecting (QEMU 10.0's
    # migration_transport_compatible), on a source and on a destination alike
    ("caps-mapped-ram", _caps(("mapped-ram", True))),
    ("migrate-mapped-ram-tcp", _x("migrate", uri="tcp:127.0.0.1:1")),
    ("migrate-mapped-ram-exec", _x("migrate", uri="exec:cat")),
    ("migrate-incoming-mapped-ram-tcp", _x("migrate-incoming", uri="tcp:127.0.0.1:0")),
    ("caps-mapped-ram-off", _caps(("mapped-ram", False))),
    ("params-downtime-high", _params(downtime_limit=3000000)),
    ("params-downtime-negative", _params(downtime_limit=-1)),
    ("params-downtime-type", _params(downtime_limit="x")),
    ("params-multifd-channels-0", _params(multifd_channels=0)),
    ("params-multifd-channels-300", _params(multifd_channels=300)),
    ("params-multifd-compression", _params(multifd_compression="nope")),
    ("params-multifd-compression-qatzip", _params(multifd_compression="qatzip")),
    ("params-zlib-level", _params(multifd_zlib_level=10)),
    ("params-zstd-level", _params(multifd_zstd_level=21)),
    ("params-xbzrle-small", _params(xbzrle_cache_size=1000)),
    ("params-xbzrle-not-pow2", _params(xbzrle_cache_size=12288)),
    ("params-throttle-initial", _params(cpu_throttle_initial=0)),
    ("params-throttle-increment", _params(cpu_throttle_increment=100)),
    ("params-trigger-threshold", _params(throttle_trigger_threshold=101)),
    ("params-max-throttle-low", _params(max_cpu_throttle=10)),
    ("params-max-throttle-high", _params(max_cpu_throttle=100)),
    ("params-zero-page-detection", _params(zero_page_detection="nope")),
    ("params-unknown", _params(nope=1)),
    ("params-tls-null", _params(tls_creds=None)),
    ("params-tls-type", _params(tls_creds=5)),
    ("params-announce-step", _params(announce_step=0)),
    (
        "params-announce-ok",
        _params(announce_initial=60, announce_max=600, announce_rounds=6, announce_step=110),
    ),
    ("params-vcpu-dirty-limit", _params(vcpu_dirty_limit=0)),
    (
        "params-ok",
        _params(downtime_limit=100, max_bandwidth=1000000, max_postcopy_bandwidth=2000000),
    ),
    ("query-migrate-parameters-after", _x("query-migrate-parameters")),
    ("query-migrate-capabilities-after", _x("query-migrate-capabilities")),
    ("migrate_cancel", _x("migrate_cancel")),
]

SOURCE = [
    *COMMON,
    # a file: migrate cannot create is refused in the reply, not as a failed migration
    ("migrate-file-directory", _x("migrate", uri="file:/")),
    ("migrate-file-no-directory", _x("migrate", uri="file:/nonexistent-livemig-dir/x.mig")),
    ("migrate-incoming-not-incoming", _x("migrate-incoming", uri="tcp:127.0.0.1:0")),
    ("stop", _x("stop")),
    ("query-status-stopped", _x("query-status")),
    ("cont", _x("cont")),
    ("query-status-running", _x("query-status")),
]

DESTINATION = [
    *COMMON,
    ("caps-multifd", _caps(("multifd", True))),
    ("caps-multifd-off", _caps(("multifd", False))),
    ("migrate-on-destination", _x("migrate", uri="tcp:127.0.0.1:1")),
    ("migrate-incoming-bad-uri", _x("migrate-incoming", uri="nope:x")),
    ("migrate-incoming-no-uri", _x("migrate-incoming")),
    ("stop", _x("stop")),
    ("query-status-after-stop", _x("query-status")),
    # last: QEMU stays in setup after it, refusing another migrate-incoming
    ("migrate-incoming-file-missing", _x("migrate-incoming", uri="file:/nonexistent-livemig")),
]

MIGRATING = [
    ("query-status", _x("query-status")),
    ("query-migrate", _x("query-migrate")),
    ("caps-during", _caps(("xbzrle", True))),
    ("params-during", _params(max_bandwidth=2000000)),
    ("migrate-again", _x("migrate", uri="tcp:127.0.0.1:1")),
    ("migrate-incoming-during", _x("migrate-incoming", uri="tcp:127.0.0.1:0")),
    ("migrate-start-postcopy-not-enabled", _x("migrate-start-postcopy")),
    ("migrate-pause-precopy", _x("migrate-pause")),
    ("oob-migrate-pause-precopy", {"exec-oob": "migrate-pause"}),
    ("migrate-recover-precopy", _x("migrate-recover", uri="tcp:127.0.0.1:1")),
    ("migrate-continue-active", _x("migrate-continue", state="pre-switchover")),
    ("calc-dirty-rate-during", _x("calc-dirty-rate", calc_time=1)),
    ("query-migrationthreads", _x("query-migrationthreads")),
]

INCOMING = [
    ("query-status", _x("query-status")),
    ("query-migrate", _x("query-migrate")),
    ("caps-during", _caps(("xbzrle", True))),
    ("params-during", _params(max_bandwidth=2000000)),
    ("migrate-incoming-again", _x("migrate-incoming", uri="tcp:127.0.0.1:0")),
    ("migrate-on-destination", _x("migrate", uri="tcp:127.0.0.1:1")),
    ("migrate-pause-incoming", _x("migrate-pause")),
    ("migrate-start-postcopy-incoming", _x("migrate-start-postcopy")),
    ("stop-incoming", _x("stop")),
    ("query-status-incoming-stopped", _x("query-status")),
    ("cont-incoming", _x("cont")),
    ("caps-multifd-incoming", _caps(("multifd", True))),
    ("caps-preempt-incoming", _caps(("postcopy-preempt", True))),
    ("migrate-recover-incoming", _x("migrate-recover", uri="tcp:127.0.0.1:1")),
    ("query-migrationthreads", _x("query-migrationthreads")),
]


class Raw:
    """QMP by hand over a unix socket: replies as parsed JSON, events kept aside."""

    def __init__(self, path: Path, negotiate: bool = True) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(TIMEOUT)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting = self._recv()
        if negotiate:
            self.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the monitor closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def ask(self, request: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            msg = self._recv()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def close(self) -> None:
        self.sock.close()


class Silent:
    """A peer that accepts migration connections and reads nothing (``head``: sends these
    bytes first, then nothing), keeping a source or a destination in ``active``."""

    def __init__(self, path: Path, head: bytes = b"") -> None:
        self.path = path
        self.head = head
        self.conns: list[socket.socket] = []
        if not head:
            self.server = socket.socket(socket.AF_UNIX)
            self.server.bind(str(path))
            self.server.listen(8)
            self.thread = threading.Thread(target=self._accept, daemon=True)
            self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        """A connection just accepted: left unread."""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                sock.connect(str(self.path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.sendall(self.head)
        self.conns.append(sock)

    def close(self) -> None:
        if not self.head:
            self.server.close()
        for c in self.conns:
            c.close()


class Drain(Silent):
    """A peer that accepts migration connections and reads everything, answering nothing:
    a source with return-path on sends it all, then waits in ``device`` for a SHUT."""

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1 << 20):
                pass


class Backlogged:
    """A TCP listener whose accept queue is full: a connect to it hangs (SYNs dropped), so a
    source stays in ``setup``."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.fill: list[socket.socket] = []
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", self.port))
            self.fill.append(s)
        time.sleep(0.2)

    def close(self) -> None:
        self.server.close()
        for s in self.fill:
            s.close()


class Livemig:
    """``livemig run`` with the idle guest, paused, QMP on a unix socket."""

    def __init__(self, workdir: Path, incoming: bool) -> None:
        self.qmp_path = workdir / "livemig.sock"
        argv = [sys.executable, "-m", "livemig", "run", "--memory", "64M", "--serial", "null",
                "-S", "--qmp", f"unix:{self.qmp_path}"]  # fmt: skip
        argv += ["--incoming", "defer"] if incoming else ["--guest", "idle"]
        self.log = workdir / "livemig.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"livemig run did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# -- what may differ between two machines ---------------------------------------------------

# members whose values depend on the machine, the moment or the run, compared by type only
_VARYING = {
    "total-time", "setup-time", "expected-downtime", "downtime", "transferred", "remaining",
    "total", "duplicate", "normal", "normal-bytes", "dirty-pages-rate", "mbps",
    "dirty-sync-count", "pages-per-second", "precopy-bytes", "downtime-bytes",
    "postcopy-bytes", "multifd-bytes", "thread-id", "start-time", "seconds", "microseconds",
    "package", "port",
}  # fmt: skip


def _normal(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _normal(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v, key) for v in value]
    if key in _VARYING:
        return "<number>" if isinstance(value, int | float) else f"<{type(value).__name__}>"
    if isinstance(value, str) and value.endswith("-mig.sock"):
        return "<the migration socket>"  # each side has its own
    return value


def _explain(q: Any, lm: Any, path: str = "") -> list[str]:
    """Where two replies differ, as paths (for the failure message)."""
    if isinstance(q, dict) and isinstance(lm, dict):
        out = [f"{path}/{k}: only QEMU has it" for k in q if k not in lm]
        out += [f"{path}/{k}: only livemig has it" for k in lm if k not in q]
        for k in q:
            if k in lm:
                out += _explain(q[k], lm[k], f"{path}/{k}")
        return out
    if isinstance(q, list) and isinstance(lm, list) and len(q) == len(lm):
        return [x for i, (a, b) in enumerate(zip(q, lm, strict=True))
                for x in _explain(a, b, f"{path}[{i}]")]  # fmt: skip
    if q != lm:
        return [f"{path}: QEMU {json.dumps(q)[:200]} / livemig {json.dumps(lm)[:200]}"]
    return []


def _run(raw: Raw, requests: list[tuple[str, Any]]) -> dict[str, Any]:
    return {rid: _normal(raw.ask(req)) for rid, req in requests}


def _qemu_side(qemu: QemuBinary, tmp: Path, scenario: str) -> dict[str, Any]:
    incoming = scenario.startswith("destination")
    with QemuVM(qemu, tmp, "conf", incoming=incoming) as vm:
        raw = Raw(vm.qmp_path, negotiate=scenario != "negotiation")
        try:
            return _drive(raw, tmp / "qemu-mig.sock", scenario)
        finally:
            raw.close()


def _livemig_side(tmp: Path, scenario: str) -> dict[str, Any]:
    side = Livemig(tmp, incoming=scenario.startswith("destination"))
    try:
        raw = Raw(side.qmp_path, negotiate=scenario != "negotiation")
        try:
            return _drive(raw, tmp / "livemig-mig.sock", scenario)
        finally:
            raw.close()
    finally:
        side.stop()


# the QEVM header and a configuration section: a destination reads them, then waits
_HEAD = bytes.fromhex("5145564d00000003")


def _drive(raw: Raw, mig: Path, scenario: str) -> dict[str, Any]:
    out: dict[str, Any] = {"greeting": _normal(raw.greeting)}
    if scenario == "source":
        out.update(_run(raw, SOURCE))
    elif scenario == "destination":
        out.update(_run(raw, DESTINATION))
    elif scenario == "source-migrating":
        peer = Silent(mig)
        try:
            out["events-on"] = raw.ask(_caps(("events", True)))
            # QEMU 10.0's channels form of the address (the other form is used below)
            out["migrate"] = raw.ask(_x("migrate", channels=_unix_channel(mig)))
            _wait_status(raw, ("active",))
            out.update(_run(raw, MIGRATING))
            out["migrate_cancel"] = raw.ask(_x("migrate_cancel"))
            _wait_status(raw, ("cancelled", "failed"))
            out["query-migrate-cancelled"] = _normal(raw.ask(_x("query-migrate")))
            out["events"] = _events(raw)
        finally:
            peer.close()
    elif scenario == "source-failed":
        # tcp::PORT: QEMU 10.0 cannot resolve an empty host to connect to; the migration
        # fails in setup (livemig took it as 0.0.0.0 and connected to any local listener)
        out["events-on"] = raw.ask(_caps(("events", True)))
        out["migrate-any-host"] = raw.ask(_x("migrate", uri="tcp::1"))
        _wait_status(raw, ("failed",))
        out["query-migrate-failed"] = _normal(raw.ask(_x("query-migrate")))
        out["query-status-after-failed"] = raw.ask(_x("query-status"))
        # again, where nothing listens: QEMU's "Failed to connect to '127.0.0.1:1': ..."
        out["migrate-refused"] = raw.ask(_x("migrate", uri="tcp:127.0.0.1:1"))
        _wait_error(raw, "connect")
        out["query-migrate-refused"] = _normal(raw.ask(_x("query-migrate")))
        out["events"] = _events(raw)
    elif scenario == "destination-any-address":
        # tcp::PORT: every address, IPv6 and IPv4, both listed in socket-address
        out["migrate-incoming-any-address"] = raw.ask(_x("migrate-incoming", uri="tcp::0"))
        out["query-migrate"] = _normal(raw.ask(_x("query-migrate")))
    elif scenario == "destination-failed":
        # exit-on-error false: a destination whose load failed stays, and says so
        out["events-on"] = raw.ask(_caps(("events", True)))
        out["migrate-incoming-stay"] = raw.ask(
            _x("migrate-incoming", uri=f"unix:{mig}", exit_on_error=False)
        )
        peer = Silent(mig, _HEAD + b"\xff" * 16)  # no configuration section: garbage
        peer.connect()
        try:
            _wait_status(raw, ("failed",))
            out["query-migrate-failed"] = _normal(raw.ask(_x("query-migrate")))
            # the members apart from error-desc's words (a documented difference)
            out["query-migrate-failed-members"] = sorted(out["query-migrate-failed"]["return"])
            out["query-status-failed"] = raw.ask(_x("query-status"))
            out["migrate-incoming-after-failed"] = raw.ask(
                _x("migrate-incoming", uri=f"unix:{mig}")
            )
            out["events"] = _events(raw)
        finally:
            peer.close()
    elif scenario == "destination-migrating":
        out["events-on"] = raw.ask(_caps(("events", True)))
        out["migrate-incoming"] = raw.ask(_x("migrate-incoming", uri=f"unix:{mig}"))
        peer = Silent(mig, _HEAD)
        peer.connect()
        try:
            _wait_status(raw, ("active",))
            out.update(_run(raw, INCOMING))
            out["events"] = _events(raw)
        finally:
            peer.close()
    elif scenario == "negotiation":
        # before qmp_capabilities: QEMU's visitor names a list element 'null' in the enum
        # check (the type check says 'enable[0]')
        for i, enable in enumerate((["nope"], ["oob", "nope"], [7], "oob", None)):
            out[f"qmp-capabilities-bad-{i}"] = raw.ask(_x("qmp_capabilities", enable=enable))
        out["qmp-capabilities"] = raw.ask(_x("qmp_capabilities", enable=["oob"]))
    elif scenario == "source-setup":
        # a connect that hangs (a full accept queue): setup, then cancelled from there
        peer = Backlogged()
        try:
            out["migrate"] = raw.ask(_x("migrate", uri=f"tcp:127.0.0.1:{peer.port}"))
            time.sleep(0.3)
            out["query-migrate-setup"] = _normal(raw.ask(_x("query-migrate")))
            out["migrate_cancel"] = raw.ask(_x("migrate_cancel"))
            _wait_status(raw, ("cancelled",))
            out["query-migrate-cancelled"] = _normal(raw.ask(_x("query-migrate")))
        finally:
            peer.close()
    elif scenario == "source-switchover":
        # pause-before-switchover, then device: a peer that reads it all and never sends
        # SHUT keeps a source with return-path there
        peer = Drain(mig)
        try:
            out["caps"] = raw.ask(_caps(("return-path", True), ("pause-before-switchover", True)))
            out["migrate"] = raw.ask(_x("migrate", uri=f"unix:{mig}"))
            _wait_status(raw, ("pre-switchover",))
            out["query-migrate-pre-switchover"] = _normal(raw.ask(_x("query-migrate")))
            out["query-status-pre-switchover"] = raw.ask(_x("query-status"))
            out["migrate-continue-wrong-state"] = raw.ask(_x("migrate-continue", state="device"))
            out["migrate-continue"] = raw.ask(_x("migrate-continue", state="pre-switchover"))
            _wait_status(raw, ("device",))
            out["query-migrate-device"] = _normal(raw.ask(_x("query-migrate")))
            out["query-status-device"] = raw.ask(_x("query-status"))
            out["migrate_cancel"] = raw.ask(_x("migrate_cancel"))
            # QEMU 10.0.2 races here: the cancel shuts the channel down, and its return-path
            # thread, waiting for SHUT, may fail the migration first (seen in CI); either way
            # the guest runs again, which is what is compared
            _wait_status(raw, ("cancelled", "failed"))
            out["query-status-cancelled"] = raw.ask(_x("query-status"))
        finally:
            peer.close()
    elif scenario == "source-return-path-file":
        # QEMU 10.0 takes it, writes the stream, then fails: its return path reads the file
        out["caps"] = raw.ask(_caps(("return-path", True)))
        out["migrate"] = raw.ask(_x("migrate", uri=f"file:{mig}.file"))
        _wait_status(raw, ("failed", "completed"))
        out["query-migrate-failed"] = _normal(raw.ask(_x("query-migrate")))
        out["query-status-failed"] = raw.ask(_x("query-status"))
        # a port getaddrinfo does not know fails the migration, not the command
        out["migrate-unknown-service"] = raw.ask(_x("migrate", uri="tcp:127.0.0.1:nosuchservice"))
        _wait_error(raw, "nosuchservice")
        out["query-migrate-unknown-service"] = _normal(raw.ask(_x("query-migrate")))
    elif scenario == "destination-unknown-service":
        # refused in the reply (the listen resolves it); nothing after it: QEMU 10.0 leaves
        # its incoming side in setup then, which livemig does not copy (docs)
        out["migrate-incoming-unknown-service"] = raw.ask(
            _x("migrate-incoming", uri="tcp:127.0.0.1:nosuchservice")
        )
    else:
        raise AssertionError(scenario)
    return out


def _unix_channel(path: Path) -> list[dict[str, Any]]:
    return [{"channel-type": "main",
             "addr": {"transport": "socket", "type": "unix", "path": str(path)}}]  # fmt: skip


def _events(raw: Raw) -> list[Any]:
    """The events so far, in order, with their data (the timestamps aside)."""
    raw.ask(_x("query-status"))  # a round trip: events sent before it have arrived
    return [[e["event"], e.get("data")] for e in raw.events]


def _wait_error(raw: Raw, words: str) -> None:
    """Until query-migrate's error-desc mentions ``words`` (a later migration failing)."""
    deadline = time.monotonic() + TIMEOUT
    while words not in (desc := raw.ask(_x("query-migrate"))["return"].get("error-desc", "")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"error-desc {desc!r}, waited for one with {words!r}")
        time.sleep(0.02)


def _wait_status(raw: Raw, wanted: tuple[str, ...]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        status = raw.ask(_x("query-migrate")).get("return", {}).get("status")
        if status in wanted:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"status {status!r}, waited for {wanted}")
        time.sleep(0.02)


def documented() -> dict[tuple[str, str], str]:
    """(scenario, request id) -> reason, from the table in docs/qmp-conformance.md."""
    rows: dict[tuple[str, str], str] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([\w-]+)`\s*\|\s*`([\w-]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[(m[1], m[2])] = m[3].strip()
    return rows


SCENARIOS = ["source", "destination", "source-migrating", "destination-migrating",
             "source-failed", "destination-any-address", "destination-failed", "negotiation",
             "source-setup", "source-switchover", "source-return-path-file",
             "destination-unknown-service"]  # fmt: skip


@pytest.fixture(scope="module")
def qemu10() -> QemuBinary:
    found = find_qemu("10.0")
    if found is None:
        pytest.skip("QEMU 10.0 is not installed (./dev setup installs it)")
    return found


@pytest.fixture(scope="module")
def replies(qemu10: QemuBinary, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = {}
    for scenario in SCENARIOS:
        tmp = Path(tmp_path_factory.mktemp(f"conf-{scenario}"))
        out[scenario] = (_qemu_side(qemu10, tmp, scenario), _livemig_side(tmp, scenario))
    return out


def _own(value: Any, qemu: Any) -> Any:
    """A livemig reply less its own members (``x-`` keys QEMU's reply does not have, the
    additions README.md allows): one must not hide another difference in the same reply."""
    if isinstance(value, dict) and isinstance(qemu, dict):
        return {k: _own(v, qemu.get(k)) for k, v in value.items()
                if k in qemu or not k.startswith("x-")}  # fmt: skip
    if isinstance(value, list) and isinstance(qemu, list) and len(value) == len(qemu):
        return [_own(v, q) for v, q in zip(value, qemu, strict=True)]
    return value


def differences(replies: dict[str, Any]) -> Iterator[tuple[str, str, Any, Any]]:
    for scenario, (qemu, livemig) in replies.items():
        for rid in qemu:
            if qemu[rid] != _own(livemig.get(rid), qemu[rid]):
                yield scenario, rid, qemu[rid], livemig.get(rid)


def test_every_difference_from_qemu_10_is_documented(replies: dict[str, Any]) -> None:
    """The set of differing replies is exactly the set docs/qmp-conformance.md explains."""
    found = {(s, r): (q, lm) for s, r, q, lm in differences(replies)}
    docs = {k: v for k, v in documented().items() if k[0] != "schema"}
    undocumented = {k: v for k, v in found.items() if k not in docs}
    stale = sorted(k for k in docs if k not in found)
    lines = [f"{s} {r}:\n    " + "\n    ".join(_explain(q, lm)[:12])
             for (s, r), (q, lm) in sorted(undocumented.items())]  # fmt: skip
    assert not undocumented, "differences not in docs/qmp-conformance.md:\n" + "\n".join(lines)
    assert not stale, f"documented differences that are gone (update the doc): {stale}"
    assert all(docs[k] for k in found), "every documented difference needs its reason"


# -- query-qmp-schema -------------------------------------------------------------------------


def _canon(by: dict[str, Any], name: str, depth: int = 0) -> Any:
    """A schema type with its numbered names resolved, comparable across two schemas."""
    if depth > 20:
        return "<deep>"
    t = by.get(name)
    if t is None:
        raise AssertionError(f"type {name!r} is referenced but not in the schema")
    meta = t["meta-type"]
    if meta == "builtin":
        return name
    if meta == "array":
        return ["array", _canon(by, t["element-type"], depth + 1)]
    if meta == "enum":
        return ["enum", sorted(t["values"])]
    if meta == "alternate":
        return ["alternate", sorted(json.dumps(_canon(by, m["type"], depth + 1))
                                    for m in t["members"])]  # fmt: skip
    if meta == "object":
        members = {m["name"]: ["optional" if "default" in m else "required",
                               _canon(by, m["type"], depth + 1)] for m in t["members"]}  # fmt: skip
        if "variants" in t:
            members["<variants>"] = sorted(v["case"] for v in t["variants"])
        return ["object", members]
    raise AssertionError(f"unknown meta-type {meta!r}")


def _schema_diffs(qemu: list[dict], mine: list[dict]) -> dict[str, list[str]]:
    """For each command and event livemig has: how it differs from QEMU 10.0's."""
    qb = {e["name"]: e for e in qemu}
    lb = {e["name"]: e for e in mine}
    out: dict[str, list[str]] = {}
    for e in mine:
        if e["meta-type"] not in ("command", "event") or e["name"].startswith("x-"):
            continue
        name, notes = e["name"], []
        q = qb.get(name)
        if q is None:
            out[name] = ["QEMU 10.0 has no such " + e["meta-type"]]
            continue
        if bool(q.get("allow-oob")) != bool(e.get("allow-oob")):
            notes.append("allow-oob differs")
        if sorted(q.get("features", [])) != sorted(e.get("features", [])):
            notes.append(f"features: QEMU {q.get('features', [])}, livemig {e.get('features', [])}")
        for key in ("arg-type", "ret-type"):
            if key in q or key in e:
                qa, la = _canon(qb, q[key]), _canon(lb, e[key])
                notes += [f"{key}{p}" for p in _explain_type(qa, la)]
        if notes:
            out[name] = notes
    return out


def _explain_type(q: Any, lm: Any, path: str = "") -> list[str]:
    if q == lm:
        return []
    if isinstance(q, list) and isinstance(lm, list) and q[:1] == lm[:1] == ["object"]:
        qm, lmm = q[1], lm[1]
        out = [f"{path}/{k}: livemig lacks it" for k in qm if k not in lmm]
        out += [f"{path}/{k}: QEMU lacks it" for k in lmm if k not in qm and not k.startswith("x-")]
        for k in qm:
            if k in lmm:
                out += _explain_type(qm[k], lmm[k], f"{path}/{k}")
        return out
    if isinstance(q, list) and isinstance(lm, list) and q[:1] == lm[:1] == ["enum"]:
        extra = sorted(set(lm[1]) - set(q[1]))
        missing = sorted(set(q[1]) - set(lm[1]))
        return ([f"{path}: livemig's enum adds {extra}"] if extra else []) + (
            [f"{path}: livemig's enum lacks {missing}"] if missing else []
        )
    if isinstance(q, list) and isinstance(lm, list) and len(q) == len(lm) == 2 and \
            q[0] == lm[0]:  # fmt: skip
        return _explain_type(q[1], lm[1], path)
    return [f"{path}: QEMU {json.dumps(q)[:120]}, livemig {json.dumps(lm)[:120]}"]


@pytest.fixture(scope="module")
def schemas(qemu10: QemuBinary, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    tmp = Path(tmp_path_factory.mktemp("schema"))
    with QemuVM(qemu10, tmp, "schema") as vm:
        raw = Raw(vm.qmp_path)
        qemu = raw.ask(_x("query-qmp-schema"))["return"]
        raw.close()
    side = Livemig(tmp, incoming=False)
    try:
        raw = Raw(side.qmp_path)
        mine = raw.ask(_x("query-qmp-schema"))["return"]
        commands = {c["name"] for c in raw.ask(_x("query-commands"))["return"]}
        raw.close()
    finally:
        side.stop()
    assert commands == {e["name"] for e in mine if e["meta-type"] == "command"}
    return qemu, mine


def test_schema_is_qemus_for_what_livemig_implements(schemas: tuple[list, list]) -> None:
    """livemig's query-qmp-schema lists exactly its commands and events, in QEMU's format
    (numbered types, builtins, ``default: null`` for optional members); for each one QEMU 10.0
    has, the arguments, reply and event data resolve to QEMU's types. What differs is in
    docs/qmp-conformance.md (scenario ``schema``)."""
    qemu, mine = schemas
    names = [e["name"] for e in mine]
    assert len(names) == len(set(names))
    assert {e["meta-type"] for e in mine} <= {"command", "event", "object", "enum", "array",
                                              "alternate", "builtin"}  # fmt: skip
    by = {e["name"]: e for e in mine}
    for e in mine:  # every reference resolves
        for key in ("arg-type", "ret-type", "element-type"):
            if key in e:
                _canon(by, e[key])
    found = _schema_diffs(qemu, mine)
    docs = {r: why for (s, r), why in documented().items() if s == "schema"}
    undocumented = {k: v for k, v in found.items() if k not in docs}
    stale = sorted(k for k in docs if k not in found)
    assert not undocumented, "schema differences not in docs/qmp-conformance.md:\n" + "\n".join(
        f"{k}:\n    " + "\n    ".join(v) for k, v in sorted(undocumented.items())
    )
    assert not stale, f"documented schema differences that are gone: {stale}"
    assert by["migrate-pause"]["allow-oob"] and by["migrate-recover"]["allow-oob"]
