"""Helpers of the real-QEMU tests: a dirtying boot sector, a qemu.qmp session, waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from livemig.testing.qemu import QemuVM

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
