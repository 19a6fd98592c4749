"""``livemig demo`` end to end: two real processes, a live migration, a report that agrees with
``query-migrate``, and ``livemig report`` drawing it again."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest


def _livemig(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo") / "report"
    proc = _livemig("demo", "--memory", "64M", "--working-set", "8M", "--dirty-rate", "4M",
                    "--watch", "0.3", "--out", str(out))  # fmt: skip
    return proc, out


def test_demo_migrates_and_summarises(demo) -> None:
    proc, _out = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for words in ("migration summary", "completed", "downtime", "identical", "holds",
                  "report:", "plots:"):  # fmt: skip
        assert words in text, text[-3000:]
    assert "destination │ memstress" in text  # the guest's console after the move
    # --verify's hashing stopped the guest too, but it is its own line, not the downtime
    assert "ms more, guest stopped (source" in text and "destination" in text


def test_report_agrees_with_query_migrate(demo) -> None:
    _, out = demo
    report = json.loads(out.with_suffix(".json").read_text())
    qm = report["query-migrate"]
    assert qm["status"] == "completed"
    ram = qm["ram"]
    # one pass record per dirty-bitmap sync, plus the setup record
    assert len(report["passes"]) == ram["dirty-sync-count"]  # the setup sync is pass 1
    sent = sum(p["bytes_sent"] for p in report["passes"])
    assert 0 < sent <= ram["transferred"]
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    samples = report["samples"]
    assert samples and samples[-1]["transferred"] == ram["transferred"]
    assert all(a["transferred"] <= b["transferred"] for a, b in itertools.pairwise(samples))
    bd = report["downtime-breakdown"]
    assert set(bd) == {"vcpu-stop", "final-sync", "final-ram", "device-state", "verify-hashing",
                       "resume"}  # fmt: skip
    # the source's hashing, and what the destination's took of the wait for its SHUT
    assert bd["verify-hashing"] * 1000 >= qm["x-verify-ms"] - 0.1
    assert report["destination"]["x-verify-ms"] > 0
    assert abs(sum(bd.values()) * 1000 - qm["downtime"]) <= 2
    assert report["verification"]["ram-hashes-equal"] is True
    assert report["verification"]["invariant"]["ok"] is True
    assert report["destination"]["status"] == "completed"


def test_report_redraws(demo, tmp_path: Path) -> None:
    _, out = demo
    png = tmp_path / "again.png"
    proc = _livemig("report", str(out.with_suffix(".json")), "--png", str(png), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_report_refuses_other_json(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    proc = _livemig("report", str(bad), timeout=60)
    assert proc.returncode == 1
    assert "is not a livemig report" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_bad_input_is_one_line() -> None:
    proc = _livemig("demo", "--memory", "64M", "--working-set", "48M", timeout=60)
    assert proc.returncode == 1
    assert "must be at most half of --memory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_postcopy_report_has_latencies(tmp_path: Path) -> None:
    out = tmp_path / "pc"
    proc = _livemig("demo", "--postcopy-after-precopy", "--memory", "64M", "--working-set", "16M",
                    "--dirty-rate", "200M", "--set", "max-bandwidth=16M", "--watch", "0.3",
                    "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["config"]["postcopy"] is True
    assert "postcopy" in report["phases"], report["phases"]
    lat = report["postcopy"]["latencies-ms"]
    assert len(lat) == report["destination"]["x-postcopy"]["requests"]
    assert all(x > 0 for x in lat)
    assert report["verification"]["invariant"]["ok"] is True


def test_report_of_a_binary_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "random.bin"
    bad.write_bytes(bytes(range(256)) * 8)
    proc = _livemig("report", str(bad), timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is not a report: not UTF-8 text" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # memory 0 was blamed on the working set
        (["--memory", "0"], "livemig demo: error: --memory 0: "),
        # parsed only after the guest was built
        (["--dirty-rate", "abc"], "livemig demo: error: --dirty-rate: cannot parse 'abc'"),
        # without --two-hosts the rate was ignored, whatever it said: the whole demo ran
        (["--link-rate", "abc"], "livemig demo: error: --link-rate goes with --two-hosts"),
        (["--two-hosts", "--link-rate", "abc"], "livemig demo: error: link rate 'abc'"),
        # -1 and nan were taken, as no console at all
        (["--watch", "-1"], "livemig demo: error: argument --watch"),
        (["--watch", "nan"], "livemig demo: error: argument --watch"),
    ],
)
def test_demo_refuses_bad_flags_before_starting(argv: list[str], expected: str) -> None:
    proc = _livemig("demo", *argv, timeout=60)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(expected), proc.stderr
    assert "building" not in proc.stdout, proc.stdout


def test_demo_out_that_cannot_be_written_is_refused_before_starting(tmp_path: Path) -> None:
    """--out under a regular file ran the whole demo, then ended in a FileExistsError
    traceback."""
    (tmp_path / "file").write_text("")
    stem = tmp_path / "file" / "report"
    proc = _livemig("demo", "--out", str(stem), timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"livemig demo: error: --out {stem}: cannot create"), line
    assert "building" not in proc.stdout, proc.stdout
