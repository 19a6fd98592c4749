"""The migration report: a timeline saved as JSON and drawn as PNG plots.

A report is assembled from what the two sides say (the source's ``x-query-migration-report``:
passes, phases, downtime breakdown; the final ``query-migrate`` of both sides) and from the
``query-migrate`` samples a driver took while the migration ran (cumulative and remaining bytes
over time). ``save`` writes ``NAME.json`` and ``NAME.png``; ``livemig report FILE.json`` draws
the PNG again from the JSON alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import livemig

SCHEMA = 1


class Sampler:
    """Collects ``query-migrate`` replies with their time, for the over-time plots."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []

    def __call__(self, info: dict[str, Any]) -> None:
        ram = info.get("ram", {})
        self.samples.append({
            "t": round(time.monotonic() - self.t0, 4),
            "status": info.get("status"),
            "transferred": ram.get("transferred", 0),
            "remaining": ram.get("remaining", 0),
            "mbps": ram.get("mbps", 0.0),
            "dirty-sync-count": ram.get("dirty-sync-count", 0),
            "dirty-pages-rate": ram.get("dirty-pages-rate", 0),
            "expected-downtime": info.get("expected-downtime"),
        })  # fmt: skip


def build(
    *,
    config: dict[str, Any],
    source_final: dict[str, Any],
    source_report: dict[str, Any] | None,
    destination_final: dict[str, Any] | None = None,
    samples: list[dict[str, Any]] | None = None,
    prediction: dict[str, Any] | None = None,
    verification: dict[str, Any] | None = None,
    sample_t0: float | None = None,
    destination_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One report dictionary (the JSON file's content)."""
    rep = source_report or {}
    phases = dict(rep.get("phases", {}))
    if sample_t0 is not None and "start-monotonic" in rep:
        # both processes read CLOCK_MONOTONIC: place the phases on the samples' time axis
        phases["_sample_offset"] = rep["start-monotonic"] - sample_t0
    return {
        "schema": SCHEMA,
        "livemig": livemig.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "query-migrate": source_final,
        "destination": destination_final or {},
        "passes": rep.get("passes", []),
        "phases": phases,
        "downtime-breakdown": _breakdown(rep, destination_final),
        "postcopy": (destination_report or {}).get("postcopy", rep.get("postcopy", {})),
        "samples": samples or [],
        "prediction": prediction,
        "verification": verification,
    }


def _breakdown(rep: dict[str, Any], dest: dict[str, Any] | None) -> dict[str, float]:
    """The source's downtime breakdown, with the destination's --verify hashing moved out of
    "resume" (the source waits for it inside that phase) into "verify-hashing"."""
    bd = dict(rep.get("downtime-breakdown", {}))
    hash_ms = (dest or {}).get("x-verify-ms")
    if hash_ms and "resume" in bd:
        moved = min(bd["resume"], hash_ms / 1000)
        bd["resume"] -= moved
        bd["verify-hashing"] = bd.get("verify-hashing", 0.0) + moved
    return bd


def prepare_stem(stem: Path, flag: str) -> None:
    """Make the directory ``save`` will write ``stem``'s files in, or refuse (``UsageError``
    naming ``flag``): done before a migration, since found at its end, a stem under a regular
    file ended a completed migration in a traceback."""
    from livemig.errors import UsageError

    stem = Path(stem)
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {stem}: cannot create {stem.parent}: {exc.strerror}") from None
    for path in (stem.with_suffix(".json"), stem.with_suffix(".png")):
        if path.is_dir():
            raise UsageError(f"{flag} {stem}: cannot create {path}: Is a directory")


def save(report: dict[str, Any], stem: Path) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.png``; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    jpath = stem.with_suffix(".json")
    jpath.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    ppath = stem.with_suffix(".png")
    plot(report, ppath)
    return jpath, ppath


def load(path: Path) -> dict[str, Any]:
    from livemig.errors import UsageError

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read report {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not a report: not UTF-8 text (byte {exc.start}); a "
                         "migration stream is read with livemig analyze") from exc  # fmt: skip
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not a report: JSON error at line {exc.lineno}: "
                         f"{exc.msg}") from exc  # fmt: skip
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UsageError(f"{path} is not a livemig report (schema {SCHEMA})")
    return data


def plotted_samples(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The samples the over-time panels draw: not those taken before the first pass counted
    anything (setup: "remaining" 0, nothing sent), which drew the remaining bytes rising from
    zero."""
    return [s for s in report.get("samples", [])
            if s.get("status") != "setup" and (s["transferred"] or s["remaining"])]  # fmt: skip


def plot(report: dict[str, Any], path: Path) -> None:
    """Four panels: per-pass dirty pages and bandwidth, cumulative bytes, remaining bytes,
    post-copy page-request latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    qm = report.get("query-migrate", {})
    cfg = report.get("config", {})
    title = (f"livemig: {cfg.get('guest', '?')} {cfg.get('memory', '')} "
             f"{cfg.get('smp', '')} vCPU, status {qm.get('status', '?')}, "
             f"total {qm.get('total-time', '?')} ms, downtime {qm.get('downtime', '?')} ms")  # fmt: skip
    fig.suptitle(title)

    ax = axes[0][0]
    passes = report.get("passes", [])
    if passes:
        xs = [p["number"] for p in passes]
        ax.bar(xs, [p["dirty_pages"] for p in passes], color="tab:orange", label="dirty pages")
        ax.set_xlabel("pass (dirty-bitmap sync)")
        ax.set_ylabel("dirty pages at sync")
        ax2 = ax.twinx()
        ax2.plot(xs, [p["bandwidth"] / 1e6 for p in passes], "o-", color="tab:blue",
                 label="bandwidth")  # fmt: skip
        ax2.set_ylabel("bandwidth of the pass (MB/s)")
        ax.set_xticks(xs)  # passes are whole numbers
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize="small")
    ax.set_title("dirty pages and bandwidth per pass")

    samples = plotted_samples(report)
    ts = [s["t"] for s in samples]
    ax = axes[0][1]
    ax.plot(ts, [s["transferred"] / 2**20 for s in samples], color="tab:green")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MiB sent")
    ax.set_title("cumulative bytes")
    _phase_spans(ax, report)

    ax = axes[1][0]
    ax.plot(ts, [s["remaining"] / 2**20 for s in samples], color="tab:red")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MiB still dirty")
    ax.set_title("remaining bytes")
    _phase_spans(ax, report)

    ax = axes[1][1]
    lat = report.get("postcopy", {}).get("latencies-ms", [])
    if lat:
        ax.hist(lat, bins=40, color="tab:purple")
        ax.set_xlabel("page request latency (ms)")
        ax.set_ylabel("requests")
    else:
        bd = report.get("downtime-breakdown", {})
        if bd:
            ax.bar(list(bd), [v * 1000 for v in bd.values()], color="tab:gray")
            ax.set_ylabel("ms")
        ax.text(0.5, 0.95, "no post-copy in this migration", transform=ax.transAxes,
                ha="center", va="top")  # fmt: skip
    ax.set_title("post-copy latency histogram" if lat else "downtime breakdown")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _phase_spans(ax: Any, report: dict[str, Any]) -> None:
    colors = {"setup": "#dddddd", "precopy": "#e8f4e8", "stop-and-copy": "#f8dddd",
              "postcopy": "#e8e0f4"}  # fmt: skip
    offset = report.get("phases", {}).get("_sample_offset", 0.0)
    for name, span in report.get("phases", {}).items():
        if name.startswith("_") or not span:
            continue
        ax.axvspan(span[0] + offset, span[1] + offset, color=colors.get(name, "#eeeeee"),
                   alpha=0.6, label=name)  # fmt: skip
    if report.get("phases"):
        ax.legend(loc="best", fontsize="small")
