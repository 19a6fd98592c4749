"""``livemig replay`` without a QEMU: a stream sent without multifd arrives byte for byte as
stored (its RAM records encoded again come out the same), and bad input fails with one clear
line. Replays into QEMU 7.2 and into livemig with multifd are in ``tests/qemu`` and
``tests/multifd/test_capture_multifd.py``."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from livemig.wire import events as E
from livemig.wire.encoder import Encoder

RAM = 1 << 20


def _stream() -> bytes:
    """Two RAM sections over two blocks (pages, zero pages, CONTINUE records), then EOF."""
    enc = Encoder()
    rng = np.random.default_rng(3)
    evs: list[E.Event] = [E.Header(), E.Configuration("pc-i440fx-7.2"),
                          E.SectionStart(2, "ram", 0, 4),
                          E.RamSetup(2 * RAM, (E.RamBlockInfo("pc.ram", RAM),
                                               E.RamBlockInfo("vga.vram", RAM))),
                          E.RamEos(), E.SectionFooter(2)]  # fmt: skip
    for _ in range(2):
        evs.append(E.SectionPart(2))
        for block in ("pc.ram", "vga.vram"):
            offs = np.arange(0, 16 * 4096, 4096, dtype=np.uint64)
            evs.append(E.RamPages(block, offs[:8], rng.integers(1, 256, (8, 4096), np.uint8)))
            evs.append(E.RamZeroPages(block, offs[8:]))
        evs += [E.RamEos(), E.SectionFooter(2)]
    evs.append(E.Eof())
    return b"".join(bytes(b) for ev in evs for b in enc.send(ev))


def _replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig", "replay", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _sink() -> tuple[socket.socket, list[bytes], threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def take() -> None:
        try:
            conn, _ = server.accept()
        except OSError:  # shut down: nobody connected
            return
        with conn:
            while chunk := conn.recv(1 << 16):
                got.append(chunk)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    return server, got, t


def test_replay_without_multifd_sends_the_stream_as_stored(tmp_path: Path) -> None:
    data = _stream()
    path = tmp_path / "s.mig"
    path.write_bytes(data)
    server, got, t = _sink()
    with server:
        r = _replay(str(path), f"tcp:127.0.0.1:{server.getsockname()[1]}", "--timeout", "5")
        t.join(10)
    assert r.returncode == 0, r.stderr
    assert b"".join(got) == data


def test_bad_input_fails_with_one_line(tmp_path: Path) -> None:
    """A stream that does not decode is refused before the first byte goes out (it used to
    be sent up to the bad record, which left a destination with half a stream)."""
    path = tmp_path / "s.mig"
    path.write_bytes(_stream()[:-300])  # cut inside the last RAM section
    good = tmp_path / "good.mig"
    good.write_bytes(_stream())
    server, got, t = _sink()
    with server:
        r = _replay(str(path), f"tcp:127.0.0.1:{server.getsockname()[1]}", "--timeout", "5")
        server.shutdown(socket.SHUT_RDWR)  # replay never connected: wake the sink's accept
        t.join(10)
    assert r.returncode == 1 and "stream offset" in r.stderr, r.stderr
    assert got == []
    for args, words in [
        ((str(tmp_path / "none.mig"), "tcp:127.0.0.1:1"), "cannot read"),
        ((str(path), "exec:cat"), "expected tcp:HOST:PORT or unix:PATH"),
        ((str(good), "tcp:127.0.0.1:1"), "refused"),
        ((str(path), "tcp:127.0.0.1:1", "--multifd", "300"), "1..255"),
    ]:
        r = _replay(*args)
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_sync_style_follows_the_machine_type() -> None:
    """A stream without MULTIFD_FLUSH words replayed with multifd: a QEMU destination of a
    machine type from 8.1 on syncs its channels at those words only (QEMU 10.0 waited
    forever at the first SYNC, and replay gave up: 'SYNC not sent'), up to 8.0 at every EOS."""
    from livemig.streams import flush_words_expected

    assert not flush_words_expected("pc-i440fx-7.2")
    assert not flush_words_expected("pc-q35-8.0")
    assert flush_words_expected("pc-i440fx-8.1") and flush_words_expected("pc-q35-10.0")
    assert flush_words_expected("pc-i440fx-10.0")
    assert flush_words_expected("livemig-x86_64")  # livemig's destination takes either


def _postcopy_events() -> list:
    """A post-copy capture's events, as replay's pre-scan yields them: (event, raw, offset)."""
    pages = (np.arange(8 * 4096) % 251).astype(np.uint8).reshape(8, 4096)
    offs = np.arange(8, dtype=np.uint64) << np.uint64(12)
    evs = [E.Header(), E.Configuration("pc-i440fx-10.0"), E.OpenReturnPath(),
           E.PostcopyAdvise(), E.SectionStart(2, "ram", 0, 4),
           E.RamSetup(RAM, (E.RamBlockInfo("pc.ram", RAM),)), E.RamEos(), E.SectionFooter(2),
           E.Packaged(memoryview(b"x")), E.SectionPart(2),
           E.RamPages("pc.ram", offs[:4], pages[:4]),
           E.RamZeroPages("pc.ram", offs[4:6]),
           E.RamPages("pc.ram", offs[2:3], pages[7:8]),  # page 2 again: its final contents
           E.RamEos(), E.SectionFooter(2), E.Eof()]  # fmt: skip
    return [(ev, memoryview(b""), i) for i, ev in enumerate(evs)]


def test_postcopy_server_sends_each_page_once_with_its_final_contents() -> None:
    """replay as a post-copy source: a requested page goes first and once; the recorded push
    skips what was sent; a page recorded twice after the switch goes once, with its last
    contents; a request for a page already sent is ignored (QEMU's source does alike)."""
    from livemig.streams import PostcopyPlan, PostcopyServer

    events = _postcopy_events()
    plan = PostcopyPlan.from_events(events)
    assert plan is not None and plan.pages == 6
    server = PostcopyServer(plan)
    server.request("pc.ram", 2 * 4096, 4096)
    urgent: list = []
    sent: dict[int, bytes] = {}
    for ev, _raw, _at in events[9:]:
        if isinstance(ev, E.RamPages | E.RamZeroPages):
            for out in server.push(ev, urgent.extend):
                for off, data in _pages(out):
                    assert off not in sent
                    sent[off] = data
    for out in urgent:
        for off, data in _pages(out):
            assert off not in sent
            sent[off] = data
    assert sorted(sent) == [0, 1, 2, 3, 4, 5]
    assert sent[2] == bytes((np.arange(7 * 4096, 8 * 4096) % 251).astype(np.uint8))
    assert sent[4] == bytes(4096)
    assert server.served == 1 and server.unsent() == 0
    server.request("pc.ram", 0, 4096)  # already sent: ignored
    assert server.serve() == [] and server.stale == 1


def _pages(ev: E.Event) -> list[tuple[int, bytes]]:
    idx = [int(o) >> 12 for o in ev.offsets]
    if isinstance(ev, E.RamZeroPages):
        return [(i, bytes([ev.fill]) * 4096) for i in idx]
    return [(i, bytes(ev.data[k])) for k, i in enumerate(idx)]


def test_postcopy_capture_that_cannot_be_replayed_is_refused_first(tmp_path: Path) -> None:
    """Refused before the first byte, saying why (it used to go out until the package)."""
    from livemig.errors import StreamError
    from livemig.streams import PostcopyPlan

    events = _postcopy_events()
    no_rp = [e for e in events if not isinstance(e[0], E.OpenReturnPath)]
    with pytest.raises(StreamError, match="without OPEN_RETURN_PATH"):
        PostcopyPlan.from_events(no_rp)
    xb = [*events[:10], (E.RamXbzrlePage("pc.ram", 0, memoryview(b"\0")), memoryview(b""), 10)]
    with pytest.raises(StreamError, match="RamXbzrlePage after the switch"):
        PostcopyPlan.from_events(xb)
    enc = Encoder()
    path = tmp_path / "pc.mig"
    path.write_bytes(b"".join(enc.to_bytes(ev) for ev, _r, _w in events))
    server, got, t = _sink()
    with server:
        r = _replay(str(path), f"tcp:127.0.0.1:{server.getsockname()[1]}", "--multifd", "2")
        server.shutdown(socket.SHUT_RDWR)
        t.join(10)
    assert r.returncode != 0 and "drop --multifd" in r.stderr, r.stderr
    assert got == []


def test_pipe_limit_pings_holds_and_gives_up() -> None:
    """``replay --pipe-pings`` keeps the push as livemig's post-copy source does: a PING
    ``0x80000000 | n`` once 128 KiB went since the last, no piece while more than 512 KiB
    went beyond what the last PONG vouches for, PONGs matched in order (one lost is
    skipped), and the limit dropped once a PING went unanswered for a second."""
    from livemig.migration.postcopy_source import PIPE_LIMIT, PIPE_PING_EVERY, PIPE_PING_FLAG
    from livemig.streams import replay_postcopy as RPC

    now = [100.0]
    pipe = RPC.PipeLimit(1000, clock=lambda: now[0])
    assert pipe.ping(1000 + PIPE_PING_EVERY - 1, 8) is None
    sent = 1000
    values = []
    for _ in range(4):
        sent += PIPE_PING_EVERY
        values.append(pipe.ping(sent, 8))
        sent += 8
    assert values == [PIPE_PING_FLAG | n for n in range(1, 5)]
    assert sent - 1000 > PIPE_LIMIT and pipe.full(sent)  # 4 x 128 KiB and the PINGs
    assert not pipe.on_pong(7)  # not one of these: PING 4 and such
    assert pipe.on_pong(values[1])  # the first was lost: the second answers both
    assert pipe.read == 1000 + 2 * (PIPE_PING_EVERY + 8) and pipe.answered == 1
    assert not pipe.full(sent)
    sent += 3 * PIPE_PING_EVERY
    assert pipe.full(sent) and not pipe.off
    now[0] += 1.1  # the oldest PING unanswered for PIPE_SILENT
    assert not pipe.full(sent) and pipe.off
    assert pipe.ping(sent + PIPE_PING_EVERY, 8) is None  # no more PINGs once off


def _pipe_capture(pages: int, discards: bool = True) -> bytes:
    """A post-copy capture as QEMU makes one (PING 1, ADVISE, its discards, PING 2, the
    package, PING 4), with ``pages`` pages of data pushed after the package."""
    enc = Encoder()
    data = np.random.default_rng(5).integers(1, 256, (pages, 4096), np.uint8)
    offs = np.arange(pages, dtype=np.uint64) << np.uint64(12)
    evs = [E.Header(), E.Configuration("pc-i440fx-10.0"), E.OpenReturnPath(), E.Ping(1),
           E.PostcopyAdvise(4096, 4096), E.SectionStart(2, "ram", 0, 4),
           E.RamSetup(RAM, (E.RamBlockInfo("pc.ram", RAM),)), E.RamEos(), E.SectionFooter(2),
           *([E.PostcopyRamDiscard("pc.ram", ((0, pages * 4096),))] if discards else []),
           E.Ping(2),
           E.Packaged(b"x"), E.Ping(4), E.SectionPart(2), E.RamPages("pc.ram", offs, data),
           E.RamEos(), E.SectionFooter(2), E.SectionEnd(2), E.RamEos(), E.SectionFooter(2),
           E.Eof()]  # fmt: skip
    return b"".join(enc.to_bytes(ev) for ev in evs)


class _SlowDestination:
    """A destination that reads the stream with livemig's decoder and answers each PING
    late: PING 4 and the drain's after ``slow`` s, checking that nothing more came meanwhile
    (the source waits for them), a pipe PING after ``slow / 10`` s; SHUT(0) at EOF."""

    def __init__(self, slow: float, ask: bool = False) -> None:
        self.slow = slow
        self.ask = ask  # ask for page 0 as soon as the package is read
        self.server = socket.create_server(("127.0.0.1", 0))
        self.events: list[E.Event] = []
        self.early: list[str] = []  # what came while a waited-for PING was unanswered
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.server.getsockname()[1]}"

    def _run(self) -> None:
        import time

        from livemig.migration.postcopy_source import PIPE_PING_FLAG
        from livemig.wire.constants import X_DRAIN_PING
        from livemig.wire.decoder import Decoder
        from livemig.wire.returnpath import Pong, ReqPages, Shut, encode_rp

        try:
            conn, _ = self.server.accept()
            with conn:
                dec = Decoder()
                while True:
                    ev = dec.next_event()
                    if ev is E.NEED_DATA:
                        chunk = conn.recv(1 << 16)
                        if not chunk:
                            return
                        dec.receive_data(chunk)
                        continue
                    self.events.append(ev)
                    if isinstance(ev, E.Ping):
                        waited = ev.value in (X_DRAIN_PING, 4)
                        time.sleep(self.slow if waited else self.slow / 10)
                        if waited and ev.value & PIPE_PING_FLAG == 0:
                            try:
                                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                                    self.early.append(hex(ev.value))
                            except BlockingIOError:
                                pass
                        conn.sendall(encode_rp(Pong(ev.value)))
                    elif isinstance(ev, E.Eof):
                        conn.sendall(encode_rp(Shut(0)))
                    elif isinstance(ev, E.Packaged) and self.ask:
                        conn.sendall(encode_rp(ReqPages(0, 4096, "pc.ram")))
        except BaseException as exc:  # reported by the test
            self.failed = exc


