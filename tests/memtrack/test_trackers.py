"""Every dirty-tracking backend: found writes, clean pages, races with sync, mark_dirty, teardown."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time

import numpy as np
import pytest

from livemig.errors import LivemigError, MachineError, UsageError
from livemig.memtrack import TRACKERS, DirtyTracker, open_tracker, probe

BACKENDS = list(TRACKERS)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    reason = probe(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} unavailable here: {reason}")
    return request.param


def dirty_pages(tracker: DirtyTracker, name: str = "pc.ram") -> list[int]:
    return np.flatnonzero(tracker.sync()[name]).tolist()


def test_writes_from_python_are_found_and_clean_pages_are_not(backend, ram) -> None:
    ram.array[4096 * 7] = 1  # before start: must not count
    with open_tracker([ram.region], backend) as tracker:
        assert isinstance(tracker, DirtyTracker)
        assert tracker.name == backend
        tracker.start()
        assert dirty_pages(tracker) == []
        ram.array[4096 * 3 + 17] = 5
        ram.view[4096 * 200] = 9
        ram.words[ram.npages - 1, 511] = 1
        assert dirty_pages(tracker) == [3, 200, ram.npages - 1]
        assert dirty_pages(tracker) == []  # re-armed: nothing new
        ram.words[3, 0] += 1  # a page reported before is tracked again
        assert dirty_pages(tracker) == [3]


def test_numpy_bulk_writes_and_bitmap_shape(backend, two_rams) -> None:
    a, b = two_rams
    with open_tracker([a.region, b.region], backend) as tracker:
        tracker.start()
        a.words[::2, 0] += 1  # every other page
        b.array[:] = 0xFF  # the whole block
        bitmaps = tracker.sync()
        assert set(bitmaps) == {"pc.ram", "vga.vram"}
        assert bitmaps["pc.ram"].dtype == bool and bitmaps["pc.ram"].shape == (a.npages,)
        assert np.array_equal(np.flatnonzero(bitmaps["pc.ram"]), np.arange(0, a.npages, 2))
        assert bitmaps["vga.vram"].all()


def test_gil_free_writes_from_another_thread(backend, ram) -> None:
    """ctypes.memset releases the GIL, like a unicorn vCPU storing into guest RAM."""
    pages = [1, 2, 64, 513, ram.npages - 2]
    with open_tracker([ram.region], backend) as tracker:
        tracker.start()

        def vcpu() -> None:
            for p in pages:
                ctypes.memset(ram.region.host_addr + p * 4096 + 100, 0x5A, 8)

        thread = threading.Thread(target=vcpu)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
        assert dirty_pages(tracker) == pages
        assert ram.array[pages[0] * 4096 + 100] == 0x5A


def test_write_racing_sync_is_never_lost(backend, ram) -> None:
    """A writer bumps per-page counters while the main thread syncs over and over: any page
    whose counter moved after sync k must be reported by a later sync."""
    npages = ram.npages
    stride = 97  # coprime with npages: the writer visits pages in a scattered order
    stop = threading.Event()

    def writer() -> None:
        i = 0
        words = ram.words
        while not stop.is_set():
            for _ in range(64):
                words[(i * stride) % npages, 0] += 1
                i += 1
            time.sleep(0)

    with open_tracker([ram.region], backend) as tracker:
        tracker.start()
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            snapshots, reports = [], []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                reports.append(tracker.sync()["pc.ram"])
                snapshots.append(ram.words[:, 0].copy())
        finally:
            stop.set()
            thread.join(10)
        assert not thread.is_alive()
        reports.append(tracker.sync()["pc.ram"])
        final = ram.words[:, 0].copy()
    assert len(snapshots) > 5
    # later[k] = pages reported by any sync after snapshot k
    later = np.zeros(npages, dtype=bool)
    for k in range(len(snapshots) - 1, -1, -1):
        later |= reports[k + 1]
        moved = snapshots[k] != final
        lost = np.flatnonzero(moved & ~later)
        assert lost.size == 0, f"sync {k}: pages {lost[:10].tolist()} changed but never reported"
    assert final.any()


def test_mark_dirty_merges_host_writes(backend, two_rams) -> None:
    a, b = two_rams
    with open_tracker([a.region, b.region], backend) as tracker:
        tracker.start()
        tracker.mark_dirty("vga.vram", 4096 * 2 + 10, 4096)  # spans pages 2 and 3
        tracker.mark_dirty("pc.ram", 0, 1)
        tracker.mark_dirty("pc.ram", 4096 * 9, 0)  # empty: nothing
        a.array[4096 * 5] += 1
        bitmaps = tracker.sync()
        assert np.flatnonzero(bitmaps["vga.vram"]).tolist() == [2, 3]
        assert np.flatnonzero(bitmaps["pc.ram"]).tolist() == [0, 5]
        assert dirty_pages(tracker, "vga.vram") == []
        with pytest.raises(UsageError, match="outside the region"):
            tracker.mark_dirty("vga.vram", b.region.length - 1, 2)
        with pytest.raises(UsageError, match="unknown region 'nope'"):
            tracker.mark_dirty("nope", 0, 1)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_stop_releases_everything_and_restart_works(backend, ram) -> None:
    tracker = open_tracker([ram.region], backend)
    fds, threads = _fds(), _native_threads()
    tracker.start()
    ram.array[0] += 1
    assert dirty_pages(tracker) == [0]
    tracker.stop()
    tracker.stop()  # idempotent
    # listdir itself opens one fd, equally in both calls
    assert _fds() == fds
    assert _native_threads() == threads
    ram.array[4096] += 1  # untracked while stopped, and not blocked by a stale protection
    with pytest.raises(MachineError, match="before start"):
        tracker.sync()
    tracker.start()
    assert dirty_pages(tracker) == []
    ram.array[4096 * 2] += 1
    assert dirty_pages(tracker) == [2]
    tracker.stop()
    assert _fds() == fds


def test_start_twice_is_an_error(backend, ram) -> None:
    with open_tracker([ram.region], backend) as tracker:
        tracker.start()
        with pytest.raises(MachineError, match="already running"):
            tracker.start()


def test_auto_picks_async_write_protect_on_this_kernel(ram) -> None:
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) < (6, 7):
        pytest.skip("PAGEMAP_SCAN needs Linux 6.7+")
    assert probe("uffd-wp-async") is None
    assert open_tracker([ram.region]).name == "uffd-wp-async"


def test_bad_arguments_say_what_is_wrong(ram) -> None:
    with pytest.raises(UsageError, match="unknown backend 'kvm'"):
        open_tracker([ram.region], "kvm")
    with pytest.raises(UsageError, match="not page aligned"):
        open_tracker([("x", ram.region.host_addr, 100, ram.view[:100])], "shadow")
    with pytest.raises(UsageError, match="not at host address"):
        open_tracker([("x", ram.region.host_addr, 4096, ram.view[4096:8192])], "shadow")
    with pytest.raises(UsageError, match="share one name"):
        open_tracker([ram.region, ram.region], "shadow")


def test_kernel_refusal_is_a_livemig_error(ram) -> None:
    """A range the kernel refuses (unaligned start) fails with the kernel's reason and the
    request, as a LivemigError, not a bare OSError."""
    from livemig.memtrack.uffd import UFFDIO_REGISTER_MODE_WP, UffdError, Userfaultfd

    with Userfaultfd() as uffd, pytest.raises(UffdError, match=r"UFFDIO_REGISTER 0x.*EINVAL"):
        uffd.register(ram.region.host_addr + 1, 4096, UFFDIO_REGISTER_MODE_WP)
    assert issubclass(UffdError, LivemigError)


def test_dead_wp_handler_is_reported_and_stop_still_releases(ram) -> None:
    """The uffd-wp fault handler process dies: sync says so, and stop() still lifts the
    protection so that writers are not held forever."""
    if probe("uffd-wp") is not None:
        pytest.skip("uffd-wp unavailable here")
    tracker = open_tracker([ram.region], "uffd-wp")
    tracker.start()
    tracker._proc.kill()
    tracker._proc.wait(10)
    with pytest.raises(MachineError, match=r"fault handler process \d+ exited with status -9"):
        tracker.sync()
    tracker.stop()
    ram.array[4096] += 1  # would block forever if the range were still protected
    assert tracker._proc is None


def test_pages_put_back_after_a_failed_send_come_out_of_the_next_sync(backend, ram) -> None:
    with open_tracker([ram.region], backend) as tracker:
        tracker.start()
        ram.words[[4, 9, 10], 0] += 1
        sent = tracker.sync()["pc.ram"]
        assert np.flatnonzero(sent).tolist() == [4, 9, 10]
        tracker.mark_dirty_pages("pc.ram", sent)  # the send failed: all of them again
        tracker.mark_dirty_pages("pc.ram", np.array([1, 2]))
        assert dirty_pages(tracker) == [1, 2, 4, 9, 10]
        assert dirty_pages(tracker) == []
        with pytest.raises(UsageError, match="page index outside"):
            tracker.mark_dirty_pages("pc.ram", np.array([ram.npages]))
        with pytest.raises(UsageError, match="bitmap of 3 pages"):
            tracker.mark_dirty_pages("pc.ram", np.zeros(3, dtype=bool))


def test_final_sync_reports_what_sync_would_and_loses_nothing_after(backend, ram) -> None:
    """``final_sync`` (the post-copy switch, guest stopped for good): the pages written since
    the last sync, host marks included; should tracking go on after all, a later sync may
    report them again but never misses a new write."""
    with open_tracker([ram.region], backend) as tracker:
        tracker.start()
        ram.words[5, 0] += 1
        assert dirty_pages(tracker) == [5]
        ram.words[[3, 9], 0] += 1
        tracker.mark_dirty("pc.ram", 11 * 4096, 1)
        assert np.flatnonzero(tracker.final_sync()["pc.ram"]).tolist() == [3, 9, 11]
        ram.words[20, 0] += 1
        later = dirty_pages(tracker)
        assert 20 in later and set(later) <= {3, 9, 20}  # a superset at most, never 5 or 11
