"""The convergence planner: will pre-copy converge, how long will it take, and what to use.

Model (the same iteration the source runs, with its constants): pass 0 sends every populated
byte ``M`` at link bandwidth ``B``; while a pass of duration ``t`` runs, the guest dirties
``min(W, D x t)`` distinct bytes (``D`` its dirty rate, ``W`` its writable working set: a
sweeping guest cannot dirty more than it touches), which the next pass sends. Pre-copy switches
over once what is left fits in ``B x downtime-limit``. It converges when ``D < B`` or when the
working set itself fits the threshold; otherwise the remainder never shrinks below the
threshold and pre-copy runs until cancelled (QEMU's behaviour). Refining passes
(``x-switchover-refine``) are modelled as the source runs them. Auto-converge scales ``D`` down
by the throttle (``cpu-throttle-initial``, ``+increment`` per two high periods, capped at
``max-cpu-throttle``); post-copy bounds the blackout by the device state whatever ``D`` is.

``ProgressJudge`` turns the ``query-migrate`` samples of a running migration into a verdict
(converging, stalled, diverging) and an ETA that never moves backwards in its count-down.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from livemig.migration.convergence import SwitchoverRefiner

WINDOW = 0.1  # the rate limiter's window: one PART per window
DEVICE_STATE_S = 0.01  # fixed part of the blackout: device sections, resume (measured: ~10 ms)
STALL_TOLERANCE = 0.10  # remaining bytes within 10% of the previous pass: not shrinking


@dataclass
class Prediction:
    """What the planner expects, and why. ``converges`` is about pre-copy alone; ``passes``,
    ``total_time_s`` and ``downtime_s`` forecast the recommended strategy, so the two never
    disagree (pre-copy alone may never converge where auto-converge does)."""

    converges: bool
    passes: int
    total_time_s: float | None
    downtime_s: float | None
    recommendation: str
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)
    pass_bytes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate(populated: int, working_set: int, dirty_rate: float, bandwidth: float,
             downtime_limit_ms: int, stop_bandwidth: float | None = None,
             max_time: float = 3600.0,
             refine: int = SwitchoverRefiner.DEFAULT_PASSES) -> tuple[bool, list[int], float, float]:  # fmt: skip
    """Run the source's loop in 100 ms steps; returns (converges, bytes found dirty at each
    sync, total s, downtime s).

    Mirrors ``OutgoingMigration._iterate``: send one rate window of dirty pages; when what is
    left fits the threshold, sync (what the guest dirtied since the last sync joins it); if it
    still fits, stop and send the rest at ``stop_bandwidth`` (no rate limit in the blackout),
    unless the ``SwitchoverRefiner`` (``refine`` = ``x-switchover-refine``) asks for one more
    pass, which sends all that is left before the next sync.
    """
    if bandwidth <= 0:
        return False, [], float("inf"), float("inf")
    stop_bw = max(bandwidth, stop_bandwidth or bandwidth)
    threshold = bandwidth * downtime_limit_ms / 1000
    refiner = SwitchoverRefiner(refine)
    refining = False
    remaining = float(populated)
    found = [populated]
    t = since_sync = 0.0
    best = float("inf")
    stuck = 0
    while t < max_time:
        # as QEMU's, the threshold is 0 until the first bandwidth window has closed
        due = remaining <= 0 if refining else t >= WINDOW and remaining <= threshold
        if due:
            dirtied = min(working_set, dirty_rate * since_sync)
            rate = dirtied / since_sync if since_sync > 0 else 0.0
            remaining += dirtied
            since_sync = 0.0
            found.append(int(remaining))
            refining = False
            if remaining <= threshold:
                if refiner.another_pass(int(remaining), rate, bandwidth):
                    refining = True
                    continue
                downtime = remaining / stop_bw + DEVICE_STATE_S
                return True, found, t + downtime, downtime
            # a sync that leaves as much as the best one so far, again and again: never fits
            stuck = stuck + 1 if remaining >= best * (1 - STALL_TOLERANCE) else 0
            best = min(best, remaining)
            if stuck >= 50:
                break
        # one PART per rate window, as the source sends them
        dt = WINDOW if remaining > bandwidth * WINDOW else max(remaining / bandwidth, 1e-3)
        remaining = max(0.0, remaining - bandwidth * dt)
        t += dt
        since_sync += dt
    return False, found, float("inf"), float("inf")


def predict(
    *,
    populated: int,
    working_set: int,
    dirty_rate: float,
    bandwidth: float,
    downtime_limit_ms: int = 300,
    params: dict[str, Any] | None = None,
    stop_bandwidth: float | None = None,
) -> Prediction:
    """Predict a pre-copy migration and recommend a strategy."""
    inputs = {"populated-bytes": populated, "working-set-bytes": working_set,
              "dirty-rate-bytes-per-s": dirty_rate, "bandwidth-bytes-per-s": bandwidth,
              "downtime-limit-ms": downtime_limit_ms}  # fmt: skip
    refine = (params or {}).get("x-switchover-refine", SwitchoverRefiner.DEFAULT_PASSES)
    ok, passes, total, down = simulate(populated, working_set, dirty_rate, bandwidth,
                                       downtime_limit_ms, stop_bandwidth, refine=refine)  # fmt: skip
    if ok:
        return Prediction(True, len(passes), total, down, "pre-copy",
                          f"the guest dirties {_mb(dirty_rate)}/s, the link carries "
                          f"{_mb(bandwidth)}/s: each pass is shorter than the last",
                          inputs, passes)  # fmt: skip
    p = params or {}
    cap = p.get("max-cpu-throttle", 99)
    throttled = dirty_rate * (1 - cap / 100)
    ok2, passes2, total2, down2 = simulate(populated, working_set, throttled, bandwidth,
                                           downtime_limit_ms, stop_bandwidth,
                                           refine=refine)  # fmt: skip
    if ok2 and throttled < bandwidth * 0.5:
        return Prediction(False, len(passes2), total2, down2, "auto-converge",
                          f"pre-copy alone never fits the {downtime_limit_ms} ms limit "
                          f"({_mb(dirty_rate)}/s dirtied vs {_mb(bandwidth)}/s); throttling "
                          f"the vCPUs (up to {cap}%) brings the rate under the link",
                          inputs, passes2)  # fmt: skip
    pc_total = populated / bandwidth + working_set / bandwidth
    return Prediction(False, len(passes), pc_total, DEVICE_STATE_S, "post-copy",
                      f"the working set ({_mb(working_set)}) is dirtied faster "
                      f"({_mb(dirty_rate)}/s) than the link carries it ({_mb(bandwidth)}/s): "
                      "move the guest first and its memory after", inputs, passes)  # fmt: skip


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


class ProgressJudge:
    """Verdict and count-down from ``query-migrate`` samples of a running migration."""

    def __init__(self) -> None:
        self.verdict = "starting"
        self._pass_remaining: dict[int, int] = {}
        self._eta_left: float | None = None
        self._last_t: float | None = None

    def update(self, t: float, info: dict[str, Any]) -> tuple[str, float | None]:
        """Feed one sample (time in s); returns (verdict, seconds left or None). The verdict
        fits the phase: "first pass" only in the first pass, no trend until three passes are
        known ("" then), and in post-copy the pull of what is left, with no downtime ahead."""
        ram = info.get("ram", {})
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            self.verdict = status
            return self.verdict, 0.0
        if status in ("setup", "none", None):
            self.verdict = ""  # nothing measured yet: no verdict, no count-down to keep
            return self.verdict, None
        if str(status).startswith("postcopy"):
            self.verdict = "guest on the destination, pulling the rest"
            bw = ram.get("mbps", 0) * 1e6 / 8
            left = ram.get("remaining", 0) / bw if bw > 0 else None
            self._eta_left, self._last_t = left, t
            return self.verdict, left
        passes = ram.get("dirty-sync-count", 0)
        remaining = ram.get("remaining", 0)
        if passes not in self._pass_remaining:
            self._pass_remaining[passes] = remaining
        seq = [self._pass_remaining[k] for k in sorted(self._pass_remaining)][1:]
        if len(seq) >= 3:
            a, b, c = seq[-3:]
            if c < b * (1 - STALL_TOLERANCE) and b <= a:
                self.verdict = "converging"
            elif c > b * (1 + STALL_TOLERANCE) and b > a * (1 + STALL_TOLERANCE):
                self.verdict = "diverging"
            elif abs(c - b) <= b * STALL_TOLERANCE:
                self.verdict = "stalled"
            else:
                self.verdict = ""  # no clear trend
        elif passes <= 1:
            self.verdict = "first pass"
        else:
            self.verdict = ""  # a trend needs three passes
        left = self._estimate(ram, info)
        if left is not None and self._eta_left is not None and self._last_t is not None:
            # a count-down only counts down: never show more time left than before
            left = min(left, max(0.0, self._eta_left - (t - self._last_t)))
        if self.verdict in ("stalled", "diverging") or status != "active":
            left = None
        self._eta_left, self._last_t = left, t
        return self.verdict, left

    @staticmethod
    def _estimate(ram: dict[str, Any], info: dict[str, Any]) -> float | None:
        bw = ram.get("mbps", 0) * 1e6 / 8
        dirty = ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096)
        if bw <= 0:
            return None
        drain = bw - dirty
        if drain <= 0:
            return None
        return ram.get("remaining", 0) / drain + info.get("expected-downtime", 0) / 1000
