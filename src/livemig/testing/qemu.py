"""Where the real QEMUs are: QEMU 10.0 (today's reference) and Debian bookworm's QEMU 7.2.

``./dev setup`` installs both (see its ``setup_qemu10``): 7.2 with apt as
``/usr/bin/qemu-system-x86_64``, 10.0 from bookworm-backports unpacked into the livemig cache,
``$LIVEMIG_CACHE/qemu-10.0/bin/qemu-system-x86_64`` (a wrapper adding the firmware paths).

- ``find_qemu("10.0")``: ``$LIVEMIG_QEMU`` if set (any QEMU the user wants measured or tested
  as today's; its version is read, not assumed), else the cache's 10.0; None when absent.
- ``find_qemu("7.2")``: ``$LIVEMIG_QEMU_7_2`` if set, else ``qemu-system-x86_64`` on PATH when
  it is 7.2.
- ``qemu_version(binary)``: ``(major, minor, micro)`` from ``--version`` (cached).

Tests and benches name the version they ran in their labels and records (``QemuBinary.label``:
"QEMU 10.0.2"), so a figure or a failure never says 7.2 when another QEMU ran.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REFERENCE = "10.0"
UNALIGNED_KIB = 65536 + 8  # 64 MiB + 8 KiB: see QemuVM


def cache_dir() -> Path:
    """``$LIVEMIG_CACHE`` or ``~/.cache/livemig`` (where ``./dev`` puts QEMU 10.0)."""
    root = os.environ.get("LIVEMIG_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "livemig"


@dataclass(frozen=True)
class QemuBinary:
    """A QEMU executable and the version it reports."""

    path: str
    version: tuple[int, int, int]

    @property
    def series(self) -> str:
        """``"10.0"``: major.minor, as machine types and docs name a QEMU."""
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def label(self) -> str:
        """``"QEMU 10.0.2"``, for benchmark labels and records."""
        return "QEMU " + ".".join(map(str, self.version))

    def at_least(self, major: int, minor: int = 0) -> bool:
        return self.version[:2] >= (major, minor)


@functools.cache
def qemu_version(binary: str) -> tuple[int, int, int] | None:
    """The version ``binary --version`` reports, or None if it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or m is None:
        return None
    return int(m[1]), int(m[2]), int(m[3])


def _binary(path: str | None) -> QemuBinary | None:
    if not path:
        return None
    resolved = shutil.which(path)
    if resolved is None:
        return None
    version = qemu_version(resolved)
    return QemuBinary(resolved, version) if version else None


def find_qemu(series: str = REFERENCE) -> QemuBinary | None:
    """The QEMU of ``series`` ("10.0": today's, overridable; "7.2": Debian bookworm's)."""
    if series == REFERENCE:
        env = os.environ.get("LIVEMIG_QEMU")
        if env:
            return _binary(env)
        return _binary(str(cache_dir() / "qemu-10.0" / "bin" / "qemu-system-x86_64"))
    if series == "7.2":
        env = os.environ.get("LIVEMIG_QEMU_7_2")
        found = _binary(env or "qemu-system-x86_64")
        if found is not None and (env or found.series == "7.2"):
            return found
        return None
    raise ValueError(f"unknown QEMU series {series!r} (10.0 or 7.2)")


def default_qemu() -> QemuBinary | None:
    """What a benchmark runs beside livemig: today's QEMU, else whatever QEMU is on PATH."""
    return find_qemu(REFERENCE) or _binary("qemu-system-x86_64")


class QemuVM:
    """One QEMU process for a test: ``-M pc`` under TCG, stopped (``-S``; ``paused=False``: a
    destination that runs its guest once loaded), QMP on a unix
    socket, RAM (``pc.ram``) in a /dev/shm file whose bytes are the block's contents (the truth
    a decoded stream is compared with, see ../shared/fixtures/qemu/README.md).

    ``boot``: a 512-byte boot sector to run from an IDE disk; ``incoming``: start with
    ``-incoming defer``; ``tls``: a credentials directory, object ``tls0`` (the server end with
    ``incoming``). ``stop()`` kills it by pid and removes the RAM file.

    ``memory_kib``: RAM size. QEMU before 9.0 loses dirty pages under TCG when a RAM block is a
    multiple of 256 KiB (../shared/design/qemu-baseline.md): a test of several passes on such
    a QEMU gives an unaligned size (``UNALIGNED_KIB``), which makes it sync page by page.
    """

    def __init__(self, qemu: QemuBinary, workdir: Path, name: str, *, memory_kib: int = 65536,
                 boot: bytes | None = None, incoming: bool = False, tls: str = "",
                 paused: bool = True, extra: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.qemu = qemu
        self.name = name
        self.ram_path = Path("/dev/shm") / f"livemig-test-{name}-{os.getpid()}-{workdir.name}.ram"
        self.qmp_path = workdir / f"qmp-{name}.sock"
        size = f"{memory_kib}K"
        cmd = [
            qemu.path, "-M", "pc,memory-backend=pc.ram", "-m", size, "-accel", "tcg",
            "-object", f"memory-backend-file,id=pc.ram,size={size},mem-path={self.ram_path},share=on",
            "-display", "none", "-nodefaults", *(["-S"] if paused else []),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if boot is not None:
            image = workdir / f"boot-{name}.img"
            image.write_bytes(boot)
            cmd += ["-drive", f"file={image},format=raw,if=ide,snapshot=on"]
        if incoming:
            cmd += ["-incoming", "defer"]
        if tls:
            endpoint = "server" if incoming else "client"
            cmd += ["-object", f"tls-creds-x509,id=tls0,dir={tls},endpoint={endpoint}"]
        cmd += list(extra)
        self.argv = cmd
        self.log = workdir / f"qemu-{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{qemu.label} did not start: {self.stderr()}")
            time.sleep(0.02)

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def ram(self) -> bytes:
        """``pc.ram``'s bytes now (stop the guest first for a stable copy)."""
        return self.ram_path.read_bytes()

    def ram_byte(self, address: int) -> int:
        with open(self.ram_path, "rb") as f:
            f.seek(address)
            return f.read(1)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.ram_path.unlink(missing_ok=True)

    def __enter__(self) -> QemuVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
