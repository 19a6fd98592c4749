"""A replicated kvserver with its front, clients writing through it, and what a failover must
leave behind: for the test suite and ``livemig bench replication``.

``start_replicated`` builds the three processes of ``docs/replication.md`` (a primary ``livemig
run --guest kvserver --serve``, a standby ``livemig run --incoming ... --serve`` and a ``livemig
front`` whose backend is the primary) and starts replication. ``Writers`` are client threads
that write through the front: every key a ``SET`` acknowledged (``acked``), and one counter
whose ``INCR`` replies must be 1, 2, 3, ... with no gap and no repeat, across any number of
failovers (a request lost or run twice would show). ``audit`` reads every acknowledged key back.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from livemig.errors import LivemigError
from livemig.service import RespClient, RespError
from livemig.testing.procs import LivemigProcess, ProcError, ProcHarness, free_tcp_port, wait_until

COLO_TIMEOUT = 60.0


def answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with RespClient(host, port, timeout=5) as c:
            return c.call("PING") == "PONG"
    except (OSError, LivemigError):
        return False


def replicate(
    src: LivemigProcess, uri: str, delay_ms: int = 25, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Start replication from ``src`` to the standby listening at ``uri``; wait for ``colo``.
    With livemig's checksums on, as ``livemig migrate --replicate`` has them: every checkpoint
    is checked before the standby applies it."""
    src.cmd("migrate-set-capabilities", capabilities=[
        {"capability": c, "state": True}
        for c in ("events", "return-path", "x-colo", "x-checksums")])  # fmt: skip
    src.cmd("migrate-set-parameters", **{"x-checkpoint-delay": delay_ms, **(params or {})})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(COLO_TIMEOUT, frozenset({"colo", "failed", "cancelled",
                                                       "completed"}))  # fmt: skip
    if info.get("status") != "colo":
        raise ProcError(f"replication did not start: {info.get('status')}: "
                        f"{info.get('error-desc')}; primary log: {src.log()}")  # fmt: skip
    return info


@dataclass
class Replicated:
    """Primary, standby and front of one replicated kvserver."""

    h: ProcHarness
    primary: LivemigProcess
    standby: LivemigProcess
    front: LivemigProcess
    port: int  # the front's: where clients connect
    memory: str = "64M"
    smp: int = 1
    serve: dict[str, int] = field(default_factory=dict)  # process name -> its --serve port

    def start_replication(self, delay_ms: int = 25, params: dict[str, Any] | None = None) -> None:
        replicate(self.primary, self.standby.incoming or "", delay_ms, params)
        wait_until(lambda: self.front.cmd("x-query-front")["successor"], 10,
                   "the front to hear of the standby")  # fmt: skip

    def new_standby(self, params: dict[str, Any] | None = None, delay_ms: int = 25) -> None:
        """After a failover: a fresh standby for the guest's new primary (the old standby)."""
        self.primary = self.standby
        self.standby = _standby(self.h, self.serve, self.memory, self.smp)
        replicate(self.primary, self.standby.incoming or "", delay_ms, params)


def _standby(h: ProcHarness, serve: dict[str, int], memory: str, smp: int) -> LivemigProcess:
    port = free_tcp_port()
    proc = h.destination(incoming=f"tcp:127.0.0.1:{free_tcp_port()}", memory=memory, smp=smp,
                         extra=["--serve", f"tcp:127.0.0.1:{port}"])  # fmt: skip
    wait_until(lambda: proc.status() == "inmigrate", 30, f"{proc.name} listening")
    serve[proc.name] = port
    return proc


def start_replicated(
    h: ProcHarness,
    *,
    memory: str = "64M",
    smp: int = 1,
    delay_ms: int = 25,
    params: dict[str, Any] | None = None,
    front_extra: tuple[str, ...] = (),
    defer: bool = False,
) -> Replicated:
    """Primary, standby and front; replication running unless ``defer``
    (``Replicated.start_replication`` then)."""
    serve: dict[str, int] = {}
    p1 = free_tcp_port()
    primary = h.source(guest="kvserver", append="", memory=memory, smp=smp,
                       extra=["--serve", f"tcp:127.0.0.1:{p1}"])  # fmt: skip
    serve[primary.name] = p1
    standby = _standby(h, serve, memory, smp)
    pf = free_tcp_port()
    front = h.front(f"tcp:127.0.0.1:{p1}", f"tcp:127.0.0.1:{pf}", extra=front_extra)
    wait_until(lambda: answers(pf), 30, "the front answering PING")
    r = Replicated(h, primary, standby, front, pf, memory, smp, serve)
    if not defer:
        r.start_replication(delay_ms, params)
    return r


