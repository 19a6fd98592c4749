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
