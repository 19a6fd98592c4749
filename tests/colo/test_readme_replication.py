"""The README's replication lines, run as written (ports and socket paths swapped for free
ones): after ``redis-cli set`` through the front, the primary is SIGKILLed (as the README's
comment says), and ``redis-cli get`` at the same address answers the value from the standby."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from livemig.testing.procs import free_tcp_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    tail = text[text.index("A guest that survives its host") :]
    block = tail[tail.index("```\n") + 4 :]
    block = block[: block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-tools not installed")
def test_readme_replication_lines_work_as_written(tmp_path: Path) -> None:
    lines = _block()
    assert [ln.split()[:2] for ln in lines] == [
        ["livemig", "run"], ["livemig", "run"], ["livemig", "front"], ["livemig", "migrate"],
        ["redis-cli", "-p"], ["redis-cli", "-p"]]  # fmt: skip
    subst = {p: str(free_tcp_port()) for p in ("7000", "7001", "7002", "4444")}
    subst["/tmp/"] = f"{tmp_path}/"
    for old, new in subst.items():
        lines = [ln.replace(old, new) for ln in lines]

    def argv(line: str) -> list[str]:
        words = shlex.split(line)
        return [sys.executable, "-m", "livemig", *words[1:]] if words[0] == "livemig" else words

    def cli(line: str) -> str:
        p = subprocess.run(argv(line), capture_output=True, text=True, timeout=30)
        return p.stdout.strip()

    procs = [subprocess.Popen(argv(line), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for line in lines[:3]]  # fmt: skip
    try:
        front = subst["7000"]
        wait_until(lambda: cli(f"redis-cli -p {front} ping") == "PONG", 30, "the front answering")
        wait_until(lambda: Path(f"{tmp_path}/b.sock").exists(), 30, "the standby up")
        mig = subprocess.run(argv(lines[3]), capture_output=True, text=True, timeout=60)
        assert mig.returncode == 0, mig.stdout + mig.stderr
        assert "replication" in mig.stdout and "running" in mig.stdout, mig.stdout
        assert cli(lines[4]) == "OK"
        procs[0].kill()  # kill -9 the primary
        procs[0].wait(10)
        assert cli(lines[5]) == "v"
        _out, err = procs[1].communicate(timeout=1) if procs[1].poll() is not None else ("", "")
        assert procs[1].poll() is None, err
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
