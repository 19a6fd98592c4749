"""Real QEMU against livemig, with QEMU 7.2 and QEMU 10.0 (the ``qemu`` fixture runs each test
with both): a stream made now is analysed, a live capture rebuilds QEMU's RAM byte for byte,
and a replay into a QEMU destination loads the RAM the source had."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from qemu_helpers import (
    DIRTIED,
    DIRTIER,
    qmp_session,
    run_firmware,
    set_caps,
    start_dirtier,
    wait_completed,
)

from livemig.cli.analyze import analyze
from livemig.testing.qemu import UNALIGNED_KIB, QemuBinary, QemuVM

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


def capture_proc(sock: Path, out: Path, *args: str) -> subprocess.Popen[str]:
    """``livemig capture`` listening on ``sock`` (once the socket exists)."""
    capture = subprocess.Popen(
        [sys.executable, "-m", "livemig", "capture", f"unix:{sock}", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for _ in range(200):
        if sock.exists() or capture.poll() is not None:
            break
        time.sleep(0.05)
    return capture


class ConvergedEarly(Exception):
    """QEMU completed before the passes a test wanted (see ``live_capture``)."""


def live_capture(
    tmp_path: Path,
    qemu: QemuBinary,
    caps: list[str],
    params: dict | None = None,
    capture_args: tuple = (),
    dirtier: bool = False,
    postcopy: bool = False,
    tls: str = "",
    passes: int = 6,
) -> tuple[dict, str, bytes, Path]:
    """QEMU migrates to ``livemig capture``: QEMU's final query-migrate, capture's stdout,
    QEMU's RAM, and the captured file. Without ``dirtier`` QEMU runs its firmware and stops
    first; with it, the boot sector dirties pages through ``passes`` or more passes (see
    ``dirtier_params``), then QEMU stops and completes, or with ``postcopy`` switches to
    post-copy (its guest stops; the rest of RAM is pushed).

    QEMU decides convergence on its own, and a sync that finds no dirty page completes the
    migration whatever the limits say: a vCPU starved of the CPU between two syncs (a busy
    machine; QEMU 7.2's unthrottled multifd channels make passes that last microseconds)
    dirties nothing. Such a run proves nothing about livemig and is made again, up to three
    times; every attempt that ran to the end is checked in full."""
    for attempt in range(3):
        try:
            return _live_capture(tmp_path / f"try{attempt}", qemu, caps, params, capture_args,
                                 dirtier, postcopy, tls, passes)  # fmt: skip
        except ConvergedEarly as exc:
            last = exc
    raise AssertionError(f"QEMU converged before {passes} passes three times: {last}")


def _live_capture(
    tmp_path: Path,
    qemu: QemuBinary,
    caps: list[str],
    params: dict | None,
    capture_args: tuple,
    dirtier: bool,
    postcopy: bool,
    tls: str,
    passes: int,
) -> tuple[dict, str, bytes, Path]:
    tmp_path.mkdir()
    sock = tmp_path / "mig.sock"
    out = tmp_path / "captured.mig"
    # QEMU before 9.0 syncs a 256 KiB-aligned RAM block 64 pages at a time and loses dirty
    # pages under TCG (qemu-baseline.md): an unaligned size makes it go page by page
    memory = UNALIGNED_KIB if dirtier and not qemu.at_least(9) else 65536
    with QemuVM(qemu, tmp_path, "live", boot=DIRTIER if dirtier else None, tls=tls,
                memory_kib=memory) as vm:  # fmt: skip
        capture = capture_proc(sock, out, "--timeout", "20", *capture_args,
                               *(("--tls-creds", tls) if tls else ()))  # fmt: skip
        try:

            async def steps(client):
                if dirtier:
                    await start_dirtier(client, vm)
                else:
                    await run_firmware(client)
                await client.execute("migrate-set-capabilities", set_caps(caps))
                more = dirtier_params(qemu) if dirtier else {}
                if tls:  # a unix: URI has no host name to check the certificate against
                    more.update({"tls-creds": "tls0", "tls-hostname": "localhost"})
                if params or more:
                    await client.execute("migrate-set-parameters", {**(params or {}), **more})
                await client.execute("migrate", {"uri": f"unix:{sock}"})
                if dirtier:
                    await _passes(client, passes)
                    await client.execute("migrate-start-postcopy" if postcopy else "stop")
                return await wait_completed(client)

            info = asyncio.run(qmp_session(vm, steps))
            stdout, stderr = capture.communicate(timeout=30)
            assert capture.returncode == 0, stderr
            assert info["status"] == "completed", info
            truth = vm.ram()
        finally:
            if capture.poll() is None:
                capture.kill()
                capture.wait()
    return info, stdout, truth, out


def _pages_sent(info: dict) -> int:
    """Pages QEMU sent with their contents so far: normal, XBZRLE, compressed (7.2)."""
    return (info.get("ram", {}).get("normal", 0) + info.get("xbzrle-cache", {}).get("pages", 0)
            + info.get("compression", {}).get("pages", 0))  # fmt: skip


async def _passes(client, passes: int) -> None:
    """Wait until QEMU has synced its dirty bitmap ``passes`` times and sent the dirtied
    pages' contents four times over, still migrating. Syncs alone say little: on a busy
    machine the vCPU may dirty a few pages between two of them."""
    deadline = time.monotonic() + 20
    fast = False
    while time.monotonic() < deadline:
        info = await client.execute("query-migrate")
        syncs = info.get("ram", {}).get("dirty-sync-count", 0)
        if syncs >= passes and _pages_sent(info) >= 4 * len(DIRTIED) + 200:
            return
        if info["status"] not in ("setup", "active"):
            if info["status"] in ("device", "completed"):
                await wait_completed(client)
                raise ConvergedEarly(f"{info['status']} after {syncs} syncs")
            raise AssertionError(info)
        if syncs >= 2 and not fast:
            await client.execute("migrate-set-parameters", FAST)
            fast = True
        await asyncio.sleep(0.05)
    raise TimeoutError(f"QEMU did not make {passes} passes in 20 s")


def dirtier_params(qemu: QemuBinary) -> dict:
    """Parameters that keep a migration of the dirtying guest from converging: a 1 ms
    downtime-limit, from 8.2 on a switch-over bandwidth of 1 kB/s (QEMU otherwise takes the
    bandwidth it measured over a 100 ms window, and a window that holds a burst of zero pages
    makes the threshold cover a whole pass of the dirtier), and 1 MiB/s until the first pass
    is over (``FAST`` after): QEMU's threshold is 0 until its first 100 ms have passed, and a
    first pass that ends before then leaves nothing pending, which QEMU takes for convergence
    (7.2 and 10.0 alike; seen on a busy machine)."""
    params = {"downtime-limit": 1, "max-bandwidth": 1 << 20}
    if qemu.at_least(8, 2):
        params["avail-switchover-bandwidth"] = 1000
    return params


FAST = {"max-bandwidth": 8 << 20}  # once past the first pass: a pass of the dirtier in ~70 ms


def same_ram(out: Path, truth: bytes) -> dict:
    """The captured stream rebuilds QEMU's RAM byte for byte; its page counts by block."""
    result = analyze(out.read_bytes(), keep_ram=True)
    got = result.ram["pc.ram"].reshape(-1)
    want = np.frombuffer(truth, np.uint8)
    bad = np.flatnonzero((got != want).reshape(-1, 4096).any(axis=1))
    assert len(bad) == 0, f"{len(bad)} pages differ, first at {bad[:8] * 4096}"
    return result.pages


def test_live_capture_from_qemu(tmp_path: Path, qemu: QemuBinary) -> None:
    _info, _stdout, truth, out = live_capture(tmp_path, qemu, ["return-path"])
    result = analyze(out.read_bytes(), keep_ram=True)
    assert any(c["command"] == "OpenReturnPath" for c in result.commands)
    same_ram(out, truth)


def test_live_capture_of_qemu_xbzrle(tmp_path: Path, qemu: QemuBinary) -> None:
    """QEMU's XBZRLE pages (pages sent again, one byte changed) decode against the pages
    before them: after a dozen passes the rebuilt RAM is QEMU's."""
    info, _stdout, truth, out = live_capture(tmp_path, qemu, ["return-path", "xbzrle"],
                                             dirtier=True)  # fmt: skip
    counts = same_ram(out, truth)
    # more than one pass of deltas; QEMU's ``pages`` also counts cache hits that were not sent
    # (unchanged pages, overflows)
    xbzrle = counts["pc.ram"]["xbzrle"]
    assert len(DIRTIED) < xbzrle <= info["xbzrle-cache"]["pages"], (counts, info)


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
    info, stdout, truth, out = live_capture(
        tmp_path, qemu, ["return-path", "multifd"], params,
        ("--multifd", str(channels), "--multifd-compression", compression), dirtier=True,
    )  # fmt: skip
    assert info["ram"]["dirty-sync-count"] >= 6
    assert info["ram"]["normal"] > 3 * len(DIRTIED)  # the dirtied pages, several times
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
    """A capture of a dozen passes of the dirtying guest (no multifd), and QEMU's RAM; made
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


def replay_into_qemu(
    tmp_path: Path, qemu: QemuBinary, captured: Path, channels: int, compression: str,
    ram_size: int, tls: str = "", caps: tuple[str, ...] = (), replay_args: tuple[str, ...] = (),
) -> bytes:  # fmt: skip
    """``livemig replay`` of ``captured`` into a fresh QEMU destination with ``ram_size``
    bytes of RAM (the source's); the RAM it loaded."""
    sock = tmp_path / "in.sock"
    with QemuVM(qemu, tmp_path, "replay", boot=DIRTIER, incoming=True, tls=tls,
                memory_kib=ram_size // 1024) as vm:  # fmt: skip

        async def steps(client):
            more = ["return-path", *(["multifd"] if channels else []), *caps]
            await client.execute("migrate-set-capabilities", set_caps(more))
            params = {"multifd-channels": channels, "multifd-compression": compression} if (
                channels) else {}  # fmt: skip
            if tls:
                params["tls-creds"] = "tls0"
            if params:
                await client.execute("migrate-set-parameters", params)
            await client.execute("migrate-incoming", {"uri": f"unix:{sock}"})
            more = ("--multifd", str(channels), "--multifd-compression", compression)
            rp = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "livemig", "replay", str(captured), f"unix:{sock}",
                 "--timeout", "20", *(more if channels else ()), *replay_args,
                 *(("--tls-creds", tls, "--tls-hostname", "localhost") if tls else ())],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            return rp, await wait_completed(client)

        rp, info = asyncio.run(qmp_session(vm, steps))
        assert rp.returncode == 0, rp.stderr
        assert info["status"] == "completed", (info, vm.stderr())
        if channels:
            assert f"over {channels} multifd channels" in rp.stdout, rp.stdout
        return vm.ram()


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
