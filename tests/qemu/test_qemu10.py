"""What QEMU 10.0 added, against livemig: mapped-ram files (written by the migration thread and
by multifd channels), post-copy with preempt, switch-over ack, SwitchoverStart. Each is
checked byte for byte against QEMU's own RAM: the source's when it stopped, or a QEMU 10.0
destination's after it loaded the stream."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
from qemu_helpers import (
    DIRTIER,
    live_capture,
    qmp_session,
    replay_into_qemu,
    replay_postcopy_capture,
    run_firmware,
    same_ram,
    set_caps,
    start_dirtier,
    wait_completed,
)

from livemig.streams import analyze_stream as analyze
from livemig.testing.qemu import QemuBinary, QemuVM

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(90)]


def differing_pages(got: np.ndarray | bytes, want: bytes) -> list[int]:
    a = np.frombuffer(got, np.uint8) if isinstance(got, bytes) else got.reshape(-1)
    b = np.frombuffer(want, np.uint8)
    assert a.shape == b.shape
    return np.flatnonzero((a != b).reshape(-1, 4096).any(axis=1)).tolist()


def mapped_ram_file(
    tmp_path: Path, qemu: QemuBinary, running: bool, channels: int = 0
) -> tuple[bytes, Path]:
    """QEMU saves its guest to a mapped-ram file (with ``channels`` multifd channels writing
    pages, else the migration thread): the guest's RAM when it stopped, and the file. A
    running guest is the dirtying boot sector, rewriting pages while they are saved."""
    path = tmp_path / "vm.mapped"
    with QemuVM(qemu, tmp_path, "save", boot=DIRTIER if running else None) as vm:

        async def steps(client):
            if running:
                await start_dirtier(client, vm)
            else:
                await run_firmware(client)
            caps = ["mapped-ram", *(["multifd"] if channels else [])]
            await client.execute("migrate-set-capabilities", set_caps(caps))
            if channels:
                await client.execute("migrate-set-parameters", {"multifd-channels": channels})
            await client.execute("migrate", {"uri": f"file:{path}"})
            return await wait_completed(client, 60)

        info = asyncio.run(qmp_session(vm, steps))
        assert info["status"] == "completed", info
        return vm.ram(), path


def restore_in_qemu(tmp_path: Path, qemu: QemuBinary, path: Path, channels: int) -> bytes:
    """A QEMU destination restores the mapped-ram file itself; the RAM it loaded."""
    with QemuVM(qemu, tmp_path, "restore", boot=DIRTIER, incoming=True) as vm:

        async def steps(client):
            caps = ["mapped-ram", *(["multifd"] if channels else [])]
            await client.execute("migrate-set-capabilities", set_caps(caps))
            if channels:
                await client.execute("migrate-set-parameters", {"multifd-channels": channels})
            await client.execute("migrate-incoming", {"uri": f"file:{path}"})
            return await wait_completed(client, 60)

        info = asyncio.run(qmp_session(vm, steps))
        assert info["status"] == "completed", (info, vm.stderr())
        return vm.ram()


@pytest.mark.parametrize(("running", "channels"), [(False, 0), (True, 0), (True, 2)],
                         ids=["stopped", "running", "running-multifd2"])  # fmt: skip
def test_mapped_ram_file_decodes_to_qemus_ram(
    tmp_path: Path, qemu10: QemuBinary, running: bool, channels: int
) -> None:
    """``livemig analyze`` of QEMU 10.0's mapped-ram files: each block's pages come from the
    file's page region as its bitmap marks them (analyze used to read only the stream, which
    holds none of them, and dumped zeros: 16,774 of 24,576 pages wrong). The RAM is the
    source's when it stopped, and a QEMU destination restoring the file loads the same."""
    truth, path = mapped_ram_file(tmp_path, qemu10, running, channels)
    result = analyze(path.read_bytes(), keep_ram=True)
    assert result.header["capabilities"] == ["mapped-ram"]
    assert differing_pages(result.ram["pc.ram"], truth) == []
    assert result.pages["pc.ram"]["mapped"] == int(
        np.frombuffer(truth, np.uint8).reshape(-1, 4096).any(axis=1).sum()
    )  # every non-zero page, each once; zero pages are holes
    if channels:
        assert differing_pages(restore_in_qemu(tmp_path, qemu10, path, channels), truth) == []


@pytest.mark.parametrize("channels", [0, 2])
def test_replay_of_a_mapped_ram_file_into_qemu(
    tmp_path: Path, qemu10: QemuBinary, channels: int
) -> None:
    """``livemig replay`` of a QEMU 10.0 mapped-ram file into a QEMU 10.0 destination over a
    socket (no mapped-ram there): the configuration goes without the capability, the block
    list without the headers, the marked pages as records (or by multifd): the destination
    loads the RAM the source had."""
    truth, path = mapped_ram_file(tmp_path, qemu10, running=True)
    loaded = replay_into_qemu(tmp_path, qemu10, path, channels, "none", len(truth))
    assert differing_pages(loaded, truth) == []


def test_live_capture_with_switchover_ack(tmp_path: Path, qemu10: QemuBinary) -> None:
    """A QEMU 10.0 source with switchover-ack switches over only once its destination
    approved: ``capture --switchover-ack`` does so when the return path opens, as a QEMU
    destination without VFIO devices does. RAM rebuilt byte for byte."""
    _info, _stdout, truth, out = live_capture(tmp_path, qemu10, ["return-path", "switchover-ack"],
                                              capture_args=("--switchover-ack",), dirtier=True)  # fmt: skip
    same_ram(out, truth)


def test_live_capture_of_postcopy_with_preempt(tmp_path: Path, qemu10: QemuBinary) -> None:
    """QEMU 10.0 in post-copy with postcopy-preempt opens a second channel for urgent pages
    when it switches: the capture takes it beside main; RAM rebuilt byte for byte."""
    caps = ["return-path", "postcopy-ram", "postcopy-preempt"]
    info, _stdout, truth, out = live_capture(tmp_path, qemu10, caps, dirtier=True, postcopy=True,
                                             )  # fmt: skip
    assert info["ram"]["postcopy-bytes"] > 0, info
    same_ram(out, truth)


@pytest.mark.parametrize("livemig", [False, True], ids=["as-captured", "livemig-switch"])
def test_replay_of_a_postcopy_capture_with_preempt(
    tmp_path: Path, qemu10: QemuBinary, livemig: bool
) -> None:
    """Into a QEMU 10.0 destination with postcopy-preempt, ``replay --postcopy-preempt``
    opens the preempt channel before the package (such a destination waits for it there) and
    sends the requested pages on it; the running destination ends with the source's RAM.
    With ``--postcopy-drain --pipe-pings`` as livemig's source does it with preempt: the
    drain before the switch, the PINGs and the pipe limit on main while the requested pages
    go on the preempt channel."""
    extra = ("--postcopy-drain", "--pipe-pings") if livemig else ()
    printed = replay_postcopy_capture(tmp_path, qemu10, running=True, preempt=True, extra=extra)
    if livemig:
        assert re.search(r"drain: [1-9]\d* pages discarded, PONG after", printed), printed
        m = re.search(
            r"pipe: PONG [\d.]+ ms after the package, (\d+) PINGs \((\d+) answered", printed
        )
        # most pages go on request: the push may be too short for a pipe PING
        assert m and m[1] == m[2], printed
