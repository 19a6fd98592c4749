"""``livemig.control.demo`` from Python: the demo's steps with two real ``livemig run``
processes, the migration completed, verified and its memstress invariant holding on the
destination, the report written; options that do not fit refused before any process."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from livemig.control.demo import Demo, DemoOptions
from livemig.errors import UsageError


def test_the_demo_steps_migrate_check_and_report(tmp_path: Path) -> None:
    opts = DemoOptions(memory="64M", working_set="8M", dirty_rate="4M", multifd=2,
                       out=tmp_path / "report")  # fmt: skip
    seen: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        demo = Demo(opts, stack, tmp_path)
        assert demo.start_hosts() is None
        demo.start()
        dcaps = {c["capability"]: c["state"] for c in demo.dst.qmp("query-migrate-capabilities")}
        assert dcaps["multifd"] and dcaps["x-checksums"]  # set there before migrate-incoming
        demo.configure()
        assert demo.caps["x-verify"] and demo.caps["multifd"]
        assert demo.params == {"multifd-channels": 2}
        final = demo.migrate(seen.append)
        result = demo.result(final)
        assert final["status"] == "completed" and final.get("x-verified") is True
        assert seen and seen[-1]["status"] == "completed"
        assert result.destination.get("status") == "completed"
        demo.check_invariant(result)
        assert result.invariant is not None and result.invariant["ok"], result.invariant
        assert demo.dst.qmp("query-status")["status"] == "running"  # cont after the check
        demo.report(result)
    assert result.ok and result.report_paths is not None
    jpath, ppath = result.report_paths
    assert ppath.exists()
    assert json.loads(jpath.read_text())["verification"]["invariant"]["ok"] is True


@pytest.mark.parametrize(("opts", "words"), [
    (DemoOptions(memory="64M", working_set="48M"), "must be at most half of --memory"),
    (DemoOptions(smp=0), "--smp must be at least 1"),
    (DemoOptions(multifd=256), "--multifd takes 1 to 255 channels"),
])  # fmt: skip
def test_options_that_do_not_fit(opts: DemoOptions, words: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack, pytest.raises(UsageError, match=words):
        Demo(opts, stack, tmp_path)


def test_post_copy_demo_defaults_to_a_guest_that_outruns_the_link() -> None:
    opts = DemoOptions(postcopy=True)
    opts.check()
    assert opts.dirty_rate == "0"
    assert DemoOptions().check() == 64 << 20 and DemoOptions(dirty_rate=None).dirty_rate is None
