"""Tests of ``livemig bench matrix``: strategy parsing, the summaries and the table on synthetic
runs, a tiny matrix end to end between real ``livemig run`` processes (no QEMU), a migration cut
at its limit, and (opt-in, ``LIVEMIG_BENCH_QEMU=1``: it downloads a Debian kernel) one scenario
on QEMU 7.2 beside livemig."""

from __future__ import annotations

import argparse
import json
import os
import time

import pytest

from livemig.bench import matrix
from livemig.bench.qemu_baseline import qemu_available
from livemig.errors import UsageError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    matrix.register(parser.add_subparsers())
    return parser.parse_args(["matrix", *argv])


def test_parse_strategy() -> None:
    assert matrix.parse_strategy("precopy").caps == {}
    ac = matrix.parse_strategy("autoconverge")
    assert ac.caps == {"auto-converge": True} and ac.dest_caps == {}
    pc = matrix.parse_strategy("postcopy")
    assert pc.postcopy and pc.caps == {"postcopy-ram": True}
    assert pc.dest_caps == {"postcopy-ram": True, "postcopy-blocktime": True}
    mf = matrix.parse_strategy("multifd4")
    assert mf.caps == mf.dest_caps == {"multifd": True}
    assert mf.params == {"multifd-channels": 4, "multifd-compression": "none"}
    assert matrix.parse_strategy("multifd2-zstd").params["multifd-compression"] == "zstd"
    for bad in ("multifd", "multifd0", "multifd4-lz4", "xbzrle2", "postcopy "):
        with pytest.raises(UsageError):
            matrix.parse_strategy(bad)


def test_config_from_args() -> None:
    cfg = matrix.config_from_args(_args("--sizes", "32M,1G", "--rates", "0,max,50",
                                        "--strategies", "precopy,multifd2", "--repeat", "2"))  # fmt: skip
    assert cfg.sizes == [32 << 20, 1 << 30] and cfg.rates == [0, "max", 50]
    assert cfg.strategies == ["precopy", "multifd2"] and cfg.repeat == 2 and cfg.verify
    assert len(matrix.scenarios(cfg)) == 2 * 3 * 2
    default = matrix.config_from_args(_args())
    assert default.strategies == ["precopy", "autoconverge", "postcopy", "multifd4"]
    assert not default.vs_qemu and default.bandwidth == 128 << 20
    with pytest.raises(UsageError):
        matrix.config_from_args(_args("--strategies", "precopy,teleport"))
    with pytest.raises(UsageError):
        matrix.config_from_args(_args("--repeat", "0"))
    with pytest.raises(UsageError):
        matrix.config_from_args(_args("--limit-seconds", "0"))
    with pytest.raises(SystemExit):  # argparse refuses a negative rate
        _args("--rates", "-5")
    # one name per concept: parameters as livemig migrate names them
    set_ = matrix.config_from_args(_args("--set", "max-bandwidth=1G", "--set", "downtime-limit=50"))
    assert (set_.bandwidth, set_.downtime_limit) == (1 << 30, 50)
    with pytest.raises(UsageError, match="not x-dirty-tracker"):
        matrix.config_from_args(_args("--set", "x-dirty-tracker=shadow"))


def test_avail_switchover_bandwidth_goes_to_both_vms_only_when_set() -> None:
    # QEMU before 8.2 refuses a parameter it does not know: unset, it is not sent at all
    assert "avail-switchover-bandwidth" not in matrix.migration_params(matrix.Config())
    cfg = matrix.config_from_args(_args("--set", "avail-switchover-bandwidth=1G"))
    assert matrix.migration_params(cfg) == {"max-bandwidth": 128 << 20, "downtime-limit": 300,
                                            "avail-switchover-bandwidth": 1 << 30}  # fmt: skip
    # the limit's reason no longer blames max-bandwidth x downtime-limit: it is not the bar
    s = {"completed": 0, "runs": 1,
         "at_limit": {"dirty_mib_s": 200.0, "sent_mib_s": 128.0, "remaining": None}}  # fmt: skip
    runs = [matrix.RunFigures(outcome="limit")]
    strategy = matrix.parse_strategy("precopy")
    assert "max-bandwidth x downtime-limit" in matrix.why_not_converged(
        s, runs, matrix.Config(), strategy)  # fmt: skip
    assert "max-bandwidth x downtime-limit" not in matrix.why_not_converged(s, runs, cfg, strategy)


