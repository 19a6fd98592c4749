"""A Redis-protocol service migrates between two real livemig processes with no lost, wrong or
duplicated request: 100k keys written before, read back after; a counter incremented all
through the migration answers 1, 2, 3, ... with no gap or repeat; redis-benchmark runs
through a whole migration with zero errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from livemig.errors import StreamError
from livemig.service import RespClient, RespError
from livemig.testing.procs import ProcHarness, free_tcp_port, wait_until

NKEYS = 100_000


def _pair(h: ProcHarness, incoming: str | None = None) -> tuple[Any, Any, int, int]:
    """A served kvserver and a destination with a serve address of its own (not needed for
    following: a plain QMP migrate is all the source is told)."""
    p1, p2 = free_tcp_port(), free_tcp_port()
    src = h.source(guest="kvserver", append="", extra=["--serve", f"tcp:127.0.0.1:{p1}"])
    dst = h.destination(incoming, extra=["--serve", f"tcp:127.0.0.1:{p2}"])
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
        assert serve["forwarding"] and serve["error"] is None
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


def _served_source(h: ProcHarness) -> tuple[Any, int]:
    port = free_tcp_port()
    src = h.source(guest="kvserver", append="", extra=["--serve", f"tcp:127.0.0.1:{port}"])
    wait_until(lambda: _answers(port), 20, "kvserver answering PING")
    return src, port


def _closed_or_error(client: RespClient) -> str:
    """What a client sees once the service is gone: an error reply, then the close."""
    try:
        reply = client.call("PING")
    except RespError as exc:
        return f"error: {exc}"
    except (OSError, StreamError) as exc:
        return f"closed: {exc}"
    return f"answered {reply!r}"


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-tools not installed")
def test_redis_benchmark_default_tests_through_a_plain_qmp_migrate() -> None:
    """The issue's case: a destination with no --serve, a plain QMP migrate and nothing else;
    redis-benchmark's default test set (lists, sets, hashes, sorted sets, MSET, LRANGE) keeps
    going at the source's address with zero errors, and the destination served part of it."""
    with ProcHarness(memory="64M", smp=1) as h:
        src, port = _served_source(h)
        dst = h.destination(f"tcp:127.0.0.1:{free_tcp_port()}")
        bench = subprocess.Popen(
            ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-n", "1500",
             "-c", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_until(lambda: src.cmd("x-query-serve")["requests"] > 3000, 60,
                       "benchmark under way")  # fmt: skip
            src.cmd("migrate", uri=dst.incoming)
            info = src.wait_migration(timeout=60)
            assert info["status"] == "completed", info
            assert bench.poll() is None, "benchmark ended before the migration did: raise -n"
            out, err = bench.communicate(timeout=200)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.wait(10)
        text = out + err
        assert bench.returncode == 0 and "error" not in text.lower(), text
        done = {line.split(":")[0].split(" (")[0] for line in text.splitlines()
                if "requests per second" in line}  # fmt: skip
        assert {"LRANGE_600", "MSET", "ZPOPMIN"} <= done, text
        serve = dst.cmd("x-query-serve")
        assert serve["tunnels-in"] == 1 and serve["requests"] > 500, serve
        assert src.cmd("x-query-serve")["forwarding"]


@pytest.mark.timeout(120)
def test_clients_hear_within_seconds_when_the_destination_goes_away() -> None:
    with ProcHarness(memory="32M", smp=1) as h:
        src, port = _served_source(h)
        dst = h.destination()
        with RespClient("127.0.0.1", port, timeout=30) as early:
            assert early.call("SET", "k", "v") == "OK"
            h.migrate(src, dst.incoming)
            assert src.wait_migration(timeout=60)["status"] == "completed"
            assert early.call("GET", "k") == b"v"  # through the tunnel, same connection
            with RespClient("127.0.0.1", port, timeout=30) as late:
                assert late.call("GET", "k") == b"v"  # a new connection goes through too
                dst.kill()
                t0 = time.monotonic()
                seen = _closed_or_error(late)
                assert time.monotonic() - t0 < 5, seen
                assert not seen.startswith("answered"), seen
        with RespClient("127.0.0.1", port, timeout=10) as after, \
                pytest.raises(RespError, match="destination closed"):  # fmt: skip
            after.call("PING")
        assert "closed" in src.cmd("x-query-serve")["error"]


@pytest.mark.timeout(120)
def test_a_snapshot_tells_clients_and_cont_serves_them_again() -> None:
    """migrate to file: has no destination to follow: clients get an error at once instead of
    a hang; QMP cont runs the guest here again and the service with it."""
    with ProcHarness(memory="32M", smp=1) as h:
        src, port = _served_source(h)
        with RespClient("127.0.0.1", port, timeout=30) as c:
            assert c.call("SET", "k", "v") == "OK"
            h.migrate(src, f"file:{h.path('snap.mig')}")
            assert src.wait_migration(timeout=60)["status"] == "completed"
            t0 = time.monotonic()
            seen = _closed_or_error(c)
            assert time.monotonic() - t0 < 5 and "snapshot" in seen, seen
        src.cmd("cont")
        wait_until(lambda: _answers(port), 10, "serving again after cont")
        with RespClient("127.0.0.1", port, timeout=10) as c:
            assert c.call("GET", "k") == b"v"


@pytest.mark.timeout(180)
def test_clients_follow_a_chain_of_migrations() -> None:
    """A to B to C: A's clients go through B's tunnel to C, and B's own to C."""
    with ProcHarness(memory="32M", smp=1) as h:
        a, port = _served_source(h)
        b = h.destination(f"tcp:127.0.0.1:{free_tcp_port()}")
        inc = Incrementer(port)
        inc.start()
        wait_until(lambda: len(inc.replies) > 20, 10, "INCR running")
        h.migrate(a, b.incoming)
        assert a.wait_migration(timeout=60)["status"] == "completed"
        wait_until(lambda: len(inc.replies) > 100, 20, "INCR on B")
        c = h.destination(f"tcp:127.0.0.1:{free_tcp_port()}")
        h.migrate(b, c.incoming)
        assert b.wait_migration(timeout=60)["status"] == "completed"
        seen = len(inc.replies)
        wait_until(lambda: len(inc.replies) > seen + 100, 20, "INCR on C")
        inc.stop.set()
        inc.join(30)
        assert not inc.errors
        assert inc.replies == list(range(1, len(inc.replies) + 1)), "lost or repeated INCR"
        assert c.cmd("x-query-serve")["tunnels-in"] == 1 and b.status() == "postmigrate"


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_clients_follow_a_tls_migration_over_tls(tmp_path: Any) -> None:
    """With tls-creds the tunnel is TLS too (mutual, the migration's CA): the source's follow
    listener refuses a plain connection."""
    import socket

    from livemig.transport.tls import generate_creds

    creds = str(generate_creds(tmp_path / "creds", names=("localhost", "127.0.0.1")))
    with ProcHarness(memory="32M", smp=1) as h:
        port = free_tcp_port()
        src = h.source(guest="kvserver", append="",
                       extra=["--serve", f"tcp:127.0.0.1:{port}", "--tls-creds", creds])  # fmt: skip
        wait_until(lambda: _answers(port), 20, "kvserver answering PING")
        dst = h.destination(f"tcp:127.0.0.1:{free_tcp_port()}", extra=["--tls-creds", creds])
        h.migrate(src, dst.incoming, caps={"pause-before-switchover": True})
        wait_until(lambda: src.query_migrate()["status"] == "pre-switchover", 20,
                   "migration paused before switch-over")  # fmt: skip
        follow = src.cmd("x-query-serve")["follow-address"]
        fhost, _, fport = follow.rpartition(":")
        with socket.create_connection((fhost, int(fport)), timeout=5) as s:
            s.sendall(b"LMTUNNEL2\n" + bytes(16))
            try:
                assert s.recv(100) == b""  # no TLS handshake: closed
            except ConnectionResetError:
                pass
        with RespClient("127.0.0.1", port, timeout=30) as c:
            c.sock.sendall(b"SET k v\r\n")  # in the blackout: answered after it
            src.cmd("migrate-continue", state="pre-switchover")
            assert src.wait_migration(timeout=60)["status"] == "completed"
            assert c._replies(1) == ["OK"]
            assert c.call("GET", "k") == b"v"
        assert (
            dst.cmd("x-query-serve")["tunnels-in"] == 1 and src.cmd("x-query-serve")["forwarding"]
        )
