"""The report's figures: remaining bytes do not start at a made-up zero, and the destination's
--verify hashing leaves "resume" for its own "verify-hashing" entry."""

from __future__ import annotations

from livemig.report.timeline import build, plotted_samples


def test_setup_samples_are_not_drawn() -> None:
    samples = [{"t": 0.0, "status": "setup", "transferred": 0, "remaining": 0},
               {"t": 0.1, "status": "active", "transferred": 0, "remaining": 0},
               {"t": 0.2, "status": "active", "transferred": 5, "remaining": 900}]  # fmt: skip
    assert [s["t"] for s in plotted_samples({"samples": samples})] == [0.2]


def test_destination_hashing_moves_out_of_resume() -> None:
    rep = {"downtime-breakdown": {"final-ram": 0.001, "device-state": 0.002,
                                  "verify-hashing": 0.004, "resume": 0.005}}  # fmt: skip
    r = build(
        config={},
        source_final={},
        source_report=rep,
        destination_final={"x-verify": {"equal": True}, "x-verify-ms": 3.0},
    )
    bd = r["downtime-breakdown"]
    assert round(bd["resume"], 6) == 0.002 and round(bd["verify-hashing"], 6) == 0.007
