"""Real QEMU as the in-run baseline of the migration benchmarks (../shared/design/qemu-baseline.md).

Which QEMU: today's, 10.0 (``./dev setup`` installs it beside Debian's 7.2; ``$LIVEMIG_QEMU``
points elsewhere), else whatever ``qemu-system-x86_64`` is on PATH (``livemig.testing.qemu``).
Every label and JSON record names the version that ran (``qemu_label()``: "QEMU 10.0.2").

The guest is Debian's kernel with a tiny initramfs whose ``/init`` is a static C program, the
*dirtier*: it reads ``dirty=N,R[,C]`` from the kernel command line (the kernel hands unknown
``key=value`` words to init as environment variables), touches a working set of N MiB, then
writes one byte per 4 KiB page at R MiB/s (R = 0: idle; a fraction allowed) and prints a
heartbeat every second. With C it fills the working set first as memstress ``comp=C`` does
(C percent of the pages compress, the rest are incompressible: ``dirty_arg``), so that
compression sees the same memory on both.
The baseline doc used busybox for ``/init``; a single static program needs no shell, no
busybox-static package and no ``cpio`` tool (the newc archive is written here), and runs the
same workload.

Everything is built once into the livemig cache (``$LIVEMIG_CACHE`` or ~/.cache/livemig, under
``qemu-baseline/``): the kernel comes from ``apt-get download`` + ``dpkg-deb -x`` of a Debian
package (only when the QEMU baseline is asked for), the initramfs from gcc -static.

QEMU runs with TCG only (KVM hangs on these machines), ``-machine pc -cpu qemu64 -smp 1``; a
QEMU before 9.0 gets an unaligned RAM size (1 GiB + 8 KiB for ``1G``): it loses dirty pages with
TCG when a RAM block is a multiple of 256 KiB, and the unaligned size forces its per-page path
(fixed in 9.0).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from livemig.bench.common import GuestProcess, MigrationFigures, Workdir, drive_migration
from livemig.errors import GuestBuildError, MigrationError, UsageError
from livemig.testing.qemu import QemuBinary, default_qemu

KERNEL_PACKAGE = os.environ.get("LIVEMIG_BASELINE_KERNEL", "linux-image-6.1.0-56-amd64")
UNALIGN_KIB = 8  # see the module docstring: QEMU 7.2's lost-dirty-pages bug
BOOT_TIMEOUT = 90.0

DIRTIER_C = r"""
/* /init of the QEMU baseline guest: fill N MiB, then dirty one page at a time at R MiB/s.
 * dirty=N,R[,C]: R may have a fraction (2000 pages/s = 7.8125). Without C every page of the
 * working set gets one byte; with C (0..100) every page is filled as memstress comp=C fills
 * its own (seed 1): word 0 the counter, words 1..511 a hash of the page index xor j times a
 * constant, where C percent of the pages use j & 7 (repeating every 8 words: compressible)
 * and the rest j (incompressible). Keep in step with guests/src/memstress.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define STEP 0x9E3779B97F4A7C15UL
#define SEED_MULT 0xD6E8FEB86659FD93UL

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned long page_hash(unsigned long seed, unsigned long p)
{
	unsigned long z = (p ^ (seed * SEED_MULT)) + STEP;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
	return z ^ (z >> 31);
}

int main(void)
{
	long ws_mb = 0, comp = -1;
	double rate_mb = 0;
	const char *d = getenv("dirty");
	if (d)
		sscanf(d, "%ld,%lf,%ld", &ws_mb, &rate_mb, &comp);
	setvbuf(stdout, NULL, _IOLBF, 0);
	size_t pages = (size_t)ws_mb * 256;
	volatile unsigned char *p = pages ? malloc(pages * 4096) : NULL;
	for (size_t i = 0; i < pages; i++) {
		if (comp < 0) {
			p[i * 4096] = 1;
			continue;
		}
		volatile unsigned long *w = (volatile unsigned long *)(p + i * 4096);
		unsigned long h = page_hash(1, i);
		unsigned long mask = page_hash(1 ^ 0xC0, i) % 100 < (unsigned long)comp ? 7 : ~0UL;
		for (unsigned long j = 1; j < 512; j++)
			w[j] = h ^ ((j & mask) * STEP);
		w[0] = 0;
	}
	if (getenv("dirtier_dump")) { /* the host-side test: the filled working set to stdout */
		fwrite((const void *)p, 4096, pages, stdout);
		return 0;
	}
	printf("dirtier: ready ws=%ld MiB rate=%g MiB/s comp=%ld\n", ws_mb, rate_mb, comp);
	double rate = rate_mb * 256.0, t0 = now(), last = t0;
	unsigned long written = 0, beat = 0, next = 0;
	for (;;) {
		if (pages && rate > 0) {
			double due = t0 + written / rate, t = now();
			if (due > t) {
				struct timespec ts = {0, (long)((due - t) * 1e9)};
				nanosleep(&ts, NULL);
			}
			unsigned long batch = (unsigned long)(rate / 1000) + 1;
			for (unsigned long k = 0; k < batch; k++) {
				p[next * 4096]++;
				next = (next + 1) % pages;
			}
			written += batch;
		} else {
			struct timespec ts = {0, 100000000};
			nanosleep(&ts, NULL);
		}
		double t = now();
		if (t - last >= 1.0) {
			last = t;
			printf("dirtier: beat %lu written %lu\n", ++beat, written);
		}
	}
}
"""


def dirty_arg(ws_mib: int, pages_per_s: int, comp: int | None = None) -> str:
    """The dirtier's kernel argument for a working set of ``ws_mib`` MiB dirtied at
    ``pages_per_s`` 4 KiB pages a second (memstress ``rate=``), filled as memstress ``comp=``
    fills its own when ``comp`` is given."""
    if ws_mib < 0 or pages_per_s < 0:
        raise UsageError(f"dirtier: ws {ws_mib} MiB and rate {pages_per_s} pages/s must be >= 0")
    if comp is not None and not 0 <= comp <= 100:
        raise UsageError(f"dirtier: comp={comp} is a percentage (0..100)")
    rate = f"{pages_per_s / 256:.6f}".rstrip("0").rstrip(".")  # exact: a multiple of 2^-8
    return f"dirty={ws_mib},{rate}" + ("" if comp is None else f",{comp}")


def cache_dir() -> Path:
    """``$LIVEMIG_CACHE/qemu-baseline`` or ``~/.cache/livemig/qemu-baseline``."""
    root = os.environ.get("LIVEMIG_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "livemig"
    return base / "qemu-baseline"


@functools.cache
def qemu_binary() -> QemuBinary | None:
    """The QEMU the benchmarks run: 10.0 by default (see the module docstring)."""
    return default_qemu()


def qemu_available() -> bool:
    return qemu_binary() is not None


def qemu_path() -> str:
    q = qemu_binary()
    if q is None:
        raise UsageError("no QEMU: ./dev setup installs QEMU 10.0 (or set LIVEMIG_QEMU)")
    return q.path


def qemu_label() -> str:
    """ "QEMU 10.0.2": the version measured, for every label and record."""
    q = qemu_binary()
    return q.label if q is not None else "QEMU (not installed)"


def unaligned_kib() -> int:
    """Extra KiB of RAM that keep a QEMU before 9.0 off its lost-dirty-pages path."""
    q = qemu_binary()
    return UNALIGN_KIB if q is not None and not q.at_least(9) else 0


def fetch_kernel(cache: Path | None = None, package: str = KERNEL_PACKAGE) -> Path:
    """The Debian kernel image, downloaded with ``apt-get download`` once and cached."""
    cache = cache or cache_dir()
    target = cache / f"vmlinuz-{package}"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        os.chmod(tmp, 0o777)  # apt's _apt user downloads into it without a sandbox warning
        res = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        debs = list(Path(tmp).glob("*.deb"))
        if res.returncode != 0 or not debs:
            raise GuestBuildError(
                f"apt-get download {package} failed ({res.returncode}): {res.stderr.strip()[-500:]}"
                " (set LIVEMIG_BASELINE_KERNEL to an available linux-image-*-amd64 package)"
            )
        tree = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], check=True, timeout=300)
        images = sorted(tree.glob("boot/vmlinuz-*"))
        if not images:
            raise GuestBuildError(f"{debs[0].name}: no boot/vmlinuz-* inside")
        shutil.copyfile(images[0], target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)
    return target


def _newc_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One entry of a ``newc`` cpio archive (the format the kernel unpacks as initramfs)."""
    ino = _newc_entry.counter = getattr(_newc_entry, "counter", 0) + 1  # type: ignore[attr-defined]
    nb = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, rdev[0],
              rdev[1], len(nb), 0)  # fmt: skip
    head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + nb
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def newc_archive(files: dict[str, bytes], dirs: list[str], chardevs: dict[str, tuple[int, int]]
                 ) -> bytes:  # fmt: skip
    """A newc cpio archive with directories, executable files and character devices."""
    out = [_newc_entry(d, 0o040755) for d in dirs]
    out += [_newc_entry(n, 0o020600, rdev=r) for n, r in chardevs.items()]
    out += [_newc_entry(n, 0o100755, data) for n, data in files.items()]
    out.append(_newc_entry("TRAILER!!!", 0))
    blob = b"".join(out)
    return blob + b"\0" * (-len(blob) % 512)


