"""Compiling C with the machine's compiler, into a cache keyed by everything that matters.

livemig builds two kinds of C: guest programs (``livemig.guests.build``: freestanding, linked
into flat images) and small host libraries loaded with ``ctypes`` (``build_host_library``: the
vCPU stop hook, the compute guest's reference). Both share what is here: the compiler lookup,
the tool versions that go into cache keys, running a tool with a time-out and the compiler's
message on failure, and an atomic store, so that parallel processes building the same thing
never see half a file. A cache key hashes the sources, the flags and the compiler's version:
any change rebuilds, nothing else does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from livemig.errors import BuildError

COMPILE_TIMEOUT = 120.0
HOST_CFLAGS = ("-O2", "-std=gnu11", "-shared", "-fPIC", "-Wall", "-Werror")


def cache_root() -> Path:
    """``$LIVEMIG_CACHE`` or ``~/.cache/livemig``."""
    root = os.environ.get("LIVEMIG_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "livemig"


def find_compiler() -> str:
    """The C compiler to use: ``$CC`` if set, else gcc, else cc."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "cc"]
    for cand in candidates:
        path = shutil.which(cand)
        if path:
            return path
    raise BuildError(
        f"no C compiler found (looked for {', '.join(candidates)}); livemig builds its guests"
        " and its vCPU stop hook with the machine's C compiler: `apt-get install gcc`"
    )


@functools.lru_cache(maxsize=8)
def tool_version(tool: str) -> str:
    """The first line of ``tool --version`` (part of every cache key)."""
    try:
        proc = subprocess.run(
            [tool, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise BuildError(f"cannot run {tool}: {exc}") from exc
    return proc.stdout.splitlines()[0] if proc.stdout else f"{tool} (unknown version)"


def hash_inputs(flags: Sequence[str], tools: Sequence[str], files: Sequence[Path]) -> str:
    """A 16-hex-digit key over flags, tool versions and the names and bytes of ``files``."""
    h = hashlib.sha256()
    for item in (*flags, *(tool_version(t) for t in tools)):
        h.update(item.encode() + b"\0")
    for path in files:
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def run_tool(cmd: list[str], what: str, cwd: Path) -> None:
    """Run ``cmd``; a failure raises ``BuildError`` with the tool's own message."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{what}: timed out after {COMPILE_TIMEOUT:.0f} s") from exc
    except OSError as exc:
        raise BuildError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{message}")


def store(target: Path, data: bytes) -> None:
    """Write atomically: parallel builds of the same thing must never see half a file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        raise BuildError(f"cannot write {target} into the build cache: {exc}") from exc


def build_host_library(
    name: str,
    source: Path,
    *,
    headers: Sequence[Path] = (),
    rebuild: bool = False,
) -> Path:
    """Build ``source`` into a shared library for this host (cached) and return its path.

    ``headers`` are the files it includes (they go into the key); their folders are on the
    include path.
    """
    cc = find_compiler()
    includes = sorted({f"-I{h.parent}" for h in headers})
    flags = (*HOST_CFLAGS, *includes)
    key = hash_inputs(flags, [cc], [*headers, source])
    target = cache_root() / "native" / f"{name}-{key}.so"
    if rebuild or not target.is_file():
        with tempfile.TemporaryDirectory(prefix=f"livemig-{name}-") as tmp:
            out = Path(tmp) / f"{name}.so"
            run_tool([cc, *flags, "-o", str(out), str(source)], f"compiling {name}", Path(tmp))
            store(target, out.read_bytes())
    return target
