"""Real QEMU against livemig, with QEMU 7.2 and QEMU 10.0 (the ``qemu`` fixture runs each test
with both): a stream made now is analysed, a live capture rebuilds QEMU's RAM byte for byte,
and a replay into a QEMU destination loads the RAM the source had."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from qemu_helpers import (
    DIRTIED,
    capture_proc,
    into_qemu,
    live_capture,
    qmp_session,
    replay_into_qemu,
    replay_postcopy_capture,
    run_firmware,
    same_postcopy_ram,
    same_ram,
    set_caps,
    several_passes,
    wait_completed,
)

from livemig.streams import analyze_stream as analyze
from livemig.testing.qemu import QemuBinary, QemuVM

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(90)]


def test_qemu_stream_to_file_decodes_to_backing_file(tmp_path: Path, qemu: QemuBinary) -> None:
    out = tmp_path / "stream.mig"
    with QemuVM(qemu, tmp_path, "file") as vm:

        async def steps(client):
            await run_firmware(client)
            await client.execute("migrate", {"uri": f"exec:cat > {out}"})
            return await wait_completed(client)

        info = asyncio.run(qmp_session(vm, steps))
        assert info["status"] == "completed", info
        truth = vm.ram()
    result = analyze(out.read_bytes(), keep_ram=True)
    got = result.ram["pc.ram"].reshape(-1)
    assert np.array_equal(got, np.frombuffer(truth, np.uint8))
    assert any(d["idstr"] == "globalstate" for d in result.devices)
    # QEMU 10.0's machine types announce the switch-over (MIG_CMD_SWITCHOVER_START)
    switchover = [c for c in result.commands if c["command"] == "SwitchoverStart"]
    assert len(switchover) == (1 if qemu.at_least(10) else 0), result.commands


def test_live_capture_from_qemu(tmp_path: Path, qemu: QemuBinary) -> None:
    _info, _stdout, truth, out = live_capture(tmp_path, qemu, ["return-path"])
    result = analyze(out.read_bytes(), keep_ram=True)
    assert any(c["command"] == "OpenReturnPath" for c in result.commands)
    same_ram(out, truth)


def test_live_capture_of_qemu_xbzrle(tmp_path: Path, qemu: QemuBinary) -> None:
    """QEMU's XBZRLE pages (pages sent again, one byte changed) decode against the pages
    before them: after several passes the rebuilt RAM is QEMU's, and a QEMU destination
    loading the replayed capture has the same."""
    # a pass of deltas is quick (a few kB): stop once one was sent, before QEMU finds a sync
    # with nothing dirty
    info, _stdout, truth, out = live_capture(
        tmp_path, qemu, ["return-path", "xbzrle"], dirtier=True,
        enough=lambda i: i.get("xbzrle-cache", {}).get("pages", 0) >= len(DIRTIED),
    )  # fmt: skip
    counts = same_ram(out, truth)
    # a pass of deltas at least; QEMU's ``pages`` also counts cache hits that were not sent
    # (unchanged pages, overflows)
    xbzrle = counts["pc.ram"]["xbzrle"]
    assert len(DIRTIED) // 2 < xbzrle <= info["xbzrle-cache"]["pages"], (counts, info)
    # and replayed, the deltas as recorded, into a QEMU destination of the same version
    assert replay_into_qemu(tmp_path, qemu, out, 0, "none", len(truth)) == truth


def test_live_capture_of_qemu_compress(tmp_path: Path, qemu72: QemuBinary) -> None:
    """QEMU 7.2's compress threads (capability ``compress``, gone in 9.1: each page a zlib
    stream of its own) over several passes: every compressed page decodes to QEMU's."""
    info, _stdout, truth, out = live_capture(tmp_path, qemu72, ["return-path", "compress"],
                                             dirtier=True)  # fmt: skip
    counts = same_ram(out, truth)
    assert counts["pc.ram"]["compressed"] > 2 * len(DIRTIED)
    assert info["compression"]["pages"] >= counts["pc.ram"]["compressed"]
    assert any(truth[a] for a in DIRTIED)  # the dirtier ran (stopped maybe mid-round)


