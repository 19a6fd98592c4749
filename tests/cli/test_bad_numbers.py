"""Bad numbers on the command line: one clear line naming the flag, a non-zero exit, never a
traceback. ``--timeout -1`` / ``nan`` reached ``socket.settimeout`` and ``plan --seconds nan``
reached ``int()``, each ending in a Python traceback; ``plan --bandwidth 0`` was taken as "not
given" and planned with a measured link; ``capture`` into a directory that does not exist
listened, took the whole migration from the source and only then failed to write it."""

from __future__ import annotations

import subprocess
import sys

import pytest

FIXTURE = "/work/shared/fixtures/qemu/pc-64m-bios.mig"


def _livemig(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig", *argv], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "abc"])
@pytest.mark.parametrize("command", ["capture", "replay"])
def test_timeouts_must_be_positive_seconds(command: str, value: str, tmp_path) -> None:
    if command == "capture":
        argv = [command, "tcp:127.0.0.1:0", str(tmp_path / "out.mig")]
    else:
        argv = [command, FIXTURE, "tcp:127.0.0.1:1"]
    res = _livemig(*argv, "--timeout", value)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1].startswith(f"livemig {command}: error: argument --timeout")
    assert value in res.stderr.splitlines()[-1]


@pytest.mark.parametrize("value", ["nan", "inf", "-3", "0", "0.01", "61"])
def test_plan_seconds_in_calc_dirty_rate_range(value: str) -> None:
    # refused by the argument check, before any QMP connection (none exists here)
    res = _livemig("plan", "--qmp", "unix:/nonexistent.sock", "--seconds", value)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith("livemig plan: error: argument --seconds") and "0.05 to 60" in last


@pytest.mark.parametrize("value", ["0", "0K"])
def test_plan_bandwidth_zero_is_refused(value: str) -> None:
    res = _livemig("plan", "--qmp", "unix:/nonexistent.sock", "--bandwidth", value)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith("livemig plan: error: --bandwidth") and "more than 0" in line, line


def test_capture_refuses_an_output_it_cannot_write_before_listening(tmp_path) -> None:
    out = tmp_path / "no" / "such" / "out.mig"
    res = _livemig("capture", "tcp:127.0.0.1:0", str(out), "--timeout", "30")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    [line] = res.stderr.splitlines()
    assert line == f"livemig capture: error: Could not create '{out}': No such file or directory"


@pytest.mark.parametrize("flag", ["--timeout", "--interval"])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_migrate_seconds_are_checked_before_connecting(flag: str, value: str) -> None:
    """migrate --timeout -1 or nan started the migration anyway (what they meant: unknown)."""
    res = _livemig("migrate", "--qmp", "unix:/nonexistent.sock", "tcp:127.0.0.1:1", flag, value)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1].startswith(f"livemig migrate: error: argument {flag}")


def test_migrate_report_that_cannot_be_written_is_refused_before_migrating(tmp_path) -> None:
    """--report under a regular file ended, after the whole migration, in a FileExistsError
    traceback and exit status 0."""
    (tmp_path / "file").write_text("")
    stem = tmp_path / "file" / "report"
    res = _livemig("migrate", "--qmp", "unix:/nonexistent.sock", "tcp:127.0.0.1:1",
                   "--report", str(stem))  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith(f"livemig migrate: error: --report {stem}: cannot create"), line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # the backend's address was reported as the serve address
        (["--serve", "tcp:127.0.0.1:0", "--backend", "nope"],
         "livemig front: error: backend address 'nope': expected"),
        (["--serve", "nope", "--backend", "tcp:127.0.0.1:1"],
         "livemig front: error: serve address 'nope': expected"),
        # nan passed the "positive" check and the front served with it
        (["--serve", "tcp:127.0.0.1:0", "--backend", "tcp:127.0.0.1:1", "--failover-timeout",
          "nan"], "livemig front: error: argument --failover-timeout"),
    ],
)  # fmt: skip
def test_front_names_the_flag_at_fault(argv: list[str], expected: str) -> None:
    res = _livemig("front", *argv)
    assert res.returncode in (1, 2) and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1].startswith(expected), res.stderr


def test_capture_says_the_port_it_listens_on(tmp_path) -> None:
    """capture tcp:127.0.0.1:0 chose a port and told it nowhere: no source could be pointed
    at it. It says where it waits, on stderr, before waiting."""
    import re
    import socket

    out = tmp_path / "out.mig"
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "capture", "tcp:127.0.0.1:0",
                             str(out), "--timeout", "10"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.fullmatch(r"livemig capture: waiting on tcp:127\.0\.0\.1:(\d+)\n", line)
        assert m and int(m[1]) > 0, line
        with socket.create_connection(("127.0.0.1", int(m[1])), timeout=5) as s:
            s.sendall(b"not a migration stream")
        assert proc.wait(30) == 1
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
