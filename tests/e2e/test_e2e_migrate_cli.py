"""``livemig migrate`` as a script would run it: SIGTERM (``timeout 60 livemig migrate``)
cancels like Ctrl-C, output to a pipe prints a line a second, a snapshot that keeps growing
warns with the ways out, and ``--stop`` makes one that converges."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from livemig.testing.procs import ProcHarness, wait_until


def _popen(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "livemig", "migrate", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.timeout(120)
def test_sigterm_cancels_the_migration(harness: ProcHarness) -> None:
    src = harness.source(append="ws=16M rate=0", memory="64M")
    dst = harness.destination()
    mig = _popen("--qmp", src.qmp_uri, "--set", "max-bandwidth=4M", dst.incoming or "")
    wait_until(lambda: src.query_migrate().get("status") == "active", 30, "migration active")
    time.sleep(1.5)
    mig.send_signal(signal.SIGTERM)
    out, err = mig.communicate(timeout=60)
    assert mig.returncode == 1, out + err
    assert "interrupted: cancelling the migration" in err
    assert src.query_migrate()["status"] == "cancelled"
    src.wait_status("running")
    # a pipe got a line a second while it ran (about 1.5 s: two or three lines)
    lines = [ln for ln in err.splitlines() if ln.startswith("active")]
    assert 1 <= len(lines) <= 5 and "sent" in lines[0], err
    # what it had sent, though the cancelled reply has no RAM figures
    assert "sent before it ended" in out and " 0 B in" not in out, out


@pytest.mark.timeout(120)
def test_growing_snapshot_warns_and_stop_makes_one_that_converges(harness: ProcHarness) -> None:
    src = harness.source(append="ws=8M rate=0", memory="16M", smp=1)
    snap = harness.path("busy.mig")
    # downtime-limit 0 switches over only at a sync that finds nothing dirty. Unpaced, a pass
    # of the 8 MiB working set took a few ms, and on a loaded host the vCPU could miss a whole
    # pass: the migration then completed (seen in CI). At 64 MiB/s a pass takes ~125 ms.
    mig = _popen("--qmp", src.qmp_uri, "--set", "downtime-limit=0", "--set", "max-bandwidth=64M",
                 "--timeout", "30", f"file:{snap}")  # fmt: skip
    wait_until(lambda: os.path.exists(snap) and os.path.getsize(snap) > 4 * (16 << 20), 60,
               "the snapshot growing past 4x the guest's RAM")  # fmt: skip
    time.sleep(1.0)
    mig.send_signal(signal.SIGINT)
    _out, err = mig.communicate(timeout=60)
    text = " ".join(err.split())
    assert "times the guest's RAM, and is not done" in text, err
    assert "--stop" in text and "--cap mapped-ram" in text
    src.wait_status("running")
    os.unlink(snap)
    done = subprocess.run([sys.executable, "-m", "livemig", "migrate", "--qmp", src.qmp_uri,
                           "--stop", "--set", "downtime-limit=0", "--timeout", "60",
                           f"file:{snap}"], capture_output=True, text=True, timeout=90)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.path.getsize(snap) < 2 * (16 << 20)
    assert src.status() == "postmigrate"


@pytest.mark.timeout(120)
def test_migrate_writes_a_report_that_livemig_report_redraws(harness: ProcHarness) -> None:
    src = harness.source(append="ws=8M rate=20000", memory="32M", smp=1)
    dst = harness.destination(memory="32M", smp=1)
    stem = harness.path("rep")
    out = subprocess.run([sys.executable, "-m", "livemig", "migrate", "--qmp", src.qmp_uri,
                          "--report", stem, dst.incoming or ""],
                         capture_output=True, text=True, timeout=90)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"report: {stem}.json" in out.stdout
    import json
    from pathlib import Path

    report = json.loads(Path(f"{stem}.json").read_text())
    assert report["query-migrate"]["status"] == "completed" and report["passes"]
    again = subprocess.run([sys.executable, "-m", "livemig", "report", f"{stem}.json", "--png",
                            f"{stem}2.png"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert os.path.getsize(f"{stem}2.png") > 10_000