@pytest.mark.parametrize(("channels", "compression"), [(2, "none"), (2, "zlib"), (4, "zstd")])
def test_live_capture_of_qemu_multifd(
    tmp_path: Path, qemu: QemuBinary, channels: int, compression: str
) -> None:
    """QEMU's multifd channels, packets, compression streams and sync points (7.2: every RAM
    section's EOS; 10.0: MULTIFD_FLUSH), and with 10.0 its zero pages found by the channels
    (``zero-page-detection=multifd``, sent as offsets in the packets), as livemig's multifd
    receiver reads them, over several passes of a guest that dirties pages: RAM rebuilt from
    main's records and the channels' pages is QEMU's."""
    params = {"multifd-channels": channels, "multifd-compression": compression}
    # a pass of the dirtier's pages compressed is a few kB: at 32 kB/s it still lasts long
    # enough for the vCPU to dirty them again before the next sync
    slow = {"max-bandwidth": 32 << 10} if compression != "none" else None
    info, stdout, truth, out = live_capture(
        tmp_path, qemu, ["return-path", "multifd"], params,
        ("--multifd", str(channels), "--multifd-compression", compression), dirtier=True,
        then=slow,
    )  # fmt: skip
    assert info["ram"]["dirty-sync-count"] >= 4
    assert info["ram"]["normal"] > 2 * len(DIRTIED)  # the dirtied pages, several times
    # from 9.0 on the channels also carry the zero pages (as offsets): QEMU's "duplicate"
    zero = f" and {info['ram']['duplicate']} zero pages" if qemu.at_least(9) else ""
    assert f"{info['ram']['normal']} pages{zero} from {channels} multifd channels" in stdout
    same_ram(out, truth)


def test_capture_without_multifd_of_a_qemu_multifd_source_says_so(
    tmp_path: Path, qemu: QemuBinary
) -> None:
    """Without ``--multifd`` the channels wait unread and main alone lacks the pages: the
    capture fails and says how to capture it, rather than store a stream without its RAM."""
    sock, out = tmp_path / "mig.sock", tmp_path / "captured.mig"
    with QemuVM(qemu, tmp_path, "stray") as vm:
        capture = capture_proc(sock, out, "--timeout", "2")
        try:

            async def steps(client):
                await run_firmware(client)
                await client.execute("migrate-set-capabilities",
                                     set_caps(["return-path", "multifd"]))  # fmt: skip
                await client.execute("migrate-set-parameters", {"multifd-channels": 3})
                await client.execute("migrate", {"uri": f"unix:{sock}"})
                return await wait_completed(client)

            info = asyncio.run(qmp_session(vm, steps))
            _stdout, stderr = capture.communicate(timeout=20)
        finally:
            if capture.poll() is None:
                capture.kill()
                capture.wait()
    assert capture.returncode == 1, stderr
    assert "opened 3 multifd channel(s) besides main" in stderr and "--multifd 3" in stderr
    assert "Traceback" not in stderr and not out.exists()
    assert info["status"] == "failed", info  # no SHUT(0) on its return path


