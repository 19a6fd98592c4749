"""Predict the migration of a running guest: sample it over QMP, run the convergence model.

``plan_for`` asks the livemig process behind a QMP connection to measure the guest's dirty rate
and working set (``calc-dirty-rate``, measured with the kernel's dirty log), takes the link's
bandwidth (given, or loopback TCP measured now) and the source's migration parameters, and runs
``livemig.migration.planner.predict``: does pre-copy converge, in how long, with what downtime,
and should one use pre-copy, auto-converge or post-copy. ``livemig plan`` prints it.
"""

from __future__ import annotations

import time
from typing import Any

from livemig.errors import LivemigError, UsageError
from livemig.migration.planner import Prediction, predict


def sample(qmp: Any, seconds: float) -> dict[str, Any]:
    """Run calc-dirty-rate on a connected QMP client and wait for the result."""
    ms = max(100, int(seconds * 1000))
    qmp.command("calc-dirty-rate", **{"calc-time": ms, "calc-time-unit": "millisecond"})
    deadline = time.monotonic() + seconds + 30
    while time.monotonic() < deadline:
        res = qmp.command("query-dirty-rate")
        if res.get("status") == "measured":
            if "x-error" in res:
                raise LivemigError(f"dirty rate measurement failed: {res['x-error']}")
            return res
        time.sleep(0.1)
    raise LivemigError("dirty rate measurement did not finish")


def loopback_bandwidth(nbytes: int = 64 << 20) -> float:
    """Bytes/s of one TCP stream over loopback, measured now (the link of a local migration)."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def sink() -> None:
        conn, _ = srv.accept()
        buf = bytearray(1 << 20)
        while conn.recv_into(buf):
            pass
        conn.close()

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    data = bytes(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.monotonic()
        for _ in range(nbytes >> 20):
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        t.join(10)
        elapsed = time.monotonic() - t0
    srv.close()
    return nbytes / elapsed


def plan_for(qmp: Any, seconds: float, link: int | None,
             overrides: dict[str, Any] | None = None) -> Prediction:  # fmt: skip
    """Sample the guest behind ``qmp`` and predict its migration, with the source's migration
    parameters (``overrides`` replacing some).

    Pre-copy is paced at ``max-bandwidth`` (or the link, if that is slower or the limit is
    off); the blackout is not rate limited, so it runs at the link's speed: ``link`` if given,
    else loopback TCP measured now (a local migration). A guest that is not running dirties
    nothing: its measured rate says nothing about the migration, so that is an error.
    """
    state = qmp.command("query-status").get("status")
    if state != "running":
        raise UsageError(f"the guest is not running (run state {state}): a plan needs its "
                         "dirty rate while it runs; start it (QMP cont) and plan again")  # fmt: skip
    params = {**qmp.command("query-migrate-parameters"), **(overrides or {})}
    limit_bw = params.get("max-bandwidth", 0)
    stop_bw = float(link) if link else loopback_bandwidth()
    bw = min(limit_bw, stop_bw) if limit_bw else stop_bw
    limit = params.get("downtime-limit", 300)
    res = sample(qmp, seconds)
    pred = predict(populated=res["x-populated"], working_set=res["x-working-set"],
                   dirty_rate=res["x-dirty-rate-bytes"], bandwidth=bw,
                   downtime_limit_ms=limit, params=params, stop_bandwidth=stop_bw)  # fmt: skip
    pred.inputs["link-bytes-per-s"] = stop_bw
    pred.inputs["link"] = "given" if link else "loopback TCP, measured"
    return pred
