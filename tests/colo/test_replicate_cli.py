"""``livemig migrate --replicate`` from the command line: it returns once replication runs
(exit 0, the summary says so, --json carries query-colo-status), a plain ``livemig migrate``
afterwards turns x-colo off again, and what cannot replicate is refused before anything
starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from livemig.testing.procs import ProcHarness


def _migrate(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig", "migrate", *argv],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.timeout(120)
def test_replicate_returns_once_replication_runs(harness: ProcHarness) -> None:
    src = harness.source()
    dst = harness.destination()
    out = _migrate("--qmp", src.qmp_uri, dst.incoming or "", "--replicate", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(out.stdout)
    assert res["status"] == "colo" and res["colo"]["mode"] == "primary", res
    assert "x-colo off -> on" in " ".join(res["changed"]["source"])
    params = src.cmd("query-migrate-parameters")
    assert params["x-checkpoint-delay"] == 50
    assert dst.cmd("query-colo-status")["mode"] == "secondary"
    src.cmd("x-colo-lost-heartbeat")
    dst.wait_exit(15)  # stood down


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--checkpoint-delay", "30"], "goes with --replicate"),
        (["--replicate", "--postcopy"], "does not go with --postcopy"),
        (["--replicate", "--multifd", "2"], "does not go with --multifd"),
        (["--replicate", "--no-return-path"], "needs a return path"),
        (
            ["--replicate", "--checkpoint-delay", "30", "--set", "x-checkpoint-delay=40"],
            "give the interval once",
        ),
    ],
)
def test_replicate_refusals(argv: list[str], match: str) -> None:
    out = _migrate("--qmp", "unix:/nonexistent/qmp.sock", "tcp:127.0.0.1:9", *argv, timeout=30)
    assert out.returncode != 0 and match in out.stderr, out.stderr


def test_replicate_to_a_file_is_refused() -> None:
    out = _migrate("--qmp", "unix:/nonexistent/qmp.sock", "file:/tmp/x.mig", "--replicate",
                   timeout=30)  # fmt: skip
    assert out.returncode != 0 and "needs a return path" in out.stderr, out.stderr
