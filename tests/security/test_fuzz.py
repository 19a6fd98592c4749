"""The incoming-stream fuzzer: bounded run on real streams, and proof that it catches crashes,
hangs and oversized allocations (a loader broken on purpose)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from livemig.savevm.ram import RamLoader
from livemig.testing.fuzz import Corpus, default_corpus, feed, mutate, run_fuzz

FUZZ_INPUTS = 240  # ~4 s here; `livemig bench faults --fuzz-seconds N` runs longer


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Corpus]]:
    yield default_corpus(tmp_path_factory.mktemp("fuzz"))


def test_unmutated_streams_load(corpora: list[Corpus]) -> None:
    by_name = {c.name: c for c in corpora}
    for name in ("livemig", "livemig-verify"):
        outcome, detail, _, guards = feed(by_name[name], by_name[name].data)
        assert outcome == "completed", detail
        assert guards >= 1  # at least one guard page next to the RAM block


def test_mutation_is_deterministic(corpora: list[Corpus]) -> None:
    import random

    a = mutate(corpora[0].data, random.Random(7))
    b = mutate(corpora[0].data, random.Random(7))
    assert a == b and a[0] != corpora[0].data


@pytest.mark.timeout(120)
def test_bounded_fuzz_is_clean(corpora: list[Corpus]) -> None:
    stats = run_fuzz(corpora, count=FUZZ_INPUTS, seed=1, timeout=5.0)
    assert stats.inputs == FUZZ_INPUTS
    assert stats.clean, stats.findings
    assert stats.rejected > 0 and stats.completed > 0  # both paths exercised
    assert stats.seconds < 30


def test_fuzzer_reports_a_crash(corpora: list[Corpus], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: RamLoader, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        raise IndexError("a loader bug")

    monkeypatch.setattr(RamLoader, "load_pages", broken)
    stats = run_fuzz(corpora[:1], count=3, seed=3, timeout=5.0)
    assert stats.crashes >= 1
    assert stats.findings[0].kind == "crash" and "IndexError" in stats.findings[0].detail


def test_fuzzer_reports_big_allocation(
    corpora: list[Corpus], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RamLoader.load_pages

    def greedy(self: RamLoader, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        np.ones(200 << 20, dtype=np.uint8)  # sized as if by an untrusted length field
        real(self, block, offsets, data)

    monkeypatch.setattr(RamLoader, "load_pages", greedy)
    stats = run_fuzz(corpora[:1], count=1, seed=4, timeout=5.0)
    assert stats.big_allocs == 1 and stats.findings[0].kind in ("alloc", "crash")


@pytest.mark.timeout(60)
def test_fuzzer_reports_a_hang(corpora: list[Corpus], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    gate = threading.Event()
    real = RamLoader.load_pages

    def stuck(self: RamLoader, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        gate.wait(20)
        real(self, block, offsets, data)

    monkeypatch.setattr(RamLoader, "load_pages", stuck)
    try:
        stats = run_fuzz(corpora[:1], count=1, seed=5, timeout=1.0)
    finally:
        gate.set()
    assert stats.hangs == 1 and stats.findings[0].kind == "hang"


def test_qemu_fixture_in_corpus(corpora: list[Corpus]) -> None:
    if not Path("/work/shared/fixtures/qemu/pc-64m-bios.mig").exists():
        pytest.skip("QEMU fixture stream not present")
    assert any(c.name.startswith("qemu") for c in corpora)
