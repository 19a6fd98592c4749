"""``livemig migrate --dest-qmp``: the capabilities both sides need are set on the destination
too, and its post-copy figures reach the summary; without it, a post-copy migration into a
destination that lacks postcopy-ram fails with a hint that says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from livemig.procs import free_port
from livemig.testing.procs import ProcHarness

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _migrate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig", "migrate", *argv, "--timeout", "60"],
                          env=ENV, capture_output=True, text=True, timeout=90)  # fmt: skip


@pytest.mark.timeout(120)
def test_dest_qmp_sets_postcopy_on_both_sides(harness: ProcHarness) -> None:
    src = harness.source(append="ws=48M rate=0")
    dst = harness.destination(incoming="defer")
    src.wait_passes_increase(0)
    out = _migrate("--qmp", src.qmp_uri, "--dest-qmp", dst.qmp_uri, "--postcopy-after-precopy",
                   "--cap", "postcopy-preempt", "--json", f"tcp:127.0.0.1:{free_port()}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout)
    assert info["status"] == "completed"
    dest = info["destination"]
    assert dest["status"] == "completed"
    caps = {c["capability"]: c["state"] for c in dst.cmd("query-migrate-capabilities")}
    assert caps["postcopy-ram"] and caps["postcopy-preempt"] and caps["postcopy-blocktime"]
    assert dest["x-postcopy"]["requests"] >= 0 and "postcopy-blocktime" in dest
    dst.wait_status("running")
    report = dst.guest_check()
    assert report["ok"], report["problems"]


@pytest.mark.timeout(120)
def test_postcopy_without_dest_caps_fails_with_a_hint(harness: ProcHarness) -> None:
    src = harness.source(append="ws=48M rate=0")
    port = free_port()
    dst = harness.destination(incoming=f"tcp:127.0.0.1:{port}")
    src.wait_passes_increase(0)
    out = _migrate("--qmp", src.qmp_uri, "--postcopy-after-precopy", f"tcp:127.0.0.1:{port}")
    assert out.returncode == 1
    assert "the destination needs postcopy-ram too" in " ".join(out.stdout.split())
    assert dst.wait_exit(timeout=20) == 1
    assert "capability postcopy-ram is off on the destination" in dst.log()
    src.wait_status("running", timeout=10)  # the source guest runs on, untouched


@pytest.mark.timeout(120)
def test_multifd_then_postcopy_with_verify(harness: ProcHarness) -> None:
    """Pre-copy on two multifd channels, then post-copy with preempt: the channels are flushed
    before the switch, requested pages come on the preempt channel, and RAM ends identical."""
    src = harness.source(append="ws=48M rate=0")
    dst = harness.destination(incoming="defer")
    src.wait_passes_increase(0)
    out = _migrate("--qmp", src.qmp_uri, "--dest-qmp", dst.qmp_uri, "--multifd", "2",
                   "--postcopy-after-precopy", "--cap", "postcopy-preempt", "--verify", "--json",
                   f"tcp:127.0.0.1:{free_port()}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout)
    assert info["status"] == "completed" and info["verified"] is True
    assert info["ram"]["multifd-bytes"] > 0 and info["ram"]["postcopy-bytes"] > 0
    assert info["destination"]["status"] == "completed"
    dst.wait_status("running")
    report = dst.guest_check()
    assert report["ok"], report["problems"]