def build_initramfs(cache: Path | None = None) -> Path:
    """The dirtier compiled statically, packed as ``/init`` with ``/dev/console``."""
    import hashlib

    cache = cache or cache_dir()
    key = hashlib.sha256(DIRTIER_C.encode()).hexdigest()[:12]
    target = cache / f"initramfs-{key}.cpio"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "dirtier.c", Path(tmp) / "init"
        src.write_text(DIRTIER_C)
        res = subprocess.run([cc, "-static", "-O2", "-o", str(exe), str(src)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        if res.returncode != 0:
            raise GuestBuildError(f"{cc} -static dirtier.c failed: {res.stderr.strip()[-800:]}")
        blob = newc_archive({"init": exe.read_bytes()}, ["dev", "proc"], {"dev/console": (5, 1)})
    target.with_suffix(".tmp").write_bytes(blob)
    os.replace(target.with_suffix(".tmp"), target)
    return target


def qemu_argv(
    memory: int, kernel: Path, initrd: Path, append: str, qmp: str, serial: str,
    incoming: bool = False, smp: int = 1,
) -> list[str]:  # fmt: skip
    """The QEMU command line of the baseline (``memory`` in bytes, made unaligned for a QEMU
    before 9.0; ``smp`` vCPUs, 1 unless a bench matches another count)."""
    kib = memory // 1024 + unaligned_kib()
    argv = [
        qemu_path(), "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64", "-smp", str(smp),
        "-nodefaults", "-display", "none", "-m", f"{kib}k",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-chardev", f"socket,id=ser0,path={serial},server=on,wait=off", "-serial", "chardev:ser0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def qemu_pair(wd: Workdir, memory: int, kernel: Path, initrd: Path, append: str,
              smp: int = 1, prefixes: tuple[list[str], list[str]] = ([], [])
              ) -> tuple[GuestProcess, GuestProcess]:  # fmt: skip
    """A QEMU source and an ``-incoming defer`` destination of the baseline guest, their QMP
    and console sockets in ``wd``; ``prefixes``: what each command line runs under (``ip netns
    exec NAME`` for two hosts)."""
    src = GuestProcess([*prefixes[0], *qemu_argv(memory, kernel, initrd, append, wd.sock("sq"),
                                                 wd.sock("ss"), smp=smp)],
                       wd.sock("sq"), console=wd.sock("ss"), name="qemu source")  # fmt: skip
    dst = GuestProcess([*prefixes[1], *qemu_argv(memory, kernel, initrd, append, wd.sock("dq"),
                                                 wd.sock("ds"), incoming=True, smp=smp)],
                       wd.sock("dq"), console=wd.sock("ds"), name="qemu destination")  # fmt: skip
    return src, dst


def run_qemu_migration(
    memory: int,
    ws_mib: int,
    rate_mib: int,
    *,
    params: dict[str, object],
    port: int,
    timeout: float = 120.0,
    kernel: Path | None = None,
    initrd: Path | None = None,
) -> MigrationFigures:
    """Boot the baseline guest on a QEMU source, migrate it to a QEMU destination, measure.

    Integrity: after the migration the destination guest must keep printing heartbeats and
    must not print a kernel oops or panic.
    """
    kernel = kernel or fetch_kernel()
    initrd = initrd or build_initramfs()
    append = f"console=ttyS0 quiet panic=-1 dirty={ws_mib},{rate_mib}"
    with Workdir() as wd:
        src, dst = qemu_pair(wd, memory, kernel, initrd, append)
        try:
            for p in (src, dst):
                p.wait_qmp(20.0)
                p.connect_console()
            src.wait_line(lambda ln: ln.startswith("dirtier: beat"), BOOT_TIMEOUT)
            fig, _ = drive_migration(src, dst, port=port, params=params, timeout=timeout)
            fig.guest_ram = memory
            fig.vm = qemu_label()
            if fig.status == "completed":
                after = time.monotonic()
                try:
                    dst.wait_line(lambda ln: ln.startswith("dirtier: beat"), 10.0, since=after)
                    bad = [ln for _, ln in dst.console_lines()
                           if any(w in ln for w in ("Oops", "Kernel panic", "BUG:"))]  # fmt: skip
                    fig.ok = not bad
                    if bad:
                        fig.notes.append(f"destination kernel: {bad[0]}")
                except MigrationError as exc:
                    fig.notes.append(f"destination guest silent after migration: {exc}")
        finally:
            src.stop()
            dst.stop()
        fig.src_rss, fig.dst_rss = src.peak_rss, dst.peak_rss
    return fig
