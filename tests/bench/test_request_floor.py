"""The request-path floor beside ``livemig bench postcopy``: real faults served over loopback,
and a page server that dies fails the measurement instead of hanging it."""

from __future__ import annotations

import time

import pytest

from livemig.bench import request_floor
from livemig.errors import LivemigError


def test_floor_serves_every_fault() -> None:
    r = request_floor.measure(300, busy=1)
    assert r["faults"] == 300 and r["busy"] == 1
    assert 0 < r["p50-us"] <= r["p90-us"] <= r["p99-us"]


def test_a_dead_page_server_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # accepts both connections, answers nothing, goes away
    dead = request_floor._SERVER.split("page = ")[0] + "req.close(); rep.close()\n"
    monkeypatch.setattr(request_floor, "_SERVER", dead)
    t0 = time.monotonic()
    with pytest.raises(LivemigError, match="page server went away"):
        request_floor.measure(50)
    assert time.monotonic() - t0 < request_floor.TIMEOUT
