"""Every ``livemig migrate`` does what its command line says: capabilities and parameters it
was not asked for go back to the source's default, so nothing leaks from an earlier run, and
it says what it changed. A process started with ``run --set`` keeps that as its default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from livemig.testing.procs import ProcHarness


def _migrate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig", "migrate", *argv, "--timeout", "60"],
                          capture_output=True, text=True, timeout=90)  # fmt: skip


@pytest.mark.timeout(180)
def test_nothing_leaks_into_the_next_run(harness: ProcHarness) -> None:
    src = harness.source(append="ws=8M rate=20000", memory="32M")
    first = harness.destination(memory="32M")
    out = _migrate("--qmp", src.qmp_uri, "--postcopy", "--set", "max-bandwidth=20M",
                   first.incoming or "")  # fmt: skip
    assert out.returncode == 1  # the destination has no postcopy-ram: refused, with the reason
    assert "postcopy-ram is off on the destination" in " ".join(out.stdout.split())
    assert "postcopy-ram off -> on" in out.stderr and "max-bandwidth 128.0 MiB/s -> 20.0 MiB/s" \
        in out.stderr  # fmt: skip
    src.wait_status("running")
    second = harness.destination(memory="32M")
    out = _migrate("--qmp", src.qmp_uri, "--json", second.incoming or "")
    assert out.returncode == 0, out.stdout + out.stderr
    info = json.loads(out.stdout)
    assert info["status"] == "completed"
    assert sorted(info["changed"]["source"]) == [
        "max-bandwidth 20.0 MiB/s -> 128.0 MiB/s", "postcopy-ram on -> off"]  # fmt: skip
    caps = {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}
    assert not caps["postcopy-ram"] and caps["return-path"]
    assert src.cmd("query-migrate-parameters")["max-bandwidth"] == 128 << 20


@pytest.mark.timeout(120)
def test_the_process_default_is_what_run_started_with(harness: ProcHarness) -> None:
    src = harness.source(append="ws=8M rate=20000", memory="32M",
                         extra=["--set", "downtime-limit=50", "--cap", "auto-converge"])  # fmt: skip
    src.cmd("migrate-set-parameters", **{"downtime-limit": 999})
    dst = harness.destination(memory="32M")
    out = _migrate("--qmp", src.qmp_uri, "--json", dst.incoming or "")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["changed"]["source"] == [  # x-checksums: the CLI's default
        "return-path off -> on", "x-checksums off -> on", "downtime-limit 999 -> 50"]  # fmt: skip
    caps = {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}
    assert caps["auto-converge"]
