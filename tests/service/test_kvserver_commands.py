"""The kvserver guest's commands answer as Redis does: strings, lists, sets, hashes and sorted
sets (redis-benchmark's default test set and their readers), type errors, and sorted-set scores
kept as exact decimals. One real ``livemig run --guest kvserver --serve`` for the module."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from livemig.service import RespClient, RespError
from livemig.testing.procs import LivemigProcess, ProcHarness, free_tcp_port, wait_until

WRONGTYPE = RespError("WRONGTYPE Operation against a key holding the wrong kind of value")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[LivemigProcess, int]]:
    with ProcHarness(memory="64M", smp=1) as h:
        port = free_tcp_port()
        src = h.source(guest="kvserver", append="", extra=["--serve", f"tcp:127.0.0.1:{port}"])

        def answers() -> bool:
            try:
                with RespClient("127.0.0.1", port, timeout=5) as c:
                    return c.call("PING") == "PONG"
            except OSError:
                return False

        wait_until(answers, 30, "kvserver answering")
        yield src, port


@pytest.fixture
def c(server: tuple[LivemigProcess, int]) -> Iterator[RespClient]:
    with RespClient("127.0.0.1", server[1], timeout=30) as client:
        assert client.call("FLUSHALL") == "OK"
        yield client


def test_lists(c: RespClient) -> None:
    assert c.call("RPUSH", "l", "a", "b") == 2
    assert c.call("LPUSH", "l", "x", "y") == 4  # y x a b
    assert c.call("LRANGE", "l", 0, -1) == [b"y", b"x", b"a", b"b"]
    assert c.call("LRANGE", "l", -2, 100) == [b"a", b"b"]
    assert c.call("LRANGE", "l", 3, 1) == []
    assert c.call("LLEN", "l") == 4
    assert c.call("LINDEX", "l", -1) == b"b"
    assert c.call("LPOP", "l") == b"y"
    assert c.call("RPOP", "l", 2) == [b"b", b"a"]
    assert c.call("LPOP", "l") == b"x"
    assert c.call("EXISTS", "l") == 0  # an emptied list is no key
    assert c.call("LPOP", "l") is None
    assert c.call("TYPE", "l") == "none"


def test_sets_and_hashes(c: RespClient) -> None:
    assert c.call("SADD", "s", "a", "b", "a", "c") == 3
    assert c.call("SCARD", "s") == 3 and c.call("SISMEMBER", "s", "b") == 1
    assert sorted(c.call("SMEMBERS", "s")) == [b"a", b"b", b"c"]
    assert c.call("SREM", "s", "a", "zz") == 1
    popped = c.call("SPOP", "s", 5)
    assert sorted(popped) == [b"b", b"c"] and c.call("EXISTS", "s") == 0
    assert c.call("HSET", "h", "f1", "v1", "f2", "v2") == 2
    assert c.call("HSET", "h", "f1", "new") == 0
    assert c.call("HGET", "h", "f1") == b"new" and c.call("HGET", "h", "nope") is None
    assert c.call("HMGET", "h", "f2", "nope") == [b"v2", None]
    assert c.call("HLEN", "h") == 2 and c.call("HEXISTS", "h", "f2") == 1
    flat = c.call("HGETALL", "h")
    assert dict(zip(flat[::2], flat[1::2], strict=True)) == {b"f1": b"new", b"f2": b"v2"}
    assert c.call("HDEL", "h", "f1", "f2") == 2 and c.call("TYPE", "h") == "none"


def test_sorted_sets_order_by_exact_decimal_score_then_member(c: RespClient) -> None:
    assert c.call("ZADD", "z", "10", "ten", "9.5", "nine", "-1e1", "neg", "+inf", "top") == 4
    assert c.call("ZADD", "z", "0.10", "a", "0.1", "b", "1E-1", "c") == 3
    assert c.call("ZRANGE", "z", 0, -1) == [b"neg", b"a", b"b", b"c", b"nine", b"ten", b"top"]
    assert c.call("ZSCORE", "z", "a") == b"0.1" and c.call("ZSCORE", "z", "neg") == b"-10"
    assert c.call("ZSCORE", "z", "top") == b"inf"
    assert c.call("ZADD", "z", "CH", "100", "a") == 1  # moved, not added
    assert c.call("ZADD", "z", "NX", "5", "a") == 0 and c.call("ZSCORE", "z", "a") == b"100"
    assert c.call("ZRANGE", "z", -2, -1, "WITHSCORES") == [b"a", b"100", b"top", b"inf"]
    assert c.call("ZPOPMIN", "z") == [b"neg", b"-10"]
    assert c.call("ZPOPMIN", "z", 2) == [b"b", b"0.1", b"c", b"0.1"]
    assert c.call("ZREM", "z", "nine", "nope") == 1 and c.call("ZCARD", "z") == 3
    with pytest.raises(RespError, match="not a valid float"):
        c.call("ZADD", "z", "1.23456789012345678", "m")  # 18 digits: not kept exactly
    with pytest.raises(RespError, match="not a valid float"):
        c.call("ZADD", "z", "abc", "m")
    # 2000 members in random order come back sorted
    import random

    scores = list(range(2000))
    random.Random(1).shuffle(scores)
    assert c.pipeline([("ZADD", "big", s, f"m{s}") for s in scores]) == [1] * 2000
    assert c.call("ZRANGE", "big", 0, -1) == [f"m{s}".encode() for s in range(2000)]


def test_type_errors_and_overwrite(c: RespClient) -> None:
    c.call("RPUSH", "l", "a")
    assert c.pipeline([("GET", "l"), ("SADD", "l", "x"), ("INCR", "l"), ("HGET", "l", "f")]) == [
        WRONGTYPE] * 4  # fmt: skip
    assert c.call("SET", "l", "now a string") == "OK" and c.call("TYPE", "l") == "string"
    assert c.call("DEL", "l") == 1
    with pytest.raises(RespError, match="unknown command 'XADD'"):
        c.call("XADD", "s", "*", "f", "v")


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-tools not installed")
def test_redis_benchmark_default_tests_without_errors(server: tuple[LivemigProcess, int]) -> None:
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(server[1]), "-q", "-n", "300",
         "-c", "4"], capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "error" not in text.lower(), text
    done = {line.split(":")[0].split(" (")[0] for line in text.splitlines()
            if "requests per second" in line}  # fmt: skip
    assert {"LPUSH", "RPOP", "SADD", "HSET", "SPOP", "ZADD", "ZPOPMIN", "LRANGE_600",
            "MSET"} <= done, text  # fmt: skip
