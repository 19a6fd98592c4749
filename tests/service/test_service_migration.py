"""A Redis-protocol service migrates between two real livemig processes with no lost, wrong or
duplicated request: 100k keys written before, read back after; a counter incremented all
through the migration answers 1, 2, 3, ... with no gap or repeat; redis-benchmark runs
through a whole migration with zero errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from typing import Any

import pytest

from livemig.service import RespClient, RespError
from livemig.testing.procs import ProcHarness, free_tcp_port, wait_until

NKEYS = 100_000


def _pair(h: ProcHarness, incoming: str | None = None) -> tuple[Any, Any, int, int]:
    p1, p2 = free_tcp_port(), free_tcp_port()
    src = h.source(guest="kvserver", append="", extra=["--serve", f"tcp:127.0.0.1:{p1}"])
    dst = h.destination(incoming, extra=["--serve", f"tcp:127.0.0.1:{p2}"])
    src.cmd("x-serve-redirect", uri=f"tcp:127.0.0.1:{p2}")
    wait_until(lambda: _answers(p1), 20, "kvserver answering PING")
    return src, dst, p1, p2


def _answers(port: int) -> bool:
    try:
        with RespClient("127.0.0.1", port, timeout=5) as c:
            return c.call("PING") == "PONG"
    except OSError:
        return False


class Incrementer(threading.Thread):
    """INCR one counter back to back; every reply must be the previous one plus one."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = RespClient("127.0.0.1", port, timeout=30)
        self.stop = threading.Event()
        self.replies: list[int] = []
        self.errors: list[str] = []
        self.longest = 0.0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                reply, took = self.client.timed_call("INCR", "counter")
                self.replies.append(reply)
                self.longest = max(self.longest, took)
        except (OSError, RespError) as exc:
            self.errors.append(repr(exc))


@pytest.mark.timeout(120)
def test_100k_keys_and_a_counter_survive_precopy() -> None:
    with ProcHarness(memory="64M", smp=1) as h:
        src, dst, p1, p2 = _pair(h)
        with RespClient("127.0.0.1", p1, timeout=60) as c:
            sets = c.pipeline([("SET", f"key:{i}", f"value:{i}:{i * 7919}") for i in range(NKEYS)])
            assert sets == ["OK"] * NKEYS
            assert c.call("DBSIZE") == NKEYS
        inc = Incrementer(p1)
        inc.start()
        wait_until(lambda: len(inc.replies) > 50, 10, "INCR running")
        h.migrate(src, dst.incoming, caps={"events": True})
        info = src.wait_migration(timeout=60)
        assert info["status"] == "completed", info
        # Keep going through the tunnel, then stop.
        seen = len(inc.replies)
        wait_until(lambda: len(inc.replies) > seen + 50, 20, "INCR continuing after migration")
        inc.stop.set()
        inc.join(30)
        assert not inc.errors
        assert inc.replies == list(range(1, len(inc.replies) + 1)), "lost or repeated INCR"
        assert dst.status() == "running" and src.status() == "postmigrate"
        serve = src.cmd("x-query-serve")
        assert serve["forwarding"] and serve["redirect"] == f"tcp:127.0.0.1:{p2}"
        # Every key, through the source's (unchanged) address and directly at the destination.
        for port in (p1, p2):
            with RespClient("127.0.0.1", port, timeout=60) as c:
                got = c.pipeline([("MGET", *(f"key:{i}" for i in range(j, j + 1000)))
                                  for j in range(0, NKEYS, 1000)])  # fmt: skip
                values = [v for chunk in got for v in chunk]
                missing = sum(v is None for v in values)
                wrong = sum(
                    v is not None and v != f"value:{i}:{i * 7919}".encode()
                    for i, v in enumerate(values)
                )
                assert (missing, wrong) == (0, 0), f"port {port}"
                assert c.call("GET", "counter") == str(len(inc.replies)).encode()
        dinfo = dst.cmd("x-query-serve")
        assert dinfo["tunnels-in"] == 1 and dinfo["error"] is None


