"""The README's Python example, run as written against real processes (the socket paths and
the port swapped for the harness's): it migrates, and says the RAM is identical."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from livemig.testing.procs import ProcHarness

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "one Python example in the README"
    return blocks[0]


def test_the_readme_example_migrates(
    harness: ProcHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    src = harness.source(append="ws=8M rate=5000")
    dst = harness.destination(incoming="defer")
    code = _example()
    for old, new in (("unix:/tmp/src.sock", src.qmp_uri), ("unix:/tmp/dst.sock", dst.qmp_uri),
                     ("tcp:127.0.0.1:4444", f"unix:{harness.path('mig.sock')}")):  # fmt: skip
        assert old in code
        code = code.replace(old, new)
    exec(compile(code, str(README), "exec"), {})  # the README's own code
    out = capsys.readouterr().out
    assert re.search(r"^\d+ ms downtime, RAM identical: True$", out, re.M), out
    assert out.splitlines()[-2].startswith("completed")
