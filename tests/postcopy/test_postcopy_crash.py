"""A bug in a post-copy helper thread fails the migration with its cause; nothing hangs and no
guest runs on memory it does not have."""

from __future__ import annotations

import time

import numpy as np
import pytest

from livemig.machine.runstate import RunState
from livemig.migration.postcopy_dest import PostcopyIncoming
from livemig.migration.postcopy_source import PostcopySource


class Injected(RuntimeError):
    pass


def _boom(*args: object, **kwargs: object) -> None:
    raise Injected("injected bug")


def _postcopy(p, preempt: bool = False) -> None:
    p.caps(postcopy_ram=True, postcopy_preempt=preempt, events=True)
    p.params(max_bandwidth=16 << 20, max_postcopy_bandwidth=4 << 20)
    p.wait_guest()
    p.start(verify=False)
    p.wait_pass(1)
    p.sm.outgoing.postcopy.start_postcopy()


@pytest.mark.parametrize("where", ["fault thread", "preempt thread"])
def test_destination_thread_crash_fails_the_migration(pair, monkeypatch, where: str) -> None:
    p = pair(ram=32 << 20, append="ws=24M rate=0")
    name = "_on_fault" if where == "fault thread" else "install_one"
    monkeypatch.setattr(PostcopyIncoming, name, _boom)
    _postcopy(p, preempt=where == "preempt thread")
    assert p.wait("dst", {"completed", "failed"}, timeout=20) == "failed"
    q = p.dm.query_migrate()
    assert f"internal error in the post-copy {where}" in q["error-desc"], q
    assert "injected bug" in q["error-desc"]
    # the guest had pages still on the source: it is stopped, never left running on zeros
    assert p.dst.runstate == RunState.INTERNAL_ERROR
    # ... and those pages read as zero, not as the stale bytes that minor faults leave in the
    # page cache until they are filled (but for one a vCPU woken by the teardown, asleep on it,
    # may write before it stops)
    pc = p.dm.incoming.postcopy
    block = p.dst.ram_blocks[0]
    needed = np.flatnonzero(pc.need[block.idstr])
    assert len(needed) > 100
    assert np.count_nonzero(block.pages[needed].any(axis=1)) <= len(p.dst.vcpus)
    # the source ran its guest on the destination already: it must never restart it
    assert p.wait("src", {"postcopy-paused", "failed"}, timeout=20)
    assert p.src.runstate != RunState.RUNNING


def test_source_return_path_crash_pauses_with_its_cause(pair, monkeypatch) -> None:
    p = pair(ram=32 << 20, append="ws=24M rate=0")
    monkeypatch.setattr(PostcopySource, "on_page_request", _boom)
    _postcopy(p)
    # post-copy keeps both halves of the guest: the source pauses (recoverable), and says why
    assert (
        p.wait("src", {"postcopy-paused", "failed", "completed"}, timeout=20) == "postcopy-paused"
    )
    q = p.sm.query_migrate()
    assert "return path: internal error" in q["error-desc"] and "injected bug" in q["error-desc"]
    assert p.wait("dst", {"postcopy-paused"}, timeout=20) == "postcopy-paused"
    assert p.src.runstate != RunState.RUNNING


def test_destination_refusing_before_the_package_gets_the_guest_back(pair, monkeypatch) -> None:
    """The destination refuses the stream before the post-copy package (damaged bytes, say) and
    closes the link, so the package is what fails to go: the destination said the guest never
    ran there (XError), so the source runs it again. It was left stopped (finish-migrate) with
    every page still here: found by ``bench faults --corruptions`` (post-copy, checksums off)."""
    from livemig.errors import StreamError

    def refuse(self: PostcopyIncoming, ev: object, dec: object) -> None:
        raise StreamError("injected: a damaged discard command")

    real_package = PostcopySource._package

    def package(self: PostcopySource) -> bytes:
        out = real_package(self)
        mig = self.mig
        for _ in range(1000):  # the refusal is in: the link is closed under the package
            if mig._rp_reason is not None:
                break
            time.sleep(0.01)
        mig.channel.shutdown()
        return out

    monkeypatch.setattr(PostcopyIncoming, "_discard", refuse)
    monkeypatch.setattr(PostcopySource, "_package", package)
    p = pair(ram=32 << 20, append="ws=8M rate=20000", smp=1)
    _postcopy(p)
    assert p.wait("dst", {"failed"}, timeout=20) == "failed"
    assert p.wait("src", {"failed", "postcopy-paused", "completed"}, timeout=20) == "failed"
    assert "injected" in p.sm.query_migrate()["error-desc"]
    deadline = time.monotonic() + 10
    while p.src.runstate != RunState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.src.runstate == RunState.RUNNING
    assert p.dst.runstate != RunState.RUNNING