class Writers:
    """Clients of the front: ``n`` writing unique keys, one incrementing a counter."""

    def __init__(
        self, port: int, n: int = 3, counter: bool = True, seed: int = 0, prefix: str = ""
    ) -> None:
        self.port = port
        self.prefix = prefix  # of its keys and its counter's, so that sets of writers differ
        self.stop_event = threading.Event()
        self.acked: dict[str, str] = {}
        self.counter: list[int] = []
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.threads = [threading.Thread(target=self._write, args=(i,), daemon=True)
                        for i in range(n)]  # fmt: skip
        if counter:
            self.threads.append(threading.Thread(target=self._count, daemon=True))

    def start(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)
        if any(t.is_alive() for t in self.threads):
            self.errors.append(f"a client did not finish within {timeout:g} s")

    def count(self) -> int:
        return len(self.acked) + len(self.counter)

    def _write(self, w: int) -> None:
        tag = self._rng.getrandbits(32)
        try:
            with RespClient("127.0.0.1", self.port, timeout=60) as c:
                i = 0
                while not self.stop_event.is_set():
                    key, value = f"{self.prefix}w{w}:{i}", f"{tag:x}:{i}"
                    reply, took = c.timed_call("SET", key, value)
                    if reply != "OK":
                        raise RespError(f"SET {key} answered {reply!r}")
                    with self._lock:
                        self.acked[key] = value
                        self.latencies.append(took)
                    i += 1
        except (OSError, LivemigError) as exc:
            self.errors.append(f"writer {w}: {exc!r}")

    def _count(self) -> None:
        try:
            with RespClient("127.0.0.1", self.port, timeout=60) as c:
                while not self.stop_event.is_set():
                    self.counter.append(int(c.call("INCR", f"{self.prefix}counter")))
        except (OSError, LivemigError) as exc:
            self.errors.append(f"counter: {exc!r}")


def audit(port: int, writers: Writers) -> dict[str, Any]:
    """Every acknowledged key read back through ``port``: lost and wrong ones, and whether the
    counter's replies were 1, 2, 3, ... and the counter holds the last one."""
    keys = list(writers.acked)
    got: list[Any] = []
    with RespClient("127.0.0.1", port, timeout=60) as c:
        for i in range(0, len(keys), 1000):
            got += c.pipeline([("GET", k) for k in keys[i : i + 1000]])
        stored = c.call("GET", f"{writers.prefix}counter")
    lost = sum(v is None for v in got)
    wrong = sum(v is not None and v != writers.acked[k].encode() for k, v in zip(keys, got,
                                                                              strict=True))  # fmt: skip
    n = len(writers.counter)
    counter_ok = writers.counter == list(range(1, n + 1)) and (n == 0 or stored == str(n).encode()
                                                                or int(stored) > n)  # fmt: skip
    return {"acked": len(keys), "lost": lost, "wrong": wrong, "counter-replies": n,
            "counter-exact": counter_ok, "errors": list(writers.errors)}  # fmt: skip


def kill_and_wait_takeover(r: Replicated, delay: float) -> dict[str, Any]:
    """SIGKILL the primary after ``delay`` s; wait until the standby runs the guest and the
    front serves again. Returns timings (seconds from the kill)."""
    time.sleep(delay)
    t0 = time.monotonic()
    r.primary.kill()
    r.standby.wait_status("running", 30)
    t_run = time.monotonic() - t0
    wait_until(lambda: answers(r.port), 30, "the front answering after the failover")
    return {"takeover-s": t_run, "answered-s": time.monotonic() - t0,
            "colo": r.standby.cmd("query-colo-status")}  # fmt: skip
