"""``livemig bench memtrack`` on a small region: figures present, sane, and the CLI wiring."""

from __future__ import annotations

import json

import pytest

from livemig.bench.memtrack import measure
from livemig.cli import main
from livemig.errors import UsageError
from livemig.memtrack import available_backends


def test_measure_reports_every_backend() -> None:
    backends = available_backends()
    results = measure(1 << 20, backends, repeat=1)
    assert results["pages"] == 256
    assert list(results["backends"]) == backends
    for figures in results["backends"].values():
        assert figures["clean_sync_s"] > 0 and figures["dirty_sync_s"] > 0
        assert figures["write_untracked_s"] > 0
        assert figures["write_ratio"] == pytest.approx(
            figures["write_tracked_s"] / figures["write_untracked_s"]
        )


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["bench", "memtrack", "--size", "1M", "--repeat", "1", "--backend", "shadow", "--json"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["backends"]) == ["shadow"]


def test_bad_size_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="multiple of 4096"):
        measure(5000, ["shadow"], repeat=1)
