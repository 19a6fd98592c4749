"""Mapped-ram ``file:`` migrations: fixed page offsets (the file never grows with passes),
QEMU's per-block header and bitmap, a restore that reads pages in place, ``livemig analyze``."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemig.errors import UsageError
from livemig.guests.memstress import check_invariant
from livemig.migration.mapped_ram import FILE_OFFSET_ALIGNMENT, bitmap_size
from livemig.wire import events as E
from livemig.wire.decoder import Decoder
from livemig.wire.vmdesc import find_vmdesc

from .conftest import FINAL, MakePair, Pair

RAM = 16 << 20


def _wait(mgr: Any, side: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = getattr(mgr, side).status.value
        if st in FINAL:
            return mgr.query_migrate()
        time.sleep(0.02)
    raise AssertionError(f"{side} did not finish within {timeout} s")


def _save(p: Pair, path: Path, passes: int, channels: int | None) -> dict[str, Any]:
    # x-verify to a file is the check of its checksums when it is loaded
    caps = {"mapped-ram": True, "x-verify": True, "x-checksums": True}
    params: dict[str, Any] = {"downtime-limit": 0, "max-bandwidth": 32 << 20}
    if channels:
        caps["multifd"] = True
        params["multifd-channels"] = channels
    p.src_mgr.set_capabilities([{"capability": k, "state": v} for k, v in caps.items()])
    p.src_mgr.set_parameters(params)
    p.src_mgr.migrate(f"file:{path}")
    # a 0 ms limit against a guest that keeps writing: passes go on until we raise it
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        q = p.src_mgr.query_migrate()
        if q.get("status") in FINAL or q.get("ram", {}).get("dirty-sync-count", 0) >= passes:
            break
        time.sleep(0.01)
    p.src_mgr.set_parameters({"downtime-limit": 10000, "max-bandwidth": 1 << 40})
    return _wait(p.src_mgr, "source", 30)


def _restore(p: Pair, path: Path, channels: int | None) -> dict[str, Any]:
    caps = {"mapped-ram": True}
    if channels:
        caps["multifd"] = True
        p.dst_mgr.set_parameters({"multifd-channels": channels})
    p.dst_mgr.set_capabilities([{"capability": k, "state": v} for k, v in caps.items()])
    p.dst_mgr.incoming_start(f"file:{path}")
    return _wait(p.dst_mgr, "dest", 30)


def _decode(path: Path) -> tuple[bytes, list[Any]]:
    """The file's bytes and the events the stream decoder reads from it."""
    data = path.read_bytes()
    dec = Decoder(vmdesc=find_vmdesc(data))
    dec.receive_data(data)
    dec.receive_data(b"")
    return data, dec.events()


