"""``livemig bench machine`` runs, and its sweeper guest does what the figures assume."""

from __future__ import annotations

import json
import time

import numpy as np

from livemig.bench.machine import SLICE_BYTES, WS_START, measure, sweeper_image
from livemig.cli import main
from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.abi import PAGE_SIZE


def test_sweeper_increments_every_page_of_its_slice_in_order() -> None:
    with Machine([RAMBlockSpec("pc.ram", WS_START + 2 * SLICE_BYTES)], 2) as m:
        m.load_guest(sweeper_image())
        m.start()
        time.sleep(0.1)
        m.pause()
        counters = m.ram_blocks[0].array.view(np.uint64)[WS_START // 8 :: PAGE_SIZE // 8]
        for cpu in range(2):
            c = counters[cpu * 2048 : (cpu + 1) * 2048].astype(np.int64)
            assert c[0] >= 1
            steps = np.diff(c)
            # along the sweep: one step down by one where the sweep is, flat elsewhere
            assert set(np.unique(steps)) <= {0, -1} and (steps == -1).sum() <= 1


def test_measure_counts_work() -> None:
    run = measure(1, 0.2, pauses_per_s=10)
    assert run.ops > 0 and run.pause_ms_median is not None
    assert 0.2 <= run.seconds < 1.0


def test_cli_json(capsys: object) -> None:
    assert main(["bench", "machine", "--seconds", "0.1", "--rounds", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert out["baseline"]["ops"] > 0 and out["smp2"]["smp"] == 2
    assert out["pause10_ratio"] > 0
