"""Helpers of the real-QEMU tests: a dirtying boot sector, a qemu.qmp session, waits, QEMU
migrating to ``livemig capture`` and ``livemig replay`` into a QEMU destination."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from livemig.streams import analyze_stream as analyze
from livemig.testing.qemu import UNALIGNED_KIB, QemuBinary, QemuVM

T = TypeVar("T")

# A boot sector that keeps dirtying RAM: it increments the first byte of each of the 144 pages
# from 0x10000 to 0xA0000, over and over. Each round also toggles CR0.WP, which makes TCG flush
# its TLB: QEMU 7.2 under TCG otherwise misses writes through TLB entries made before a dirty
# bitmap sync (../shared/design/qemu-baseline.md), and its RAM would not match what it sent.
DIRTIER = bytes.fromhex(
    "fa"            # 00 cli
    "31c0"          # 01 xor ax, ax
    "8ed8"          # 03 mov ds, ax
    "8ed0"          # 05 mov ss, ax
    "bc007c"        # 07 mov sp, 0x7c00
    "bb0010"        # 0a outer: mov bx, 0x1000     ; segment of the first page
    "b99000"        # 0d mov cx, 144
    "8ec3"          # 10 inner: mov es, bx
    "26fe060000"    # 12 inc byte [es:0]
    "81c30001"      # 17 add bx, 0x100            ; next 4 KiB page
    "e2f3"          # 1b loop inner
    "0f20c0"        # 1d mov eax, cr0
    "663500000100"  # 20 xor eax, 0x10000         ; CR0.WP
    "0f22c0"        # 26 mov cr0, eax
    "ebdf"          # 29 jmp outer
).ljust(510, b"\0") + b"\x55\xaa"  # fmt: skip
DIRTIED = range(0x10000, 0xA0000, 4096)


async def qmp_session(vm: QemuVM, steps: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``steps(client)`` with a qemu.qmp client connected to ``vm``."""
    from qemu.qmp import ConnectError, QMPClient

    # QEMU creates the socket file when it binds, a moment before it listens: a connect in
    # between is refused (seen once in CI), so retry for a while
    deadline = time.monotonic() + 10
    while True:
        client = QMPClient("livemig-test")
        try:
            await asyncio.wait_for(client.connect(str(vm.qmp_path)), 10)
            break
        except ConnectError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    try:
        return await steps(client)
    finally:
        await client.disconnect()