def test_ws_of_is_a_whole_mib_share() -> None:
    cfg = matrix.Config()
    assert matrix.ws_of(cfg, 256 << 20) == 64 << 20
    assert matrix.ws_of(cfg, 3 << 20) == 1 << 20  # never below 1 MiB


def test_summary_and_table_on_synthetic_runs() -> None:
    runs = [
        matrix.RunFigures(outcome="completed", status="completed", total_ms=100, downtime_ms=10,
                          transferred=3 << 20, passes=3, throttle_pct=0, verified=True,
                          guest_ok=True),
        matrix.RunFigures(outcome="completed", status="completed", total_ms=300, downtime_ms=30,
                          transferred=5 << 20, passes=5, throttle_pct=20, verified=True,
                          guest_ok=True),
        matrix.RunFigures(outcome="limit", status="cancelled", transferred=9 << 20, passes=40,
                          dirty_mib_s=180.5),
    ]  # fmt: skip
    runs[1].throttle_steps = [[2.3, 20]]
    runs[2].throttle_steps = [[2.2, 20], [4.4, 30]]
    s = matrix.summarize_runs(runs)
    assert s["runs"] == 3 and s["completed"] == 2 and s["outcomes"] == ["completed", "limit"]
    # the throttle's timeline reaches the scenario's summary, for the cut runs too
    assert s["throttle_steps"] == [None, [[2.3, 20]], [[2.2, 20], [4.4, 30]]]
    assert s["total_ms"] == 200 and s["passes"] == 4 and s["verified"] is True
    assert s["at_limit"]["passes"] == 40
    cut = matrix.summarize_runs(runs[2:])
    assert cut["total_ms"] is None and cut["verified"] is None
    result = {
        "date": "now", "config": vars(matrix.Config()),
        "scenarios": [{"size": 1 << 30, "rate_mib_s": 50, "strategy": "precopy",
                       "livemig": s, "qemu": cut}],
    }  # fmt: skip
    head, rows = matrix.table_rows(result)
    row = dict(zip(head, rows[0], strict=True))
    assert row["done"] == "2/3 (limit) / 0/1 (limit)"
    assert row["total s"] == "0.20 / -"
    assert row["passes"] == "4 / (40)"  # the QEMU run shows where it stood when cut
    assert row["dirtied MiB/s"] == "(180) / (180)"  # what the guest really wrote, when cut
    assert row["verified"] == "yes / n/a"
    matrix.render(result)