@pytest.fixture(scope="module")
def dirtied_captures(tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """A capture of several passes of the dirtying guest (no multifd), and QEMU's RAM; made
    once per QEMU version."""
    made: dict[str, tuple[bytes, Path]] = {}

    def get(qemu: QemuBinary) -> tuple[bytes, Path]:
        if qemu.series not in made:
            tmp = tmp_path_factory.mktemp(f"replay-{qemu.series}")
            _info, _stdout, truth, out = live_capture(tmp, qemu, ["return-path"], dirtier=True)
            made[qemu.series] = (truth, out)
        return made[qemu.series]

    return get


@pytest.mark.parametrize(("channels", "compression"),
                         [(0, "none"), (2, "none"), (2, "zlib"), (4, "zstd")])  # fmt: skip
def test_replay_into_qemu(
    tmp_path: Path, qemu: QemuBinary, dirtied_captures: Callable, channels: int, compression: str
) -> None:
    """``livemig replay`` sends a captured stream to a QEMU destination of the same version;
    with ``--multifd`` the pages go by livemig's multifd sender (QEMU's handshake, packets,
    zlib and zstd streams, the stream's own sync points), and QEMU loads it to the RAM the
    source had, byte for byte."""
    truth, captured = dirtied_captures(qemu)
    assert replay_into_qemu(tmp_path, qemu, captured, channels, compression, len(truth)) == truth


@pytest.mark.parametrize("multifd", [False, True])
def test_live_capture_of_qemu_postcopy(tmp_path: Path, qemu: QemuBinary, multifd: bool) -> None:
    """QEMU switches to post-copy after several passes: the capture takes the PACKAGED
    command, the pages pushed after it and the EOF that ends a post-copy stream without a vmdesc
    (it used to wait for one while QEMU waited for SHUT), and answers SHUT. The rebuilt RAM is
    QEMU's; the package's device sections, with no layout to read them by, are reported as not
    decoded. With multifd (7.2 only: 10.0 refuses "Postcopy is not yet compatible with
    multifd"), pre-copy's pages come by 2 channels, post-copy's on main."""
    if multifd and qemu.at_least(9, 1):
        pytest.skip(f"{qemu.label} refuses postcopy-ram with multifd")
    caps = ["return-path", "postcopy-ram", *(["multifd"] if multifd else [])]
    info, _stdout, truth, out = live_capture(tmp_path, qemu, caps, dirtier=True, postcopy=True,
                                             capture_args=("--multifd", "2") if multifd else ())  # fmt: skip
    assert info["ram"]["postcopy-bytes"] > 0, info
    assert (info["ram"]["multifd-bytes"] > 0) == multifd
    same_ram(out, truth)
    report = analyze(out.read_bytes()).report()
    assert any(c["command"] == "Packaged" for c in report["commands"])
    assert not report["vmdesc"] and len(report["undecoded"]) == 1


@pytest.mark.parametrize("running", [False, True], ids=["paused", "running"])
def test_replay_of_a_postcopy_capture_into_qemu(
    tmp_path: Path, qemu: QemuBinary, running: bool
) -> None:
    """``livemig replay`` of a post-copy capture is a post-copy source: after the package a
    destination with postcopy-ram runs the guest (``running``: the dirtying boot sector) and
    asks for the pages it faults on; replay sends those first, then the rest of the recorded
    push, each page once (QEMU fails on a page placed twice). The destination ends with the
    source's RAM: byte for byte when its guest stayed paused; when it ran, but for the byte
    the boot sector goes on incrementing in each page it dirties."""
    replay_postcopy_capture(tmp_path, qemu, running)


def test_tls_both_ways_with_qemu(tmp_path: Path, qemu: QemuBinary) -> None:
    """Mutual TLS with QEMU's GnuTLS, on every channel: QEMU migrates with multifd to
    ``livemig capture --tls-creds`` (the first connection is main: TLS cannot be peeked at),
    then ``livemig replay --tls-creds --multifd`` into a QEMU destination with server
    credentials. Both ends have the dirtied RAM byte for byte."""
    from livemig.transport.tls import generate_creds

    creds = str(generate_creds(tmp_path / "creds", names=("localhost",)))
    _info, stdout, truth, out = live_capture(
        tmp_path, qemu, ["return-path", "multifd"], {"multifd-channels": 2}, ("--multifd", "2"),
        dirtier=True, tls=creds,
    )  # fmt: skip
    assert "from 2 multifd channels" in stdout
    same_ram(out, truth)
    assert replay_into_qemu(tmp_path, qemu, out, 2, "zstd", len(truth), tls=creds) == truth


FILLED = range(2 << 20, 6 << 20)  # RAM the real-mode guest never touches


def _fill(vm: QemuVM) -> None:
    """4 MiB of random bytes in the source's RAM (its file, shared with the guest) before it
    migrates: the first pass sends them, as any page."""
    with open(vm.ram_path, "r+b") as f:
        f.seek(FILLED.start)
        f.write(np.random.default_rng(23).bytes(len(FILLED)))


def _first_pass(info: dict) -> bool:
    """Post-copy early in QEMU's first pass (2 MiB/s): most of the random 4 MiB is still to
    send after the switch, a long push (~40 pipe PINGs when the switch comes soon enough),
    where the limit holds the push whenever QEMU installs the pages more slowly than replay
    sends them (7.2 did at times)."""
    return info.get("ram", {}).get("transferred", 0) > 256 << 10


@pytest.mark.parametrize("running", [False, True], ids=["paused", "running"])
def test_replay_with_livemigs_postcopy_switch_into_qemu(
    tmp_path: Path, qemu: QemuBinary, running: bool
) -> None:
    """What livemig's own post-copy source adds at and after the switch, into a real QEMU
    destination, by ``replay --postcopy-drain --pipe-pings`` of a QEMU post-copy capture:
    (a) the drain: POSTCOPY_RAM_DISCARD of every page still to send, made by livemig's
    ``discard_commands``, then PING ``X_DRAIN_PING``, whose PONG is awaited before PING 2 and
    the package; (c) the push only after the PONG to PING 4; (b) the push in PARTs with PINGs
    ``0x80000000 | n`` between them, never more than ``PIPE_LIMIT`` bytes beyond the last
    PONG, while the running guest's requests are served. QEMU takes it all, answers every
    PING with a PONG of its value, completes, and has the source's RAM."""
    from collections import Counter

    from livemig.migration.postcopy_source import LISTENING_PING, PIPE_LIMIT, PIPE_PING_FLAG
    from livemig.streams import replay_stream
    from livemig.wire.constants import X_DRAIN_PING

    caps = ["return-path", "postcopy-ram"]
    # running: several passes, then a push slower than the guest's faults (see
    # replay_postcopy_capture); paused: the switch early in the first pass, a long push
    _info, _stdout, truth, out = live_capture(
        tmp_path, qemu, caps, dirtier=True, postcopy=True,
        enough=several_passes if running else _first_pass, prepare=None if running else _fill,
    )  # fmt: skip
    if not running:
        assert np.frombuffer(truth, np.uint8)[FILLED].any()

    def send(uri: str):
        return replay_stream(out, uri, timeout=20, postcopy_drain=True, pipe_pings=True,
                             max_postcopy_bandwidth=(512 << 10) if running else 0)  # fmt: skip

    result, got = into_qemu(tmp_path, qemu, len(truth), send, ("postcopy-ram",),
                            paused=not running)  # fmt: skip
    same_postcopy_ram(truth, got, running)
    pc = result.postcopy
    assert pc is not None and result.shut == 0
    pipe = [PIPE_PING_FLAG | n for n in range(1, pc.pipe_pings + 1)]
    # QEMU's own PINGs (1 after the return path, 2 after the discards, 4 after the package)
    # with livemig's between them
    assert list(result.pings) == [1, X_DRAIN_PING, 2, LISTENING_PING, *pipe], result.pings
    # every PING answered by a PONG of its value (and PING 3 inside the package), in order
    # but for PONG 3, which QEMU's main thread sends while its listen thread answers PING 4
    assert Counter(result.pongs) == Counter([*result.pings, 3]), result.pongs
    assert [v for v in result.pongs if v != 3] == list(result.pings), result.pongs
    # (a) every page sent after the switch was discarded before it, none twice
    assert pc.drain_pages == pc.pages > 0 and pc.switch_discarded == 0
    # (b) the pipe limit held: PINGs every 128 KiB, each answered (at least 3: the dirtied
    # pages alone are 576 KiB). Whether the push had to wait for a PONG depends on who is
    # faster: QEMU 7.2 fell behind replay at times, 10.0 installed the pages as fast as
    # replay sent them (never more than 257 KiB behind); the holding itself is tested
    # without QEMU (tests/cli/test_replay.py).
    assert pc.pipe_pings >= 3, pc
    assert pc.pipe_answered == pc.pipe_pings and not pc.pipe_off, pc
    assert 0 < pc.pipe_most_ahead <= PIPE_LIMIT, pc
    if running:
        assert pc.served > 0, pc  # the guest faulted, its pages came between the PARTs