@pytest.mark.parametrize("discards", [True, False], ids=["discards", "no-discards"])
def test_replay_drain_and_pipe_pings_against_a_slow_destination(
    tmp_path: Path, discards: bool
) -> None:
    """``replay --postcopy-drain --pipe-pings`` against a destination slow to answer: the
    drain's discards (every page pushed after the switch, as livemig's ``discard_commands``
    makes them) and its PING come before PING 2, and nothing follows until its PONG; the
    capture's own discard is left out (nothing left to drop); nothing follows PING 4 until
    its PONG; the push goes in 32-page PARTs with PINGs between them, and waits whenever
    512 KiB went beyond the last PONG."""
    from livemig.migration.postcopy_source import (
        BACKGROUND_PAGES,
        PIPE_LIMIT,
        PIPE_PING_FLAG,
        discard_commands,
    )
    from livemig.streams import replay_stream
    from livemig.wire.constants import X_DRAIN_PING

    path = tmp_path / "pc.mig"
    path.write_bytes(_pipe_capture(256, discards))
    dest = _SlowDestination(slow=0.1)
    with dest.server:
        result = replay_stream(path, dest.uri, timeout=10, postcopy_drain=True, pipe_pings=True)
        dest.thread.join(10)
    assert dest.failed is None and dest.early == []
    pc = result.postcopy
    assert pc is not None and result.shut == 0
    evs = dest.events
    at = next(i for i, ev in enumerate(evs) if isinstance(ev, E.PostcopyRamDiscard))
    drained = np.zeros(RAM // 4096, bool)
    drained[:256] = True
    assert evs[at : at + 3] == [*discard_commands({"pc.ram": drained}), E.Ping(X_DRAIN_PING),
                                E.Ping(2)]  # fmt: skip
    assert isinstance(evs[at + 3], E.Packaged) and evs[at + 4] == E.Ping(4)
    pushed = []  # pages per PART
    for ev in evs[at + 5 :]:
        if isinstance(ev, E.SectionPart):
            pushed.append(0)
        elif isinstance(ev, E.RamPages):
            pushed[-1] += len(ev)
    assert sum(pushed) == 256 and max(pushed) == BACKGROUND_PAGES
    pings = [ev.value for ev in evs[at + 5 :] if isinstance(ev, E.Ping)]
    assert pings == [PIPE_PING_FLAG | n for n in range(1, len(pings) + 1)] and len(pings) >= 7
    assert pc.drain_pages == 256 and pc.switch_discarded == 0
    assert pc.pipe_holds > 0 and pc.pipe_most_ahead <= PIPE_LIMIT and not pc.pipe_off
    assert pc.drain_wait >= 0.1 and pc.listening_wait >= 0.1
    assert list(result.pongs) == list(result.pings) == [1, X_DRAIN_PING, 2, 4, *pings]


def test_drain_and_pipe_pings_need_a_postcopy_capture(tmp_path: Path) -> None:
    path = tmp_path / "s.mig"
    path.write_bytes(_stream())
    for flag in ("--postcopy-drain", "--pipe-pings"):
        r = _replay(str(path), "tcp:127.0.0.1:9", flag)
        assert r.returncode != 0 and f"{flag}: the capture has no switch" in r.stderr, r.stderr


def test_a_paced_push_goes_in_pieces_the_pace_can_hold() -> None:
    """With ``--max-postcopy-bandwidth`` the push goes in pieces of at most 20 ms of it: a
    piece of 256 pages (1 MiB) went unpaced, and at 512 KiB/s the running guest's whole push
    (144 pages) went in one piece before the guest could fault once (the replay-into-QEMU
    test with a running guest failed under load: 0 requests)."""
    from livemig.streams import PostcopyPlan, PostcopyServer

    events = _postcopy_events()
    plan = PostcopyPlan.from_events(events)
    assert plan is not None and PostcopyServer(plan).batch == 256
    server = PostcopyServer(plan, 512 << 10)
    assert server.batch == 2
    pieces = [len(out) for ev, _r, _at in events[9:] if isinstance(ev, E.RamPages | E.RamZeroPages)
              for out in server.push(ev, lambda _e: None)]  # fmt: skip
    assert max(pieces) <= 2 and sum(pieces) == 6 and server.unsent() == 0


def test_a_request_while_the_package_loads_is_served(tmp_path: Path, monkeypatch) -> None:
    """A destination may ask for pages as soon as it has the package (QEMU 10.0 did for
    0xc0000 while loading its devices): replay is ready to serve them before the package goes.
    It got ready only after, and a request in between ended its return path ("asked for
    pages before the switch to post-copy"): a failure under load, made certain here by a
    slow start of the server."""
    import time

    from livemig.streams import replay as R

    class SlowServer(R.PostcopyServer):
        def __init__(self, *args, **kwargs) -> None:
            time.sleep(0.2)  # the replay thread descheduled here
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(R, "PostcopyServer", SlowServer)
    path = tmp_path / "pc.mig"
    path.write_bytes(_pipe_capture(8))
    dest = _SlowDestination(slow=0, ask=True)
    with dest.server:
        # --pipe-pings: the push waits for PONG 4, which comes after the request on the
        # return path, so the request is taken before any page goes (and counted)
        result = R.replay_stream(path, dest.uri, timeout=10, pipe_pings=True)
        dest.thread.join(10)
    assert dest.failed is None and result.shut == 0
    assert result.postcopy is not None and result.postcopy.requests == 1
    assert result.postcopy.served == 1


def test_a_pong_back_before_the_ping_is_sent_is_seen(tmp_path: Path, monkeypatch) -> None:
    """The PONG to PING 4 (and the drain's) may be back before the send of the PING returns:
    replay counts the PONGs before it sends. It counted after, missed a PONG 4 that came
    first (seen with QEMU 7.2 under load) and gave up waiting for it; a send slow to return
    makes that certain here."""
    import time

    from livemig.streams import replay as R

    flush = R.Replay.flush

    def slow_flush(self) -> None:
        flush(self)
        time.sleep(0.05)  # the replay thread descheduled after its send

    monkeypatch.setattr(R.Replay, "flush", slow_flush)
    path = tmp_path / "pc.mig"
    path.write_bytes(_pipe_capture(8))
    dest = _SlowDestination(slow=0)
    with dest.server:
        result = R.replay_stream(path, dest.uri, timeout=3, postcopy_drain=True, pipe_pings=True)
        dest.thread.join(10)
    assert dest.failed is None and result.shut == 0
    assert list(result.pongs) == list(result.pings)