@pytest.mark.timeout(60)
def test_tiny_matrix_end_to_end(tmp_path) -> None:
    """Two scenarios on 48 MiB guests between real processes: completed, verified, every field."""
    out = tmp_path / "m.json"
    args = _args("--sizes", "48M", "--rates", "20", "--strategies", "precopy,postcopy",
                 "--limit-seconds", "20", "--json", str(out))  # fmt: skip
    t0 = time.monotonic()
    assert matrix.main(args) == 0
    assert time.monotonic() - t0 < 30
    result = json.loads(out.read_text())
    assert result["fields"] == list(matrix.FIELDS)
    assert result["machine"]["cpus"] >= 1 and result["qemu"] is None
    assert [sc["strategy"] for sc in result["scenarios"]] == ["precopy", "postcopy"]
    for sc in result["scenarios"]:
        assert sc["size"] == 48 << 20 and sc["rate_mib_s"] == 20 and sc["ws"] == 12 << 20
        assert "qemu" not in sc
        (run,) = sc["livemig_runs"]
        assert set(matrix.FIELDS) <= set(run), set(matrix.FIELDS) - set(run)
        assert run["outcome"] == "completed", run["notes"]
        assert run["verified"] is True and run["guest_ok"] is True
        assert run["total_ms"] > 0 and run["downtime_ms"] is not None
        assert run["blackout_ms"] is not None and run["blackout_ms"] >= 0
        assert run["transferred"] > 12 << 20 and run["passes"] >= 1
        assert run["src_rss"] > 0 and run["dst_rss"] > 48 << 20  # the destination pre-faults
        # every sync, from the setup's on (MIGRATION_PASS, capability events): its cadence
        syncs = run["sync_times"]
        assert syncs and len(syncs) == run["passes"] and syncs == sorted(syncs), run
        assert -0.5 < syncs[0] < 5 and syncs[-1] * 1000 < run["total_ms"] + 500, run
        summary = sc["livemig"]
        assert summary["completed"] == 1 and summary["total_ms"] == run["total_ms"]
        assert summary["throttle_steps"] == [None]  # one per run, completed or not
    pc = result["scenarios"][1]["livemig_runs"][0]
    if pc["postcopy_bytes"]:
        assert pc["postcopy_requests"] is not None and pc["blocktime_ms"] is not None
    else:  # this small guest converged before migrate-start-postcopy arrived (rare)
        assert "pre-copy converged before the switch to post-copy" in pc["notes"]
    assert result["scenarios"][0]["livemig_runs"][0]["postcopy_requests"] is None


@pytest.mark.timeout(60)
def test_scenario_cut_at_the_limit() -> None:
    """A flat-out guest at 8 MiB/s cannot converge: cancelled at the limit, never a hang."""
    cfg = matrix.Config(sizes=[32 << 20], rates=["max"], strategies=["precopy"],
                        limit_seconds=3.0, bandwidth=8 << 20, downtime_limit=1)  # fmt: skip
    t0 = time.monotonic()
    fig = matrix.run_livemig(cfg, 32 << 20, "max", matrix.parse_strategy("precopy"))
    assert time.monotonic() - t0 < 40
    assert fig.outcome == "limit" and fig.status == "cancelled", fig  # whole record: diagnosable
    assert fig.transferred and fig.transferred > 0 and fig.total_ms is None
    assert any("cancelled" in n for n in fig.notes)
    # the rate it was sent at, averaged up to the cancel: within max-bandwidth (8 MiB/s)
    assert fig.sent_mib_s is not None and 4 <= fig.sent_mib_s <= 8.5, fig
    if fig.passes and fig.passes >= 4:  # a dirty rate is known from the first sync after 1 s
        # the whole 8 MiB working set is dirty at every sync of a flat-out guest
        assert fig.dirty_mib_s is not None and fig.dirty_mib_s >= 4, fig


@pytest.mark.qemu
@pytest.mark.skipif(not os.environ.get("LIVEMIG_BENCH_QEMU"), reason="set LIVEMIG_BENCH_QEMU=1: "
                    "downloads a Debian kernel with apt-get")  # fmt: skip
@pytest.mark.skipif(not qemu_available(), reason="no QEMU")
@pytest.mark.timeout(300)
def test_vs_qemu_one_scenario() -> None:
    cfg = matrix.Config(sizes=[256 << 20], rates=[20], strategies=["postcopy"],
                        limit_seconds=60, vs_qemu=True)  # fmt: skip
    result = matrix.run_matrix(cfg)
    (sc,) = result["scenarios"]
    assert result["qemu"] and "QEMU" in result["qemu"]
    (qrun,) = sc["qemu_runs"]
    assert qrun["outcome"] == "completed" and qrun["guest_ok"] is True, qrun["notes"]
    assert qrun["verified"] is None and qrun["postcopy_switched"] is not None
    assert qrun["transferred"] > 5 << 20
    head, rows = matrix.table_rows(result)
    assert " / " in dict(zip(head, rows[0], strict=True))["total s"]