async def wait_completed(client: Any, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await client.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        await asyncio.sleep(0.05)
    raise TimeoutError("migration did not finish")


async def run_firmware(client: Any) -> None:
    """Let SeaBIOS run and write RAM, then stop the guest."""
    await client.execute("cont")
    await asyncio.sleep(0.5)
    await client.execute("stop")


async def start_dirtier(client: Any, vm: QemuVM, timeout: float = 20.0) -> None:
    """``cont``, then wait until the boot sector is seen dirtying RAM (the firmware takes its
    time to boot it, more on a busy machine: migrating before it runs would migrate a quiet
    guest, which converges at once)."""
    await client.execute("cont")
    deadline = time.monotonic() + timeout
    seen = {vm.ram_byte(DIRTIED[0])}
    while len(seen) < 3:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the dirtying boot sector did not run within {timeout} s")
        await asyncio.sleep(0.02)
        seen.add(vm.ram_byte(DIRTIED[0]))


def set_caps(caps: list[str] | tuple[str, ...]) -> dict:
    return {"capabilities": [{"capability": c, "state": True} for c in caps]}


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


def several_passes(info: dict) -> bool:
    """The default of ``live_capture``'s ``enough``: four syncs, and the dirtied pages'
    contents sent three times over (syncs alone say little if the vCPU barely ran)."""
    return (info.get("ram", {}).get("dirty-sync-count", 0) >= 4
            and pages_sent(info) >= 3 * len(DIRTIED) + 200)  # fmt: skip


def pages_sent(info: dict) -> int:
    """Pages QEMU sent with their contents so far: normal, XBZRLE, compressed (7.2)."""
    return (info.get("ram", {}).get("normal", 0) + info.get("xbzrle-cache", {}).get("pages", 0)
            + info.get("compression", {}).get("pages", 0))  # fmt: skip


def live_capture(
    tmp_path: Path,
    qemu: QemuBinary,
    caps: list[str],
    params: dict | None = None,
    capture_args: tuple = (),
    dirtier: bool = False,
    postcopy: bool = False,
    tls: str = "",
    enough: Callable[[dict], bool] = several_passes,
    then: dict | None = None,
    prepare: Callable[[QemuVM], None] | None = None,
) -> tuple[dict, str, bytes, Path]:
    """QEMU migrates to ``livemig capture``: QEMU's final query-migrate, capture's stdout,
    QEMU's RAM, and the captured file. ``prepare(vm)`` runs right before ``migrate`` (it may
    write the source's RAM file). Without ``dirtier`` QEMU runs its firmware and stops
    first; with it, the boot sector dirties pages until QEMU's query-migrate is ``enough``
    (see ``dirtier_params``; ``then``: parameters set once the first pass is over), then QEMU
    stops and completes, or with ``postcopy`` switches to post-copy (its guest stops; the rest
    of RAM is pushed).

    QEMU decides convergence on its own, and a sync that finds no dirty page completes the
    migration whatever the limits say: a vCPU that did not run between two syncs (a busy
    machine; passes that take microseconds: XBZRLE's, QEMU 7.2's unthrottled multifd
    channels) dirtied nothing. Such a run proves nothing about livemig and is made again, up
    to three times; every attempt that ran to the end is checked in full."""
    for attempt in range(3):
        try:
            return _live_capture(tmp_path / f"try{attempt}", qemu, caps, params, capture_args,
                                 dirtier, postcopy, tls, enough, then, prepare)  # fmt: skip
        except ConvergedEarly as exc:
            last = exc
    raise AssertionError(f"QEMU converged early three times: {last}")


def _live_capture(
    tmp_path: Path,
    qemu: QemuBinary,
    caps: list[str],
    params: dict | None,
    capture_args: tuple,
    dirtier: bool,
    postcopy: bool,
    tls: str,
    enough: Callable[[dict], bool],
    then: dict | None,
    prepare: Callable[[QemuVM], None] | None = None,
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
                if prepare is not None:
                    prepare(vm)
                await client.execute("migrate", {"uri": f"unix:{sock}"})
                if dirtier:
                    await _until(client, enough, then)
                    await client.execute("migrate-start-postcopy" if postcopy else "stop")
                info = await wait_completed(client)
                if postcopy and not info.get("ram", {}).get("postcopy-bytes"):
                    # it completed in pre-copy before the switch was asked for
                    raise ConvergedEarly("completed before migrate-start-postcopy took effect")
                return info

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


async def _until(client, enough: Callable[[dict], bool], then: dict | None) -> None:
    """Wait until QEMU's query-migrate is ``enough``, still migrating; set ``then`` once the
    first pass is over."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = await client.execute("query-migrate")
        if enough(info):
            return
        if then and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            await client.execute("migrate-set-parameters", then)
            then = None
        if info["status"] not in ("setup", "active"):
            if info["status"] in ("device", "completed"):
                await wait_completed(client)
                syncs = info.get("ram", {}).get("dirty-sync-count", 0)
                raise ConvergedEarly(f"{info['status']} after {syncs} syncs")
            raise AssertionError(info)
        await asyncio.sleep(0.05)
    raise TimeoutError("QEMU did not make the passes the test wants in 20 s")


def dirtier_params(qemu: QemuBinary) -> dict:
    """Parameters that keep a migration of the dirtying guest from converging on its own: a
    1 ms downtime-limit, from 8.2 on a switch-over bandwidth of 1 kB/s (QEMU otherwise takes
    the bandwidth it measured over a 100 ms window, and a window that holds a burst of zero
    pages makes the threshold cover a whole pass of the dirtier), and 2 MiB/s: a pass of the
    dirtier's 144 pages lasts ~0.3 s, so the vCPU runs between two syncs even on a busy
    machine, and the first pass outlasts QEMU's first 100 ms, before which its threshold is
    0 (a pass that ended then would leave nothing pending: convergence to QEMU)."""
    params = {"downtime-limit": 1, "max-bandwidth": 2 << 20}
    if qemu.at_least(8, 2):
        params["avail-switchover-bandwidth"] = 1000
    return params


def same_ram(out: Path, truth: bytes) -> dict:
    """The captured stream rebuilds QEMU's RAM byte for byte; its page counts by block."""
    result = analyze(out.read_bytes(), keep_ram=True)
    got = result.ram["pc.ram"].reshape(-1)
    want = np.frombuffer(truth, np.uint8)
    bad = np.flatnonzero((got != want).reshape(-1, 4096).any(axis=1))
    assert len(bad) == 0, f"{len(bad)} pages differ, first at {bad[:8] * 4096}"
    return result.pages


def replay_into_qemu(
    tmp_path: Path, qemu: QemuBinary, captured: Path, channels: int, compression: str,
    ram_size: int, tls: str = "", caps: tuple[str, ...] = (), replay_args: tuple[str, ...] = (),
    paused: bool = True, out: list | None = None,
) -> bytes:  # fmt: skip
    """``livemig replay`` of ``captured`` into a fresh QEMU destination with ``ram_size``
    bytes of RAM (the source's); the RAM it loaded (stopped first when ``paused`` is False:
    then its guest ran once loaded). ``out`` gets replay's stdout."""
    more = ("--multifd", str(channels), "--multifd-compression", compression)

    def send(uri: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "livemig", "replay", str(captured), uri,
             "--timeout", "20", *(more if channels else ()), *replay_args,
             *(("--tls-creds", tls, "--tls-hostname", "localhost") if tls else ())],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    rp, ram = into_qemu(tmp_path, qemu, ram_size, send, caps, channels, compression, tls, paused,
                        check=lambda rp: rp.returncode == 0 or rp.stderr)  # fmt: skip
    if out is not None:
        out.append(rp.stdout)
    if channels:
        assert f"over {channels} multifd channels" in rp.stdout, rp.stdout
    return ram


def into_qemu(
    tmp_path: Path, qemu: QemuBinary, ram_size: int, send: Callable[[str], T],
    caps: tuple[str, ...] = (), channels: int = 0, compression: str = "none", tls: str = "",
    paused: bool = True, check: Callable[[T], Any] = lambda _r: True,
) -> tuple[T, bytes]:  # fmt: skip
    """A fresh QEMU destination with ``ram_size`` bytes of RAM listens (capabilities
    return-path and ``caps``), ``send(uri)`` is its source (in a thread), and QEMU must
    complete: what ``send`` returned (``check`` of it must be True, else it is the failure's
    message) and the RAM QEMU loaded (stopped first when ``paused`` is False)."""
    sock = tmp_path / "in.sock"
    with QemuVM(qemu, tmp_path, "replay", boot=DIRTIER, incoming=True, tls=tls,
                memory_kib=ram_size // 1024, paused=paused) as vm:  # fmt: skip

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
            try:
                result = await asyncio.to_thread(send, f"unix:{sock}")
            except Exception as exc:
                raise AssertionError(f"{exc!r}; QEMU: {vm.stderr()}") from exc
            info = await wait_completed(client)
            if not paused:
                await client.execute("stop")
            return result, info

        result, info = asyncio.run(qmp_session(vm, steps))
        ok = check(result)
        assert ok is True, ok
        assert info["status"] == "completed", (info, vm.stderr())
        return result, vm.ram()


def replay_postcopy_capture(
    tmp_path: Path, qemu: QemuBinary, running: bool, preempt: bool = False,
    extra: tuple[str, ...] = (),
) -> str:  # fmt: skip
    """Capture a post-copy migration of the dirtying guest, replay it (with options
    ``extra``) into a QEMU destination with postcopy-ram (and ``preempt``: postcopy-preempt
    on both), and check its RAM: every byte when its guest stayed paused, every byte but the
    one the boot sector goes on incrementing in its pages when it ran (then it must have
    asked for pages). Replay's report, and every PING it sent was answered."""
    caps = ["return-path", "postcopy-ram"]
    _info, _stdout, truth, out = live_capture(tmp_path, qemu, caps, dirtier=True, postcopy=True)
    printed: list[str] = []
    # a push slower than the guest's faults (its 144 pages in about a second)
    args = ("--max-postcopy-bandwidth", str(512 << 10)) if running else ()
    dest = ("postcopy-ram", *(("postcopy-preempt",) if preempt else ()))
    args += ("--postcopy-preempt",) if preempt else ()
    args += extra
    got = replay_into_qemu(tmp_path, qemu, out, 0, "none", len(truth), caps=dest,
                           paused=not running, out=printed, replay_args=args)  # fmt: skip
    assert "post-copy:" in printed[0], printed
    if running:
        served = int(printed[0].split(" sent on request")[0].rsplit(" ", 1)[1])
        assert served > 0, printed  # the guest faulted, and its pages came on request
    assert "PINGs, each answered by its PONG" in printed[0], printed
    same_postcopy_ram(truth, got, running)
    return printed[0]


def same_postcopy_ram(truth: bytes, got: bytes, running: bool) -> None:
    """A post-copy destination's RAM is the source's: every byte when its guest stayed
    paused; when it ran (the dirtying boot sector), every byte but the one the boot sector
    goes on incrementing in each page it dirties."""
    want = np.frombuffer(truth, np.uint8).copy()
    have = np.frombuffer(got, np.uint8).copy()
    if running:
        dirtied = np.array(DIRTIED)
        assert len(set(have[dirtied].tolist())) <= 2  # the boot sector ran on, all pages alike
        want[dirtied] = have[dirtied] = 0
    bad = np.flatnonzero((want != have).reshape(-1, 4096).any(axis=1))
    assert len(bad) == 0, f"{len(bad)} pages differ, first at {bad[:8] * 4096}"
