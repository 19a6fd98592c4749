"""Compiling guest programs into flat images, with a cache keyed by everything that matters.

Theory of operation: a guest is one C file plus the runtime (``src/entry.S``,
``src/runtime.c``, ``src/livemig.h``, linked by ``src/guest.ld`` at ``abi.LOAD_ADDR``). The
machine's C compiler builds an ELF, ``objcopy -O binary`` flattens it, with ``.bss`` given file
contents so the image length covers it (the machine puts the heap right after the image). The
result is cached as ``<name>-<key>.bin`` where the key hashes the sources, the headers next to
the program, the flags and the compiler's version: any change rebuilds, nothing else does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livemig import cbuild
from livemig.errors import BuildError, GuestBuildError, UsageError
from livemig.machine import abi

SRC_DIR = Path(__file__).resolve().parent / "src"
RUNTIME_SOURCES = ("entry.S", "runtime.c")
LINKER_SCRIPT = "guest.ld"

BUILTIN_GUESTS: dict[str, str] = {
    "memstress": "the migration workload: dirties a working set, checkable at any instant",
    "compute": "CPU-bound hashing, reports operations per second",
    "idle": "waits on the clock, prints a heartbeat each second",
    "kvserver": "a Redis-protocol key-value store reached through the livemig-ring device",
}

CFLAGS = (
    "-O2",
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-no-pie",
    "-mno-red-zone",
    "-fno-stack-protector",
    # Without this gcc may turn a copy or clear loop into a call to memcpy/memset, which
    # inside memcpy/memset themselves would recurse forever.
    "-fno-tree-loop-distribute-patterns",
    "-fno-asynchronous-unwind-tables",
    "-Wall",
    "-Wno-main",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
)


@dataclass(frozen=True)
class GuestImage:
    """A built guest: ``data`` is the flat image to load at ``abi.LOAD_ADDR``."""

    name: str
    data: bytes
    path: Path
    source: Path

    @property
    def load_addr(self) -> int:
        return abi.LOAD_ADDR

    def __repr__(self) -> str:
        return f"GuestImage({self.name!r}, {len(self.data)} bytes, {str(self.path)!r})"


def builtin_guests() -> list[str]:
    """Names of the guests shipped with livemig, sorted."""
    return sorted(BUILTIN_GUESTS)


def cache_dir() -> Path:
    """Where built images live: ``$LIVEMIG_CACHE/guests`` or ``~/.cache/livemig/guests``."""
    return cbuild.cache_root() / "guests"


def find_compiler() -> str:
    """The C compiler to use: ``$CC`` if set, else gcc, else cc."""
    try:
        return cbuild.find_compiler()
    except BuildError as exc:
        raise GuestBuildError(str(exc)) from None


def find_objcopy() -> str:
    path = shutil.which(os.environ.get("OBJCOPY", "objcopy"))
    if not path:
        raise GuestBuildError(
            "objcopy not found; it flattens guests into images: `apt-get install binutils`"
        )
    return path


def resolve_source(guest: str | os.PathLike[str]) -> tuple[str, Path]:
    """Map a built-in name or a path to a C file onto (image name, source path)."""
    text = os.fspath(guest)
    if text in BUILTIN_GUESTS:
        return text, SRC_DIR / f"{text}.c"
    path = Path(text)
    if path.suffix == ".c" or os.sep in text or path.exists():
        if not path.is_file():
            raise UsageError(f"guest source {text!r} does not exist or is not a file")
        if path.suffix != ".c":
            raise UsageError(f"guest source {text!r} is not a C file (expected a .c file)")
        return path.stem, path.resolve()
    raise UsageError(
        f"unknown guest {text!r}: the built-in guests are {', '.join(builtin_guests())};"
        " or give the path to your own freestanding .c file"
    )


def _inputs(source: Path) -> list[Path]:
    """Every file the build reads: runtime, linker script, and the headers beside the program."""
    files = [SRC_DIR / n for n in (*RUNTIME_SOURCES, LINKER_SCRIPT)]
    files += sorted(SRC_DIR.glob("*.h"))
    if source.parent != SRC_DIR:
        files += sorted(source.parent.glob("*.h"))
    return [*files, source]


def cache_key(source: Path, cc: str, objcopy: str) -> str:
    """Hash of the sources, flags and tool versions that determine the image."""
    return _guest_errors(cbuild.hash_inputs, CFLAGS, [cc, objcopy], _inputs(source))


def build_guest(
    guest: str | os.PathLike[str], *, rebuild: bool = False, cache: Path | None = None
) -> GuestImage:
    """Build (or take from the cache) the guest ``guest``: a built-in name or a .c path.

    Raises ``UsageError`` for an unknown name or a missing file, ``GuestBuildError`` when no
    compiler is installed or the program does not compile (with the compiler's message).
    """
    name, source = resolve_source(guest)
    cc, objcopy = find_compiler(), find_objcopy()
    key = cache_key(source, cc, objcopy)
    out_dir = cache or cache_dir()
    target = out_dir / f"{name}-{key}.bin"
    if rebuild or not target.is_file():
        data = _compile(name, source, cc, objcopy)
        _store(target, data)
    else:
        data = target.read_bytes()
    return GuestImage(name=name, data=data, path=target, source=source)


def _guest_errors(fn: Any, *args: Any) -> Any:
    """Call a ``cbuild`` helper, its failures reported as ``GuestBuildError``."""
    try:
        return fn(*args)
    except GuestBuildError:
        raise
    except BuildError as exc:
        raise GuestBuildError(str(exc)) from exc.__cause__


def _run(cmd: list[str], what: str, cwd: Path) -> None:
    _guest_errors(cbuild.run_tool, cmd, what, cwd)


def _compile(name: str, source: Path, cc: str, objcopy: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix=f"livemig-guest-{name}-") as tmp:
        work = Path(tmp)
        elf = work / f"{name}.elf"
        flat = work / f"{name}.bin"
        cmd = [
            cc,
            *CFLAGS,
            f"-I{SRC_DIR}",
            "-T",
            str(SRC_DIR / LINKER_SCRIPT),
            "-o",
            str(elf),
            *(str(SRC_DIR / n) for n in RUNTIME_SOURCES),
            str(source),
        ]
        _run(cmd, f"compiling guest {name!r} ({source})", work)
        # .bss gets contents so the flat image covers it: see the module docstring.
        flatten = [objcopy, "-O", "binary", "--set-section-flags", ".bss=alloc,load,contents"]
        _run([*flatten, str(elf), str(flat)], f"flattening guest {name!r}", work)
        data = flat.read_bytes()
    if not data:
        raise GuestBuildError(f"guest {name!r} ({source}) built into an empty image")
    return data


def _store(target: Path, data: bytes) -> None:
    _guest_errors(cbuild.store, target, data)
