"""A destination that cannot take the guest refuses it at setup, before RAM is sent, and the
source says why (``livemig migrate`` prints it): a vCPU-count mismatch used to show only after
the whole RAM copy, as "(SHUT 1)" or "Broken pipe"."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from livemig.testing.procs import ProcHarness


@pytest.mark.timeout(90)
def test_vcpu_mismatch_refused_before_ram_with_the_reason_at_the_source(
    harness: ProcHarness,
) -> None:
    src = harness.source(append="ws=32M rate=20000", smp=2)
    dst = harness.destination(smp=1)
    src.wait_passes_increase(0)
    out = subprocess.run(
        [sys.executable, "-m", "livemig", "migrate", "--qmp", src.qmp_uri, dst.incoming or "",
         "--timeout", "60"], capture_output=True, text=True, timeout=90,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert out.returncode == 1
    text = " ".join(out.stdout.split())
    assert "destination refused: machine mismatch: the source has 2 vCPUs, this machine 1 " \
           "(start the destination with --smp 2)" in text, text  # fmt: skip
    offset = int(re.search(r"at stream offset (\d+)", text).group(1))  # type: ignore[union-attr]
    assert offset < 4096, "refused only after RAM pages"
    src.wait_status("running", timeout=10)