def test_why_a_cell_did_not_converge() -> None:
    """A cell cut at the limit says why: dirty rate against the bandwidth, throttle, leftover."""
    cfg = matrix.Config()
    cut = matrix.RunFigures(outcome="limit", status="cancelled", passes=88, throttle_pct=90,
                            dirty_mib_s=126.0, remaining=40 << 20, sent_mib_s=127.5,
                            throttle_steps=[[2.3, 20], [4.4, 30], [17.94, 90]])  # fmt: skip
    s = matrix.summarize_runs([cut])
    why = matrix.why_not_converged(s, [cut], cfg, matrix.parse_strategy("autoconverge"))
    assert why is not None
    assert "not converged in 30 s" in why
    assert "dirtied 126 MiB/s of distinct pages against max-bandwidth 128 MiB/s" in why
    assert "no pass ends with at most 38 MiB" in why
    assert "throttle reached 90 % at 17.9 s" in why and "40 MiB still dirty" in why
    plain = matrix.why_not_converged(s, [cut], cfg, matrix.parse_strategy("precopy"))
    assert plain is not None and "throttle" not in plain
    done = matrix.RunFigures(outcome="completed", status="completed", total_ms=5)
    assert matrix.why_not_converged(matrix.summarize_runs([done]), [done], cfg,
                                    matrix.parse_strategy("precopy")) is None  # fmt: skip
    result = {"qemu": "QEMU 10.0.2", "scenarios": [
        {"size": 256 << 20, "rate_mib_s": 200, "strategy": "autoconverge",
         "livemig": {**s, "why": why}, "qemu": {"why": None}}]}  # fmt: skip
    (line,) = matrix.why_lines(result)
    assert line.startswith("256.0 MiB 200 MiB/s autoconverge, livemig: not converged")


def test_return_path_on_both_sides_by_default() -> None:
    assert matrix.config_from_args(_args()).return_path is True
    off = matrix.config_from_args(_args("--no-return-path", "--no-verify"))
    assert off.return_path is False
    with pytest.raises(UsageError, match="needs --no-verify"):
        matrix.config_from_args(_args("--no-return-path"))


