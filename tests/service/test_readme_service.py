"""The README's service lines, run as written (ports and socket paths swapped for free ones,
redis-benchmark's -n made smaller): redis-benchmark's default tests run through a plain
``livemig migrate`` with zero errors, and redis-cli answers at the same address afterwards."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livemig.testing.procs import free_tcp_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _service_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    tail = text[text.index("A guest that serves clients") :]
    block = tail[tail.index("```\n") + 4 :]
    block = block[: block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-tools not installed")
def test_readme_service_lines_work_as_written(tmp_path: Path) -> None:
    lines = _service_block()
    assert [ln.split()[:2] for ln in lines] == [
        ["livemig", "run"], ["livemig", "run"], ["redis-benchmark", "-p"],
        ["livemig", "migrate"], ["redis-cli", "-p"]]  # fmt: skip
    subst = {"7000": str(free_tcp_port()), "4445": str(free_tcp_port()),
             "/tmp/": f"{tmp_path}/", "-n 20000": "-n 1000"}  # fmt: skip
    for old, new in subst.items():
        lines = [ln.replace(old, new) for ln in lines]
    port = re.search(r"-p (\d+)", lines[2]).group(1)  # type: ignore[union-attr]

    def argv(line: str) -> list[str]:
        words = shlex.split(line)
        return [sys.executable, "-m", "livemig", *words[1:]] if words[0] == "livemig" else words

    procs = []
    try:
        for line in lines[:2]:
            procs.append(subprocess.Popen(argv(line), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))  # fmt: skip

        def ready() -> bool:
            p = subprocess.run(["redis-cli", "-p", port, "ping"], capture_output=True, text=True)
            return p.stdout.strip() == "PONG"

        wait_until(ready, 30, "kvserver answering redis-cli")
        wait_until(lambda: Path(f"{tmp_path}/kv-dst.sock").exists(), 30, "destination up")
        bench = subprocess.Popen(argv(lines[2]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)  # fmt: skip
        time.sleep(1.0)
        mig = subprocess.run(argv(lines[3]), capture_output=True, text=True, timeout=120)
        assert mig.returncode == 0, mig.stdout + mig.stderr
        assert bench.poll() is None, "redis-benchmark ended before the migration"
        out, _ = bench.communicate(timeout=200)
        assert bench.returncode == 0 and "error" not in out.lower(), out
        assert "MSET" in out and "LRANGE_600" in out, out
        cli = subprocess.run(argv(lines[4]), capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0 and cli.stdout.strip().isdigit(), cli.stdout + cli.stderr
        assert int(cli.stdout) > 0
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
