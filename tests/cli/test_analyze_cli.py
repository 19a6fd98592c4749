"""``livemig analyze`` on a stream livemig wrote: devices only with ``--devices`` (the default
output was hundreds of lines of JSON), the run state decoded as its name, and zero-page counts
that add up with what ``livemig migrate`` reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from livemig.testing.procs import ProcHarness


def _livemig(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig", *argv], capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "150", "PATH": "/usr/bin"})  # fmt: skip


@pytest.mark.timeout(120)
def test_analyze_a_snapshot(tmp_path) -> None:
    snap = tmp_path / "snap.mig"
    with ProcHarness(memory="32M", smp=2) as h:
        src = h.source(append="ws=4M rate=1000")
        src.wait_passes_increase(0)
        h.migrate(src, f"file:{snap}")
        info = src.wait_migration(timeout=60)
        assert info["status"] == "completed", info
    ram = info["ram"]
    plain = _livemig("analyze", str(snap))
    assert plain.returncode == 0, plain.stderr
    assert "--devices shows their state" in plain.stdout and "cpu x2" in plain.stdout
    assert '"state"' not in plain.stdout and len(plain.stdout.splitlines()) < 40
    full = _livemig("analyze", str(snap), "--devices")
    assert '"runstate": "running"' in full.stdout, full.stdout[-2000:]
    report = json.loads(_livemig("analyze", str(snap), "--json").stdout)
    gs = next(d for d in report["devices"] if d["idstr"] == "globalstate")
    assert gs["state"]["runstate"] == "running"
    zero_records = sum(c["zero"] for c in report["pages"].values())
    normal = sum(c["normal"] for c in report["pages"].values())
    assert zero_records == ram["duplicate"] - ram["x-unpopulated"], (zero_records, ram)
    assert normal == ram["normal"]
