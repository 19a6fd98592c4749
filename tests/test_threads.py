"""livemig.threads: the kernel sees a thread's Python name (what top -H, ps -T and perf show)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from livemig import threads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().rstrip("\n")


def _started(name: str) -> str:
    seen: list[str] = []
    t = threads.Thread(target=lambda: seen.append(_comm(threading.get_native_id())), name=name)
    t.start()
    t.join(5)
    return seen[0]


def test_the_kernel_name_is_the_python_name() -> None:
    assert _started("multifdsend_0") == "multifdsend_0"
    assert _started("return path") == "return path"


def test_a_long_name_keeps_its_first_15_bytes_whole_characters_only() -> None:
    assert _started("mapped-ram-load_12") == "mapped-ram-load"
    # 'é' is two bytes: a cut inside it drops the whole character
    assert _started("abcdefghijklmné") == "abcdefghijklmn"


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14 names native threads itself")
def test_a_plain_thread_keeps_the_process_name() -> None:
    main = _comm(threading.get_native_id())
    seen: list[str] = []
    t = threading.Thread(target=lambda: seen.append(_comm(threading.get_native_id())),
                         name="not-renamed")  # fmt: skip
    t.start()
    t.join(5)
    assert seen == [main]