@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-tools not installed")
def test_redis_benchmark_runs_through_a_migration() -> None:
    with ProcHarness(memory="64M", smp=1) as h:
        src, dst, p1, _p2 = _pair(h)
        bench = subprocess.Popen(
            ["redis-benchmark", "-h", "127.0.0.1", "-p", str(p1), "-t", "set,get",
             "-n", "40000", "-c", "8", "-r", "10000", "--csv"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_until(
                lambda: src.cmd("x-query-serve")["requests"] > 2000, 30, "benchmark under way"
            )
            h.migrate(src, dst.incoming, caps={"events": True})
            info = src.wait_migration(timeout=60)
            assert info["status"] == "completed", info
            assert bench.poll() is None, "benchmark ended before the migration did: raise -n"
            out, err = bench.communicate(timeout=120)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.wait(10)
        assert bench.returncode == 0, err
        assert "error" not in (out + err).lower(), out + err
        assert '"SET"' in out and '"GET"' in out
        served = dst.cmd("x-query-serve")["requests"]
        assert served > 1000, "the destination served little of the benchmark"


def test_serve_address_in_use_is_a_usage_error() -> None:
    with ProcHarness(memory="16M", smp=1) as h:
        port = free_tcp_port()
        src = h.source(guest="kvserver", append="", extra=["--serve", f"tcp:127.0.0.1:{port}"])
        wait_until(lambda: _answers(port), 20, "kvserver answering")
        second = h._spawn(
            "src", ["--guest", "kvserver", "--memory", "16M", "--serve",
                    f"tcp:127.0.0.1:{port}"], None, None, wait_qmp=False,
        )  # fmt: skip
        assert second.wait_exit(30) != 0
        assert "cannot listen" in second.log()
        assert src.alive()


@pytest.mark.timeout(150)
def test_keys_and_counter_survive_postcopy() -> None:
    """Post-copy: the destination runs the guest while most of its RAM is still on the source;
    the ring device makes the guest touch the ring pages before host code uses them."""
    with ProcHarness(memory="64M", smp=1) as h:
        src, dst, p1, _p2 = _pair(h, incoming="defer")
        n = NKEYS
        with RespClient("127.0.0.1", p1, timeout=60) as c:
            sets = c.pipeline([("SET", f"key:{i}", f"value:{i}") for i in range(n)])
            assert sets == ["OK"] * n
        inc = Incrementer(p1)
        inc.start()
        wait_until(lambda: len(inc.replies) > 50, 10, "INCR running")
        pc = [{"capability": "postcopy-ram", "state": True}]
        dst.cmd("migrate-set-capabilities", capabilities=pc)
        mig = f"unix:{h.path('pc.sock')}"
        dst.cmd("migrate-incoming", uri=mig)
        wait_until(lambda: os.path.exists(h.path("pc.sock")), 10, "destination listening")
        # Slow pre-copy so that the switch to post-copy happens while pages are left.
        h.migrate(src, mig, caps={"events": True, "postcopy-ram": True},
                  params={"max-bandwidth": 8 << 20})  # fmt: skip
        src.cmd("migrate-start-postcopy")
        info = src.wait_migration(timeout=90)
        assert info["status"] == "completed", info
        assert "postcopy-active" in [d["status"] for _, d in src.event_names("MIGRATION")]
        seen = len(inc.replies)
        wait_until(lambda: len(inc.replies) > seen + 50, 20, "INCR continuing after migration")
        inc.stop.set()
        inc.join(30)
        assert not inc.errors
        assert inc.replies == list(range(1, len(inc.replies) + 1)), "lost or repeated INCR"
        with RespClient("127.0.0.1", p1, timeout=60) as c:
            got = c.pipeline([("MGET", *(f"key:{i}" for i in range(j, min(j + 1000, n))))
                              for j in range(0, n, 1000)])  # fmt: skip
            values = [v for chunk in got for v in chunk]
            assert values == [f"value:{i}".encode() for i in range(n)]