def _page_bits(data: bytes, bitmap_offset: int) -> np.ndarray:
    """The block's page bitmap as one 0/1 entry a page."""
    return np.unpackbits(np.frombuffer(data, np.uint8, bitmap_size(RAM // 4096), bitmap_offset),
                         bitorder="little")[: RAM // 4096]  # fmt: skip


@pytest.mark.parametrize("channels", [None, 4])
def test_mapped_ram_save_many_passes_and_restore(
    make_pair: MakePair, tmp_path: Path, channels: int | None
) -> None:
    p = make_pair("ws=4M rate=50000", ram=RAM)
    time.sleep(0.3)
    path = tmp_path / "vm.mapped"
    src = _save(p, path, passes=8, channels=channels)
    assert src["status"] == "completed", src
    ram = src["ram"]
    assert ram["dirty-sync-count"] >= 8, ram
    # every pass rewrote the working set, yet the file holds each page once
    assert ram["normal-bytes"] > 2 * (4 << 20)
    size = path.stat().st_size
    assert size <= RAM + FILE_OFFSET_ALIGNMENT + (256 << 10), size
    dst = _restore(p, path, channels)
    assert dst["status"] == "completed", dst
    assert dst["x-verify"]["equal"] is True  # RAM hashes taken at switch-over match
    time.sleep(0.2)  # the guest continues on the restored state
    p.dst.pause()
    report = check_invariant(p.dst.read_guest)
    assert report.ok, report.problems


def test_mapped_ram_layout_is_qemus(make_pair: MakePair, tmp_path: Path) -> None:
    p = make_pair("ws=1M rate=2000", ram=RAM)
    time.sleep(0.2)
    path = tmp_path / "vm.mapped"
    assert _save(p, path, passes=2, channels=2)["status"] == "completed"
    data, evs = _decode(path)
    cfg = next(e for e in evs if isinstance(e, E.Configuration))
    assert cfg.capabilities == ("mapped-ram", "x-checksums")
    setup = next(e for e in evs if isinstance(e, E.RamSetup))
    (info,) = setup.blocks
    version, page_size, bitmap_offset, pages_offset = info.mapped_ram
    assert (version, page_size) == (1, 4096)
    assert pages_offset % FILE_OFFSET_ALIGNMENT == 0
    assert pages_offset >= bitmap_offset + bitmap_size(RAM // 4096)
    # the header sits right before the bitmap: be32 version, be64 page size, offsets
    assert struct.unpack_from(">IQQQ", data, bitmap_offset - 28) == info.mapped_ram
    assert not any(isinstance(e, E.RamPages) for e in evs)  # pages live in the region only
    assert any(isinstance(e, E.Eof) for e in evs)
    bits = _page_bits(data, bitmap_offset)
    pages = np.frombuffer(data, np.uint8, RAM, pages_offset).reshape(-1, 4096)
    nonzero = pages.any(axis=1)
    assert bits.sum() > 256  # memstress's working set
    # a marked page holds the data the guest had; an unmarked one was never written (hole)
    assert not nonzero[bits == 0].any()


def test_mapped_ram_needs_a_file(make_pair: MakePair) -> None:
    p = make_pair("ws=1M rate=2000", ram=RAM)
    p.src_mgr.set_capabilities([{"capability": "mapped-ram", "state": True}])
    p.dst_mgr.incoming_start("tcp:127.0.0.1:0")
    uri = p.dst_mgr.incoming.uri
    # refused by migrate itself, before connecting, as QEMU 10.0 does (it connected first and
    # failed the migration, leaving the waiting destination a truncated stream)
    with pytest.raises(UsageError, match=r"^Migration requires seekable transport \(e.g. file\)"):
        p.src_mgr.migrate(uri)
    assert p.src_mgr.source.status.value == "none"
    assert p.dst_mgr.dest.status.value == "setup"  # still waiting, nothing arrived
    assert p.src.runstate.value == "running"


def test_mapped_ram_restore_refused_without_capability(make_pair: MakePair, tmp_path: Path) -> None:
    p = make_pair("ws=1M rate=2000", ram=RAM)
    path = tmp_path / "vm.mapped"
    assert _save(p, path, passes=1, channels=None)["status"] == "completed"
    p.dst_mgr.incoming_start(f"file:{path}")
    dst = _wait(p.dst_mgr, "dest", 20)
    assert dst["status"] == "failed"
    assert "mapped-ram" in dst["error-desc"]
    assert os.path.getsize(path) > 0


def test_livemig_analyze_reads_a_mapped_ram_file(make_pair: MakePair, tmp_path: Path) -> None:
    import subprocess
    import sys

    p = make_pair("ws=1M rate=2000", ram=RAM)
    time.sleep(0.2)
    path = tmp_path / "vm.mapped"
    assert _save(p, path, passes=2, channels=2)["status"] == "completed"
    out = subprocess.run([sys.executable, "-m", "livemig", "analyze", str(path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cpu" in out.stdout and "pc.ram" in out.stdout
    # the pages come from the file's page regions, as its bitmaps mark them: the stream
    # proper holds none (analyze used to dump zeros)
    from livemig.streams import analyze_stream as analyze

    result = analyze(path.read_bytes(), keep_ram=True)
    for block in p.src.ram_blocks:  # stopped at the end of a migration to a file
        got = result.ram[block.idstr].reshape(-1)[: block.size]
        assert np.array_equal(got, block.array), block.idstr
    assert result.pages["pc.ram"]["mapped"] > 256  # the 1 MiB working set, at least


def test_mapped_ram_restore_in_a_new_process(tmp_path: Path) -> None:
    """Save a running guest from one ``livemig run`` process, restore in another one started
    with ``--incoming defer`` (capabilities first, then migrate-incoming)."""
    from livemig.testing.procs import ProcHarness

    with ProcHarness(workdir=tmp_path, memory="32M") as h:
        src = h.source(append="ws=8M rate=20000")
        time.sleep(0.5)
        path = h.path("vm.mapped")
        h.migrate(src, f"file:{path}",
                  caps={"mapped-ram": True, "multifd": True, "x-verify": True,
                        "x-checksums": True},
                  params={"multifd-channels": 2})  # fmt: skip
        info = src.wait_migration(timeout=60)
        assert info["status"] == "completed", info
        assert os.path.getsize(path) <= (32 << 20) + (2 << 20)
        dst = h.destination(incoming="defer")
        dst.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "mapped-ram", "state": True},
            {"capability": "multifd", "state": True}])  # fmt: skip
        dst.cmd("migrate-incoming", uri=f"file:{path}")
        dst.wait_status("running", timeout=30)
        q = dst.query_migrate()
        assert q["status"] == "completed", q
        assert q["x-verify"]["equal"] is True
        time.sleep(0.3)  # the guest runs on from the restored state
        report = dst.guest_check()
        assert report.get("ok") is True, report


@pytest.mark.parametrize("detection", ["multifd", "none"])
def test_mapped_ram_zero_page_detection(
    make_pair: MakePair, tmp_path: Path, detection: str
) -> None:
    """Zero pages found by the writers are left as holes (bitmap bit clear); with
    zero-page-detection none they are written like any other page."""
    p = make_pair("ws=1M rate=2000", ram=RAM)
    p.src.write_guest(12 << 20, bytes(2 << 20))  # populated pages that read as zero
    time.sleep(0.2)
    p.src_mgr.set_parameters({"zero-page-detection": detection})
    path = tmp_path / "vm.mapped"
    assert _save(p, path, passes=2, channels=2)["status"] == "completed"
    data, evs = _decode(path)
    (info,) = next(e for e in evs if isinstance(e, E.RamSetup)).blocks
    zeroed = _page_bits(data, info.mapped_ram[2])[(12 << 20) // 4096 : (14 << 20) // 4096]
    assert zeroed.all() if detection == "none" else not zeroed.any()
    dst = _restore(p, path, 2)
    assert dst["status"] == "completed", dst
    assert dst["x-verify"]["equal"] is True