def test_default_limit_leaves_qemus_auto_converge_room_to_reach_its_cap() -> None:
    """QEMU's defaults climb 20, 30, ... 90, 99: 9 raises x 2 periods of >= 1 s, 18 s at least;
    the default limit must leave that and the last passes."""
    cfg = matrix.config_from_args(_args())
    raises = 1 + -(-(99 - 20) // 10)  # initial, then +10 until capped at 99
    assert raises == 9
    assert cfg.limit_seconds >= raises * 2 * 1.0 * 1.5
    assert matrix.config_from_args(_args("--limit-seconds", "20")).limit_seconds == 20


def test_match_rates_needs_vs_qemu() -> None:
    assert matrix.config_from_args(_args("--vs-qemu", "--match-rates")).match_rates
    assert not matrix.config_from_args(_args("--vs-qemu")).match_rates
    with pytest.raises(UsageError, match="--match-rates needs --vs-qemu"):
        matrix.config_from_args(_args("--match-rates"))


def _cell(lm_rate: float | None, qm_rate: float | None, *, cut: bool = False,
          rate: int | str = 200) -> dict:  # fmt: skip
    def side(r: float | None) -> dict:
        fig = matrix.RunFigures(outcome="limit" if cut else "completed", dirty_mib_s=r,
                                total_ms=None if cut else 1000)  # fmt: skip
        return matrix.summarize_runs([fig])

    return {"size": 256 << 20, "rate_mib_s": rate, "strategy": "multifd4",
            "livemig": side(lm_rate), "qemu": side(qm_rate)}  # fmt: skip


def test_rate_mismatch_names_the_faster_guest() -> None:
    assert matrix.rate_mismatch(_cell(128, 72)) == ("livemig", 128, "qemu", 72)
    assert matrix.rate_mismatch(_cell(60, 128, cut=True)) == ("qemu", 128, "livemig", 60)
    assert matrix.rate_mismatch(_cell(128, 120)) is None  # comparable (within 15 %)
    assert matrix.rate_mismatch(_cell(128, None)) is None  # QEMU measured nothing
    assert matrix.rate_mismatch(_cell(None, None, rate=0)) is None  # idle
    no_qemu = _cell(128, 72)
    del no_qemu["qemu"]
    assert matrix.rate_mismatch(no_qemu) is None


def test_match_rates_reruns_the_faster_guest_at_the_slower_ones_rate(monkeypatch) -> None:
    """run_matrix with --match-rates: the cell whose guests differ gets a matched run of the
    faster VM at the slower one's measured rate (rounded MiB/s), shown as a row of its own; a
    comparable cell gets none. The VMs are stand-ins that dirty min(asked, cap) MiB/s."""
    from livemig.bench import qemu_baseline

    asked: list[tuple[str, int | str]] = []

    def vm(name: str, cap: float) -> object:
        def run(cfg, size, rate, strategy):
            asked.append((name, rate))
            return matrix.RunFigures(outcome="completed", status="completed", total_ms=1000,
                                     downtime_ms=10, dirty_mib_s=min(float(rate), cap))  # fmt: skip

        return run

    monkeypatch.setattr(matrix, "run_livemig", vm("livemig", 1e9))
    monkeypatch.setattr(matrix, "run_qemu", vm("qemu", 72.4))  # QEMU's guest tops out at 72
    monkeypatch.setattr(qemu_baseline, "qemu_available", lambda: True)
    monkeypatch.setattr(qemu_baseline, "fetch_kernel", lambda: None)
    monkeypatch.setattr(qemu_baseline, "build_initramfs", lambda: None)
    monkeypatch.setattr(qemu_baseline, "qemu_label", lambda: "QEMU 10.0.2")
    cfg = matrix.Config(rates=[50, 200], strategies=["multifd4"], vs_qemu=True,
                        match_rates=True)  # fmt: skip
    result = matrix.run_matrix(cfg)
    assert asked == [("livemig", 50), ("qemu", 50), ("livemig", 200), ("qemu", 200),
                     ("livemig", 72)]  # fmt: skip
    at50, at200 = result["scenarios"]
    assert "matched" not in at50 and matrix.like_for_like_note(at50, "QEMU") is None
    assert at200["matched"] == {"vm": "livemig", "rate_mib_s": 72}
    assert at200["livemig_matched"]["dirty_mib_s"] == 72
    assert len(at200["livemig_matched_runs"]) == 1
    head, rows = matrix.table_rows(result)
    assert [r[1] for r in rows] == ["50", "200", "72 (matched)"]
    matrix.render(result)
    matched = dict(zip(head, rows[2], strict=True))
    assert matched["dirtied MiB/s"] == "72 / 72"  # like for like
    lines = matrix.why_lines(result)
    (note,) = [ln for ln in lines if "not like for like" in ln]
    assert "QEMU 10.0.2's guest dirtied 72 MiB/s, livemig's 200 MiB/s (asked 200)" in note
    assert "matched row: livemig asked 72 MiB/s, dirtied 72 MiB/s" in note
    # a matched run that completed before its first 1 s period measured no rate: said so
    at200["livemig_matched"]["dirty_mib_s"] = None
    assert "its rate not measured" in matrix.like_for_like_note(at200, "QEMU")
    json.dumps(result, default=str)  # the JSON carries it
    cfg.match_rates = False  # without the option: the note says what it would do
    plain = matrix.run_matrix(cfg)
    assert "matched" not in plain["scenarios"][1]
    (note,) = [ln for ln in matrix.why_lines(plain) if "not like for like" in ln]
    assert "--match-rates re-runs it" in note
