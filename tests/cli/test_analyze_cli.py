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


@pytest.mark.parametrize("keep", [1_460_000, 1_752_000])
def test_a_qemu_stream_cut_short_says_so(tmp_path, keep: int) -> None:
    """A QEMU stream cut inside its device sections has lost the vmdesc trailer that describes
    them: the error said "no field layout known (give a VMStateDescription or the stream's
    vmdesc)", which sends a user looking for a description rather than at the cut file."""
    from pathlib import Path

    fixture = Path("/work/shared/fixtures/qemu/pc-64m-bios.mig")
    if not fixture.exists():
        pytest.skip("no QEMU stream fixture")
    cut = tmp_path / "cut.mig"
    cut.write_bytes(fixture.read_bytes()[:keep])
    for argv in (["analyze", str(cut)], ["replay", str(cut), "tcp:127.0.0.1:1"]):
        res = _livemig(*argv)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        [line] = res.stderr.splitlines()
        assert "device section 'timer' instance 0" in line and "stream offset" in line, line
        assert "no vmdesc trailer" in line and "cut short" in line, line
