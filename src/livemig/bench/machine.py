"""``livemig bench machine``: how fast the emulated machine runs a page-writing guest.

The guest is a built-in sweeper (below, pre-assembled, so the benchmark needs no compiler): each
vCPU walks its own slice of RAM forever, incrementing the first 64-bit word of every page. One
increment is one *page-writing operation*, so the sum of all counters is the work done, read
from the host with numpy while the machine is paused. Figures are printed as ratios to a
baseline measured in the same run (1 vCPU, never paused), since the machine is shared and
noisy:

- operations per second per vCPU with 1 and with 2 vCPUs;
- the slowdown when the machine is paused and resumed 10 times a second, and the time a pause
  takes (request to every vCPU parked at an instruction boundary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from livemig.errors import MachineError
from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.abi import PAGE_SIZE

# Sweeper guest, AT&T syntax, linked at LOAD_ADDR; its last 16 bytes are the parameters
# (working-set start, slice bytes), patched in by ``sweeper_image``:
#
#     lea params(%rip), %rax;  mov (%rax), %rbx;  mov 8(%rax), %rcx
#     mov %rdi, %rdx;  imul %rcx, %rdx;  add %rdx, %rbx;  lea (%rbx,%rcx), %rsi
#  1: mov %rbx, %rdx
#  2: incq (%rdx);  add $4096, %rdx;  cmp %rsi, %rdx;  jb 2b;  jmp 1b
#     .balign 8;  params: .quad 0, 0
_SWEEPER_CODE = bytes.fromhex(  # 48 bytes: params start at 0x30, as the lea says
    "488d0529000000488b18488b48084889fa480fafd14801d3488d340b4889"
    "da48ff024881c2001000004839f272f1ebec"
)
WS_START = 4 << 20  # above the image and the stacks
SLICE_BYTES = 8 << 20  # 2048 pages per vCPU: well beyond unicorn's TLB, like a real sweep


def sweeper_image(ws_start: int = WS_START, slice_bytes: int = SLICE_BYTES) -> bytes:
    """The sweeper with its parameters filled in."""
    return _SWEEPER_CODE + ws_start.to_bytes(8, "little") + slice_bytes.to_bytes(8, "little")


@dataclass
class Run:
    """One measured configuration."""

    smp: int
    pauses_per_s: float
    seconds: float
    ops: int
    pause_ms_median: float | None = None

    @property
    def ops_per_s_per_vcpu(self) -> float:
        return self.ops / self.seconds / self.smp


def _ops(m: Machine, smp: int) -> int:
    block = m.ram_blocks[0]
    counters = block.array.view(np.uint64)[WS_START // 8 :: PAGE_SIZE // 8]
    return int(counters[: smp * SLICE_BYTES // PAGE_SIZE].sum())


def measure(smp: int, seconds: float, pauses_per_s: float = 0.0) -> Run:
    """Run the sweeper on ``smp`` vCPUs for ``seconds``, pausing ``pauses_per_s`` times a second."""
    ram = [RAMBlockSpec("pc.ram", WS_START + smp * SLICE_BYTES)]
    with Machine(ram, smp, prefault=True) as m:
        m.load_guest(sweeper_image())
        m.start()
        time.sleep(0.2)  # translate the loop and touch every page before timing
        m.pause()
        if m.error is not None:
            raise MachineError(f"bench machine: the sweeper guest failed: {m.error}")
        start_ops = _ops(m, smp)
        pause_times: list[float] = []
        t0 = time.monotonic()
        m.resume()
        end = t0 + seconds
        if pauses_per_s > 0:
            period = 1.0 / pauses_per_s
            next_pause = t0 + period
            while next_pause < end:
                time.sleep(max(0.0, next_pause - time.monotonic()))
                p0 = time.monotonic()
                m.pause()
                pause_times.append(time.monotonic() - p0)
                m.resume()
                next_pause += period
        time.sleep(max(0.0, end - time.monotonic()))
        m.pause()
        elapsed = time.monotonic() - t0
        ops = _ops(m, smp) - start_ops
    median = statistics.median(pause_times) * 1e3 if pause_times else None
    return Run(smp, pauses_per_s, elapsed, ops, median)


def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.ops_per_s_per_vcpu)[len(runs) // 2]


def run_bench(seconds: float, rounds: int = 3) -> dict[str, object]:
    """Measure the three configurations, interleaved ``rounds`` times; keep each median.

    Interleaving spreads the noise of a shared host evenly over the configurations, so their
    ratios mean something even when the absolute figures wander.
    """
    runs: dict[str, list[Run]] = {"baseline": [], "smp2": [], "pause10": []}
    for _ in range(rounds):
        runs["baseline"].append(measure(1, seconds))
        runs["smp2"].append(measure(2, seconds))
        runs["pause10"].append(measure(1, seconds, pauses_per_s=10))
    med = {name: _median_run(rs) for name, rs in runs.items()}
    base = med["baseline"].ops_per_s_per_vcpu
    out: dict[str, object] = {
        name: asdict(r) | {"ops_per_s_per_vcpu": r.ops_per_s_per_vcpu} for name, r in med.items()
    }
    out["smp2_ratio"] = med["smp2"].ops_per_s_per_vcpu / base
    out["pause10_ratio"] = med["pause10"].ops_per_s_per_vcpu / base
    out["rounds"] = rounds
    return out


def _print(result: dict[str, object]) -> None:
    base, two, paused = (result[k] for k in ("baseline", "smp2", "pause10"))
    assert isinstance(base, dict) and isinstance(two, dict) and isinstance(paused, dict)
    b = base["ops_per_s_per_vcpu"]
    print(
        "livemig bench machine: page-writing operations per second per vCPU "
        f"(median of {result['rounds']} interleaved rounds)"
    )
    print(f"  1 vCPU               {b / 1e6:8.2f} M/s   1.00x (baseline)")
    print(
        f"  2 vCPUs              {two['ops_per_s_per_vcpu'] / 1e6:8.2f} M/s   "
        f"{result['smp2_ratio']:.2f}x   ({2 * two['ops_per_s_per_vcpu'] / 1e6:.2f} M/s in all)"
    )
    slowdown = (1 - float(result["pause10_ratio"])) * 100  # type: ignore[arg-type]
    print(
        f"  1 vCPU, paused 10/s  {paused['ops_per_s_per_vcpu'] / 1e6:8.2f} M/s   "
        f"{result['pause10_ratio']:.2f}x   (slowdown {slowdown:.1f} %, "
        f"median pause {paused['pause_ms_median']:.2f} ms)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("machine", help="guest speed: page writes per second, pause cost")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")

    def run(args: argparse.Namespace) -> int:
        result = run_bench(args.seconds, args.rounds)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print(result)
        return 0

    parser.set_defaults(func=run)
