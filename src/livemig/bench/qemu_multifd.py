"""Real QEMU (10.0 by default: ``qemu_baseline.qemu_binary``) beside ``livemig bench
throughput``: the same guest RAM migrated by QEMU, from a stopped source to a fresh
destination, with the same channel counts.

The source QEMU's RAM is a file in /dev/shm (``memory-backend-file``, share=on), into which the
benchmark copies livemig's guest RAM, so both move the same bytes. The guest never runs
(``-S``): no kernel to download, and QEMU 7.2's lost-dirty-pages bug under TCG
(../shared/design/qemu-baseline.md) has nothing to lose. QEMU refuses to migrate a source again
once it completed ("Can't migrate the vm that was paused due to previous migration"), so each
migration starts a new source on the same RAM file, and a new destination whose RAM is
preallocated (``prealloc=on``, as livemig's ``--prefault``). Throughput is measured as livemig's is: RAM
bytes / (total-time - setup-time), from QEMU's own query-migrate.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from livemig.bench.common import (
    GuestProcess,
    Workdir,
    process_cpu,
    set_migration,
    wait_migration_end,
)
from livemig.bench.qemu_baseline import qemu_available, qemu_label, qemu_path
from livemig.errors import LivemigError, MigrationError

MIB = 1 << 20


def available() -> bool:
    return qemu_available()


class QemuSource:
    """Guest RAM holding ``ram``'s bytes for a stopped QEMU; ``migrate`` starts one on it,
    sends it to a new destination QEMU and returns livemig's figures for it."""

    def __init__(self, ram: np.ndarray, wd: Workdir) -> None:
        if ram.nbytes % MIB:
            raise MigrationError(f"QEMU baseline: {ram.nbytes} bytes of RAM is not whole MiB")
        self.size = ram.nbytes
        self.wd = wd
        tag = f"livemig-bench-{os.getpid()}-{time.monotonic_ns()}"
        self._src_ram = Path("/dev/shm") / f"{tag}-src.ram"
        self._dst_ram = Path("/dev/shm") / f"{tag}-dst.ram"
        with open(self._src_ram, "w+b") as f:
            f.truncate(self.size)
            with mmap.mmap(f.fileno(), self.size) as m:
                dst = np.frombuffer(m, np.uint8)
                flat = ram.reshape(-1)
                for at in range(0, self.size, 64 * MIB):  # bounded page-cache churn per step
                    dst[at : at + 64 * MIB] = flat[at : at + 64 * MIB]
                del dst

    def _argv(self, ram: Path, qmp: str, incoming: bool) -> list[str]:
        backend = (f"memory-backend-file,id=pc.ram,size={self.size // MIB}M,mem-path={ram},"
                   f"share=on" + (",prealloc=on" if incoming else ""))  # fmt: skip
        return [
            qemu_path(), "-accel", "tcg", "-machine", "pc,memory-backend=pc.ram", "-cpu", "qemu64",
            "-smp", "1", "-m", f"{self.size // MIB}M", "-object", backend, "-nodefaults",
            "-display", "none", "-S", "-qmp", f"unix:{qmp},server=on,wait=off",
            *(["-incoming", "defer"] if incoming else []),
        ]  # fmt: skip

    def _start(self, name: str, ram: Path, incoming: bool) -> GuestProcess:
        qmp = self.wd.sock(name)
        p = GuestProcess(self._argv(ram, qmp, incoming), qmp, console="none", name=f"QEMU {name}")
        try:
            p.wait_qmp(60)
            deadline = time.monotonic() + 30
            while True:  # the socket file appears at bind(), a moment before QEMU listens
                try:
                    with p.qmp(timeout=5):
                        return p
                except LivemigError:
                    p.check_alive()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            p.stop()
            raise

    def migrate(self, channels: int, port: int) -> dict[str, Any]:
        """One migration with ``channels`` multifd channels (0: without multifd) to a fresh
        destination listening on ``port``; throughput (bytes/s) and CPU s/GB of both QEMUs."""
        src = self._start("qsrc", self._src_ram, incoming=False)
        try:
            dst = self._start("qdst", self._dst_ram, incoming=True)
        except BaseException:
            src.stop()
            raise
        try:
            caps = {"multifd": channels > 0}
            params: dict[str, Any] = {"multifd-channels": channels} if channels else {}
            with src.qmp() as sq, dst.qmp() as dq:
                set_migration(dq, caps, params)
                set_migration(sq, caps, {**params, "max-bandwidth": 1 << 40,
                                         "downtime-limit": 300})  # fmt: skip
                uri = f"tcp:127.0.0.1:{port}"
                dq.command("migrate-incoming", uri=uri)
                cpu0 = process_cpu(src.pid) + process_cpu(dst.pid)
                sq.command("migrate", uri=uri)
                try:
                    q = wait_migration_end(lambda: sq.command("query-migrate"), 600,
                                           "QEMU baseline migration")  # fmt: skip
                except MigrationError:
                    sq.command("migrate_cancel")
                    raise
                cpu = process_cpu(src.pid) + process_cpu(dst.pid) - cpu0
            if q["status"] != "completed":
                raise MigrationError(f"QEMU baseline migration {q['status']}: "
                                     f"{q.get('error-desc', dst.stderr_tail())}")  # fmt: skip
            active = (q["total-time"] - q.get("setup-time", 0)) / 1000
            return {"throughput": self.size / active, "cpu_per_gb": cpu / (self.size / 1e9),
                    "seconds": active, "qemu": qemu_label()}  # fmt: skip
        finally:
            dst.stop()
            src.stop()
            self._dst_ram.unlink(missing_ok=True)

    def close(self) -> None:
        self._src_ram.unlink(missing_ok=True)
        self._dst_ram.unlink(missing_ok=True)
