"""Post-copy readahead: a sequential stream of page requests gets a growing window that the
push sends next, ahead of its RAM-order walk and past the bandwidth budget; random requests
get none.

Regression: the push used to go on in RAM order whatever the requests, so a guest sweeping its
memory faster than ``max-postcopy-bandwidth`` faulted on page after page at the push's front
(694 requests, blocktime 1.2-2.1x QEMU 10.0's at a matched 1 GB/s in ``bench postcopy``).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from livemig.machine import Machine, RAMBlockSpec
from livemig.migration import postcopy_readahead as RA
from livemig.migration import postcopy_source as PS
from livemig.migration.postcopy_source import BACKGROUND_PAGES, PostcopySource
from livemig.savevm.ram import RamSaver
from livemig.transport.ratelimit import RateLimiter

PAGE = 4096


def test_a_sequential_stream_doubles_its_window() -> None:
    ra = RA.Readahead(first=8, limit=64)
    assert ra.on_request("pc.ram", 100) is None  # one request is no stream yet
    assert ra.on_request("pc.ram", 101) == (102, 110)
    # the guest faults just past the window: the next one is twice as large
    assert ra.on_request("pc.ram", 110) == (111, 127)
    assert ra.on_request("pc.ram", 127) == (128, 160)
    assert ra.on_request("pc.ram", 160) == (161, 225)
    assert ra.on_request("pc.ram", 225) == (226, 290)  # at the limit


def test_a_fault_inside_the_window_extends_it() -> None:
    ra = RA.Readahead(first=8, limit=64)
    ra.on_request("pc.ram", 10)
    assert ra.on_request("pc.ram", 11) == (12, 20)
    # page 14 was in flight when the guest reached it: the window grows from there
    assert ra.on_request("pc.ram", 14) == (15, 31)


def test_random_requests_get_no_window() -> None:
    ra = RA.Readahead()
    rng = np.random.default_rng(1)
    pages = rng.choice(1 << 20, 500, replace=False)
    windows = [ra.on_request("pc.ram", int(p)) for p in pages]
    assert sum(w is not None for w in windows) <= 5  # only a chance neighbour


def test_interleaved_streams_keep_their_own_windows() -> None:
    """Two vCPUs sweeping their halves: each stream is recognised, neither resets the other."""
    ra = RA.Readahead(first=4, limit=1024)
    a, b = 1000, 50000
    ra.on_request("pc.ram", a)
    ra.on_request("pc.ram", b)
    wa = ra.on_request("pc.ram", a + 1)
    wb = ra.on_request("pc.ram", b + 1)
    assert wa == (a + 2, a + 6) and wb == (b + 2, b + 6)
    assert ra.on_request("pc.ram", a + 6) == (a + 7, a + 15)
    assert ra.on_request("pc.ram", b + 6) == (b + 7, b + 15)
    assert ra.on_request("other", a + 7) is None  # another block is another stream


def test_backwards_and_far_requests_start_over() -> None:
    ra = RA.Readahead(first=8, limit=64)
    ra.on_request("pc.ram", 500)
    ra.on_request("pc.ram", 501)
    assert ra.on_request("pc.ram", 400) is None
    assert ra.on_request("pc.ram", 502 + 8 + RA.SLACK + 1) is None


@given(st.lists(st.integers(0, 4096), max_size=200), st.integers(0, 16), st.integers(0, 256))
def test_windows_stay_after_the_request_and_within_the_limit(pages, first, limit) -> None:
    ra = RA.Readahead(first=first, limit=limit)
    for p in pages:
        w = ra.on_request("pc.ram", p)
        if w is not None:
            start, end = w
            assert start == p + 1 and start < end
    assert len(ra._streams) <= RA.STREAMS


def _source(npages: int, rate: int):
    machine = Machine([RAMBlockSpec("pc.ram", npages * PAGE)], smp=1)
    block = machine.ram_blocks[0]
    block.array[:] = 7
    mig = SimpleNamespace(
        config=SimpleNamespace(capabilities={"postcopy-ram"}, params={"x-postcopy-prefetch": 0}),
        ram=RamSaver(machine.ram_blocks), _wake=threading.Event(), rate=RateLimiter(rate),
    )  # fmt: skip
    return machine, block, mig, PostcopySource(mig)


def test_the_push_sends_a_streams_window_before_its_walk_and_past_the_budget(
    monkeypatch,
) -> None:
    monkeypatch.setattr(PS, "READAHEAD_HEAD", 0)  # the whole window for the push
    machine, block, mig, ps = _source(4096, rate=1)  # 1 B/s: the walk has no budget at all
    try:
        ps.readahead = RA.Readahead(first=8, limit=64)
        d = mig.ram.dirty["pc.ram"]
        for p in (2000, 2001):  # served elsewhere: only the stream is noted here
            d[p] = False
            ps._note_request(block, p * PAGE, PAGE)
        assert mig._wake.is_set()  # the migration thread is woken for the window
        with ps.lock:
            batches = ps._take_readahead(BACKGROUND_PAGES)
        got = np.sort(np.concatenate([np.concatenate((b.normal, b.zero)) for b in batches]))
        assert got.tolist() == list(range(2002, 2010))
        assert not d[2002:2010].any() and d[2010] and d[0]
        with ps.lock:
            assert ps._take_readahead(BACKGROUND_PAGES) == []  # the window is used up
    finally:
        machine.close()


def test_the_window_skips_pages_already_sent_and_merges_with_its_stream(monkeypatch) -> None:
    monkeypatch.setattr(PS, "READAHEAD_HEAD", 0)
    machine, block, mig, ps = _source(4096, rate=0)
    try:
        ps.readahead = RA.Readahead(first=8, limit=64)
        d = mig.ram.dirty["pc.ram"]
        d[103:106] = False  # pushed already
        for p in (100, 101):
            ps._note_request(block, p * PAGE, PAGE)
        ps._note_request(block, 104 * PAGE, PAGE)  # in the window: it grows (16 from 105)
        assert len(ps._ra) == 1
        with ps.lock:
            batches = ps._take_readahead(100)
        got = np.sort(np.concatenate([np.concatenate((b.normal, b.zero)) for b in batches]))
        assert got.tolist() == [102, *range(106, 121)]
    finally:
        machine.close()


def test_push_loop_sends_the_window_when_the_budget_is_spent(monkeypatch) -> None:
    """``_push`` itself: with no budget left for the walk, a stream's window still goes out:
    its head at once on the request path (the return-path thread, here the test's), the rest
    from the push."""
    monkeypatch.setattr(PS, "READAHEAD_HEAD", 3)
    import socket
    import time

    from livemig.migration.stats import MigrationStats
    from livemig.transport import Channel
    from livemig.wire.encoder import Encoder

    machine, block, mig, ps = _source(4096, rate=1)
    main_a, main_b = socket.socketpair()
    cancelled = threading.Event()

    def check_cancel() -> None:
        if cancelled.is_set():
            raise RuntimeError("cancelled")

    mig.__dict__.update(encoder=Encoder(), _ram_sid=2, stats=MigrationStats(), checks=None,
                        channel=Channel.from_socket(main_a, "main", timeout=5),
                        _check_cancel=check_cancel, _check_rp=lambda: None)  # fmt: skip
    ps.params = {"downtime-limit": 300}
    ps.active = True

    def drain_main() -> None:
        try:
            while main_b.recv(1 << 16):
                pass
        except OSError:
            pass  # closed at the end of the test

    drain = threading.Thread(target=drain_main, daemon=True)
    drain.start()
    mig.rate.account(1 << 20)  # this window's budget is spent
    pusher = threading.Thread(target=lambda: _quietly(ps._push), daemon=True)
    pusher.start()
    try:
        ps.readahead = RA.Readahead(first=8, limit=64)
        accounted: list[tuple[int, int]] = []
        account = mig.rate.account
        mig.rate.account = lambda n: (accounted.append((threading.get_ident(), n)), account(n))
        d = mig.ram.dirty["pc.ram"]
        for p in (3000, 3001):
            d[p] = False
            ps._note_request(block, p * PAGE, PAGE)
        assert not d[3002:3005].any()  # the head: sent before _note_request returned
        assert ps.readahead_sent >= 3 and ps.requested_sent == 0
        # counted against max-postcopy-bandwidth, as the push's part of the window
        me = threading.get_ident()
        assert sum(n for t, n in accounted if t == me) == 3 * PAGE
        deadline = time.monotonic() + 5
        while ps.readahead_sent < 8:
            assert time.monotonic() < deadline, "the window was not pushed"
            time.sleep(0.01)
        assert not d[3002:3010].any() and d[3010]
        assert ps.pushed == 0  # the walk itself waits for budget
    finally:
        cancelled.set()
        mig._wake.set()
        pusher.join(5)
        mig.channel.close()
        main_b.close()
        drain.join(5)
        machine.close()


def _quietly(fn) -> None:
    try:
        fn()
    except RuntimeError:
        pass


def test_the_parameter_sets_the_largest_window_and_zero_turns_it_off() -> None:
    import pytest

    from livemig.errors import UsageError
    from livemig.migration.options import default_parameters, params_check

    v = default_parameters()
    assert v["x-postcopy-readahead"] == RA.MAX_WINDOW
    with pytest.raises(UsageError, match="x-postcopy-readahead"):
        params_check({**v, "x-postcopy-readahead": 8193})
    machine, block, mig, ps = _source(1024, rate=0)
    try:
        assert ps.readahead is not None and ps.readahead.limit == RA.MAX_WINDOW
        mig.config.params["x-postcopy-readahead"] = 0
        off = PostcopySource(mig)
        assert off.readahead is None
        for p in (10, 11, 12):
            off._note_request(block, p * PAGE, PAGE)
        assert not off._ra and not mig._wake.is_set()
        mig.config.params["x-postcopy-readahead"] = 4
        small = PostcopySource(mig)
        small.readahead.on_request("pc.ram", 1)
        assert small.readahead.on_request("pc.ram", 2) == (3, 7)  # the first window capped too
    finally:
        machine.close()


def test_a_sweep_across_sent_pages_keeps_its_window() -> None:
    """The guest went on through pages the walk had pushed and faults further on: the same
    stream (its window does not start over at nothing), but not across a page still unsent."""
    sent = np.ones(10000, bool)
    sent[5000] = False

    def all_sent(a: int, z: int) -> bool:
        return bool(sent[a:z].all())

    ra = RA.Readahead(first=8, limit=64)
    ra.on_request("pc.ram", 100, sent=all_sent)
    assert ra.on_request("pc.ram", 101, sent=all_sent) == (102, 110)
    assert ra.on_request("pc.ram", 3000, sent=all_sent) == (3001, 3017)
    assert ra.on_request("pc.ram", 6000, sent=all_sent) is None  # page 5000 was never sent
    assert ra.on_request("pc.ram", 3000 + 17 + RA.SLACK + 1) is None  # no look-back: over


def test_with_preempt_the_head_starts_on_the_preempt_channel() -> None:
    """The head's first ``PREEMPT_LEAD`` pages go on the preempt channel, the rest as a PART on
    the main channel, whose installs are batched. The whole head on the preempt channel,
    installed page by page behind the requested one, made the guest wait longer (blocktime
    median 97 against 66 ms, p99 latency 8-32 against 2.4-15 ms, interleaved, session 11); all
    of it on main, the very next page waited behind the background PARTs in flight (0.4-1.2
    ms, the slowest requests of a run, session 13: ``test_preempt_runs.py``)."""
    import socket

    from livemig.migration.postcopy_dest import PreemptParser
    from livemig.migration.stats import MigrationStats
    from livemig.transport import Channel
    from livemig.wire.encoder import Encoder

    machine, block, mig, ps = _source(4096, rate=0)
    main_a, main_b = socket.socketpair()
    pre_a, pre_b = socket.socketpair()
    try:
        mig.config.capabilities = {"postcopy-ram", "postcopy-preempt"}
        ps = PostcopySource(mig)
        mig.__dict__.update(encoder=Encoder(), _ram_sid=2, stats=MigrationStats(), checks=None,
                            channel=Channel.from_socket(main_a, "main", timeout=5))  # fmt: skip
        ps.preempt_channel = Channel.from_socket(pre_a, "preempt", timeout=5)
        ps.preempt_encoder = Encoder()
        ps.active = True
        ps.readahead = RA.Readahead(first=48, limit=64)
        d = mig.ram.dirty["pc.ram"]
        for p in (700, 701):
            d[p] = False  # served on the preempt channel elsewhere
            ps._note_request(block, p * PAGE, PAGE)
        assert not d[702:750].any() and d[750] and ps.readahead_sent == 48
        main_b.settimeout(2)
        got = b""
        while len(got) < (48 - PS.PREEMPT_LEAD) * PAGE:
            got += main_b.recv(1 << 20)
        pre_b.settimeout(2)
        parser, records = PreemptParser(), []
        while len(records) < PS.PREEMPT_LEAD:
            records += [(b, o, bytes(p)) for b, o, p in parser.feed(pre_b.recv(1 << 20))]
        assert [off // PAGE for _b, off, _p in records] == list(range(702, 702 + PS.PREEMPT_LEAD))
        assert all(bytes(p) == bytes([7]) * PAGE for _b, _o, p in records)
    finally:
        mig.channel.close()
        ps.preempt_channel.close()
        for s in (main_b, pre_b):
            s.close()
        machine.close()


def test_the_destinations_listen_thread_is_real_time_with_preempt_too(monkeypatch) -> None:
    """With preempt the main channel carries a livemig source's readahead windows, pages a
    sweeping guest is blocked on: the thread that installs them is real-time, as without."""
    from livemig.migration import postcopy_dest as PD

    calls: list[dict] = []
    monkeypatch.setattr(PD, "boost_thread", lambda **kw: calls.append(kw) or True)
    monkeypatch.setattr(PD, "boost_process_threads", lambda skip=frozenset(): [])
    for preempt in (False, True):
        dest = PD.PostcopyIncoming.__new__(PD.PostcopyIncoming)
        dest.inc = SimpleNamespace(channel=None)
        dest.machine = SimpleNamespace(vcpus=[])
        dest.preempt = preempt
        monkeypatch.setattr(dest, "_listen_pump", lambda ch, dec: None, raising=False)
        dest._listen_loop(None)
    assert [c.get("realtime") for c in calls] == [True, True]


def test_the_destinations_other_threads_are_real_time_while_it_listens(monkeypatch) -> None:
    """Post-copy's request threads need the interpreter lock: while the listen loop runs,
    every thread but the vCPUs is real-time, so that none holds the lock while it waits for a
    CPU (a QMP thread did, 1.4 ms, traced); undone when the loop ends, however it ends."""
    from livemig.migration import postcopy_dest as PD

    monkeypatch.setattr(PD, "boost_thread", lambda **kw: True)
    boosted: list[frozenset] = []
    restored: list[list] = []
    monkeypatch.setattr(PD, "boost_process_threads",
                        lambda skip=frozenset(): boosted.append(skip) or [(1, 0, 0)])  # fmt: skip
    monkeypatch.setattr(PD, "restore_threads", restored.append)
    dest = PD.PostcopyIncoming.__new__(PD.PostcopyIncoming)
    dest.inc = SimpleNamespace(channel=None)
    dest.machine = SimpleNamespace(vcpus=[SimpleNamespace(thread_id=41),
                                          SimpleNamespace(thread_id=None)])  # fmt: skip

    def pump(ch: object, dec: object) -> None:
        assert restored == []  # still boosted while the loop runs
        raise RuntimeError("the link broke for good")

    monkeypatch.setattr(dest, "_listen_pump", pump, raising=False)
    with __import__("pytest").raises(RuntimeError):
        dest._listen_loop(None)
    assert boosted == [frozenset({41})] and restored == [[(1, 0, 0)]]


def test_the_return_path_thread_is_boosted_before_the_first_request(monkeypatch) -> None:
    """At the switch (and after a recovery, which starts a new thread) the migration thread
    makes the return-path thread real-time: raising its own priority at its first request, it
    served that request at a nice value while the switch kept the CPU (11-19 ms, the p99 of a
    run with readahead's few dozen requests)."""
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(PS.os, "sched_setscheduler", lambda tid, policy, param:
                        calls.append((tid, policy, param.sched_priority)))  # fmt: skip
    monkeypatch.delenv("LIVEMIG_NO_RT", raising=False)
    stop = threading.Event()
    rp = threading.Thread(target=stop.wait, daemon=True)
    rp.start()
    machine, _block, mig, ps = _source(1024, rate=0)
    try:
        mig._rp_thread = rp
        ps._boost_rp_thread()
        # above the migration thread and the destination's listen thread (RT_PRIORITY): at
        # the same level it waited 18 ms for a CPU while those two ran (FIFO, traced)
        assert calls == [(rp.native_id, PS.os.SCHED_FIFO, PS.RT_REQUEST_PRIORITY)]
        assert ps._rp_boosted  # the first request does not try again
    finally:
        stop.set()
        rp.join(5)
        machine.close()


def test_the_post_copy_phase_keeps_the_migration_thread_real_time(monkeypatch) -> None:
    """Once the package is out the migration thread stays real-time (it holds the interpreter
    lock between its sends: at a nice value it was descheduled with it and requests waited
    4-6 ms), and the process's other threads become real-time; without real-time for the
    blackout (not permitted) it takes the urgent nice value as before."""
    nice: list[dict] = []
    boosted: list[int] = []
    monkeypatch.setattr(PS, "boost_thread", lambda **kw: nice.append(kw) or True)
    monkeypatch.setattr(PS, "boost_process_threads",
                        lambda skip=frozenset(): boosted.append(1) or [(9, 0, 0)])  # fmt: skip
    machine, _block, mig, ps = _source(1024, rate=0)
    try:
        mig._blackout_prio = (PS.os.SCHED_OTHER, 0, 0)  # real-time since stop_guest
        assert ps._postcopy_priority() == [(9, 0, 0)]
        assert nice == [] and boosted == [1]
        mig._blackout_prio = None
        ps._postcopy_priority()
        assert nice == [{}] and boosted == [1, 1]
    finally:
        machine.close()


def test_the_heads_first_pages_go_in_a_part_of_their_own() -> None:
    """A sweeping guest faults on the page right after the one it asked for at once; the
    destination installs a PART's pages as one batch, so the head's first ``READAHEAD_LEAD``
    pages come in a PART of their own, ahead of the rest of the head."""
    import socket

    from livemig.migration.stats import MigrationStats
    from livemig.transport import Channel
    from livemig.wire import constants as C
    from livemig.wire.encoder import Encoder

    machine, block, mig, ps = _source(4096, rate=0)
    main_a, main_b = socket.socketpair()
    try:
        mig.__dict__.update(encoder=Encoder(), _ram_sid=2, stats=MigrationStats(), checks=None,
                            channel=Channel.from_socket(main_a, "main", timeout=5))  # fmt: skip
        ps.active = True
        ps.readahead = RA.Readahead(first=16, limit=16)
        d = mig.ram.dirty["pc.ram"]
        for p in (700, 701):
            d[p] = False  # served elsewhere
            ps._note_request(block, p * PAGE, PAGE)
        assert not d[702:718].any() and ps.readahead_sent == 16
        main_b.settimeout(2)
        got = b""
        while len(got) < 16 * PAGE:
            got += main_b.recv(1 << 20)
        footer = bytes([C.QEMU_VM_SECTION_FOOTER]) + (2).to_bytes(4, "big")
        first_end = got.find(footer)
        assert first_end > 0 and got.count(footer) == 2
        # PART header (type, section id), then the pages: the lead and no more
        assert got[0] == C.QEMU_VM_SECTION_PART
        assert PS.READAHEAD_LEAD * PAGE < first_end < (PS.READAHEAD_LEAD + 1) * PAGE
        assert int.from_bytes(got[5:13], "big") & ~0xFFF == 702 * PAGE
    finally:
        mig.channel.close()
        main_b.close()
        machine.close()
