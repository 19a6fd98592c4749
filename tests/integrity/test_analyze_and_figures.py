"""``livemig analyze`` writes only what it decoded (a mapped-ram file's pages included, which it
wrote as zeros before), ``--verify`` checks a file the way a destination would; post-copy with
checksums; the fuzzer and the corruption figures compare every load with the source's RAM."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig.errors import StreamError
from livemig.guests import GuestImage, build_guest
from livemig.machine import Machine, RAMBlockSpec
from livemig.migration.manager import MigrationManager
from livemig.savevm import checksum as CK
from livemig.streams import analyze_stream as analyze
from livemig.streams import dump_ram

RAM = 16 << 20


@pytest.fixture(scope="module")
def memstress(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return build_guest("memstress", cache=tmp_path_factory.mktemp("integrity-guests"))


@pytest.fixture
def source(memstress: GuestImage) -> Iterator[tuple[Machine, MigrationManager]]:
    m = Machine([RAMBlockSpec("pc.ram", RAM)], smp=1)
    m.load_guest(memstress.data, "ws=4M rate=20000")
    m.start()
    time.sleep(0.3)
    yield m, MigrationManager(m)
    m.close()


def _save(mgr: MigrationManager, path: Path, caps: dict[str, bool]) -> dict[str, Any]:
    mgr.set_capabilities([{"capability": k, "state": v} for k, v in caps.items()])
    mgr.migrate(f"file:{path}")
    deadline = time.monotonic() + 60
    while mgr.source.status.value not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert mgr.outgoing is not None and mgr.outgoing.join(10)
    q = mgr.query_migrate()
    assert q["status"] == "completed", q
    return q


@pytest.mark.parametrize("mapped", [False, True], ids=["stream", "mapped-ram"])
def test_dump_ram_is_the_source_ram(source: Any, tmp_path: Path, mapped: bool) -> None:
    machine, mgr = source
    path = tmp_path / "vm.mig"
    _save(mgr, path, {"x-checksums": True, "mapped-ram": mapped, "x-verify": True})
    ram = bytes(machine.ram_blocks[0].view)  # the stopped source: what was sent
    assert any(ram)
    result = analyze(path.read_bytes(), verify=True)
    written = dump_ram(result, str(tmp_path / "dump"))
    assert (tmp_path / "dump" / "pc.ram").read_bytes() == ram
    (d,) = written
    assert d["from-stream"] > 0 and d["from-stream"] + d["never-sent"] == RAM // 4096
    assert ("mapped" in d) == mapped
    assert result.verifier.report["checksum-units"] >= 1
    assert result.verifier.report["ram-digests"] == "equal to the source's at switch-over"
    out = subprocess.run([sys.executable, "-m", "livemig", "analyze", str(path), "--verify",
                          "--dump-ram", str(tmp_path / "d2")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "from the stream" in out.stdout and "checksummed units match" in out.stdout


def test_undecodable_mapped_ram_layout_is_an_error(source: Any, tmp_path: Path) -> None:
    _machine, mgr = source
    path = tmp_path / "vm.mig"
    _save(mgr, path, {"mapped-ram": True})
    data = bytearray(path.read_bytes())
    # the block's mapped-ram header: version 1, then the page size: make it 8 KiB
    at = data.index(struct.pack(">IQ", 1, 4096))
    data[at + 4 : at + 12] = struct.pack(">Q", 8192)
    with pytest.raises(StreamError, match="page size 8192"):
        analyze(bytes(data), keep_ram=True)


def test_verify_needs_checksums(source: Any, tmp_path: Path) -> None:
    _machine, mgr = source
    path = tmp_path / "vm.mig"
    _save(mgr, path, {"x-checksums": False})
    with pytest.raises(CK.ChecksumError, match="carries no checksums"):
        analyze(path.read_bytes(), verify=True)


@pytest.mark.timeout(120)
def test_postcopy_with_checksums(memstress: GuestImage, tmp_path: Path) -> None:
    """Pre-copy units, the discards, the package's device state and every post-copy page
    (held until its PART's checksum) checked; the guest's RAM verified at the end."""
    src = Machine([RAMBlockSpec("pc.ram", 32 << 20)], smp=2)
    dst = Machine([RAMBlockSpec("pc.ram", 32 << 20)], smp=2)
    sm, dm = MigrationManager(src), MigrationManager(dst)
    try:
        src.load_guest(memstress.data, "ws=24M rate=0")
        src.start()
        from livemig.machine.runstate import RunState

        dst.set_runstate(RunState.INMIGRATE)
        caps = [{"capability": c, "state": True} for c in
                ("postcopy-ram", "postcopy-preempt", "x-checksums", "return-path")]  # fmt: skip
        sm.set_capabilities(caps)
        dm.set_capabilities(caps)
        sm.set_parameters({"max-bandwidth": 16 << 20})
        uri = f"unix:{tmp_path / 'pc.sock'}"
        dm.incoming_start(uri)
        sm.migrate(uri, verify=True)
        deadline = time.monotonic() + 30
        while sm.outgoing is None or sm.outgoing.stats.dirty_sync_count < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sm.outgoing.postcopy.start_postcopy()
        deadline = time.monotonic() + 60
        while dm.dest.status.value not in ("completed", "failed"):
            assert time.monotonic() < deadline, dm.query_migrate()
            time.sleep(0.05)
        sq, dq = sm.query_migrate(), dm.query_migrate()
        assert dq["status"] == "completed", dq
        assert dq["x-verify"] == {"equal": True, "state-equal": True}
        assert dq["x-checksums"]["units"] > 0 and sq["x-checksums"]["units"] > 0
        assert dq["x-postcopy"]["pages-placed"] > 0
    finally:
        for m in (sm, dm):
            m.cancel()
            if m.incoming is not None:
                m.incoming.cancel()
                m.incoming.join(10)
            if m.outgoing is not None:
                m.outgoing.join(10)
        src.close()
        dst.close()


@pytest.mark.timeout(240)
def test_bounded_corruptions_never_load_wrong_ram_with_checksums() -> None:
    """The figures of ``livemig bench faults --corruptions`` on a small scale: with checksums
    on, no corrupted stream of any recorded kind loads with RAM other than the source's (the
    live post-copy kind: ``test_postcopy_corruptions``)."""
    from livemig.testing.integrity import RECORDED, run_corruptions

    tallies = run_corruptions(12, seed=5, kinds=RECORDED)
    assert set(tallies) == {"plain", "mapped-ram", "multifd", "xbzrle"}
    for kind, by in tallies.items():
        on, off = by["on"], by["off"]
        assert on.inputs == off.inputs == 12
        assert on.wrong == 0, (kind, on.examples)
        assert on.hangs == on.crashes == off.hangs == off.crashes == 0, (kind, on, off)
        assert on.refused + on.identical == 12


def test_fuzzer_counts_a_wrong_ram_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A loader that skips the checks on purpose: a page flipped in the stream loads, and the
    fuzzer calls it what it is."""
    from livemig.testing.fuzz import feed, record_livemig_stream
    from livemig.wire import Decoder, find_vmdesc
    from livemig.wire import events as E

    corpus = record_livemig_stream(tmp_path / "s.mig")
    data = bytearray(corpus.data)
    dec = Decoder(vmdesc=find_vmdesc(corpus.data))
    dec.receive_data(corpus.data)
    dec.receive_data(b"")
    last = 0
    for ev in iter(dec.next_event, E.NEED_DATA):
        if isinstance(ev, E.RamPages):
            last = dec.offset  # the end of the last page sent: no later copy overwrites it
    data[last - 100] ^= 0xFF
    assert feed(corpus, bytes(data))[0] == "rejected"  # the checksum catches it
    monkeypatch.setattr(CK.IncomingChecks, "verify", lambda self, *a, **k: setattr(
        self, "unit", CK.Unit()))  # fmt: skip
    outcome, detail, _, _ = feed(corpus, bytes(data))
    assert outcome == "wrong-ram", (outcome, detail)
