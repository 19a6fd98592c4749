"""``livemig bench service``: closed-loop clients and redis-benchmark's default tests before,
during and after a migration driven by a plain QMP migrate (no serve redirect), zero errors."""

from __future__ import annotations

import shutil

import pytest

from livemig.bench import service


@pytest.mark.timeout(240)
def test_closed_loop_phases_without_errors() -> None:
    r = service.run_bench(memory="32M", clients=2, nkeys=500, phase_s=0.5)
    assert r["migration"]["status"] == "completed"
    assert (r["errors"], r["wrong_values"]) == (0, 0), r["error_samples"]
    assert r["after"]["requests"] > 0 and r["destination_requests"] > 0


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-tools not installed")
def test_redis_benchmark_before_during_after() -> None:
    r = service.run_redis_benchmark(memory="32M", requests=300, clients=2)
    assert r is not None and r["migration"]["status"] == "completed"
    for run in ("before", "during", "after"):
        assert r[run]["tests"] == 20 and r[run]["errors"] == 0, r[run]
        assert r[run]["p50_ms"] <= r[run]["p99_ms"] <= r[run]["max_ms"]
    assert r["during"]["overlapped_migration"]
