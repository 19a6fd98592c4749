"""``livemig.streams`` from Python, with no subprocess: a live migration from livemig's source
captured (main only, and with multifd channels folded in), replayed into livemig's destination,
and a snapshot read back and verified; each time the RAM is the source's, byte for byte. Bad
options and bad streams raise livemig's errors with the command line's messages, before
anything is sent."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from livemig.errors import MigrationError, StreamError, UsageError
from livemig.guests import GuestImage, build_guest
from livemig.machine import Machine, RAMBlockSpec
from livemig.machine.runstate import RunState
from livemig.migration.manager import MigrationManager
from livemig.streams import (
    CaptureServer,
    analyze_stream,
    capture_stream,
    dump_ram,
    replay_stream,
    verify_file,
)
from livemig.testing.procs import wait_until
from livemig.transport.tls import migration_tls
from livemig.wire import events as E
from livemig.wire.encoder import Encoder

RAM = 16 << 20
FINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def memstress(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return build_guest("memstress", cache=tmp_path_factory.mktemp("streams-guests"))


@pytest.fixture
def machines(memstress: GuestImage) -> Iterator[Callable[[bool], Machine]]:
    """``make(running)``: a machine running memstress (dirtying pages), or an ``inmigrate``
    one waiting for a guest; all closed at the end."""
    made: list[Machine] = []

    def make(running: bool) -> Machine:
        m = Machine([RAMBlockSpec("pc.ram", RAM)], smp=1)
        made.append(m)
        if running:
            m.load_guest(memstress.data, "ws=1M rate=2000")
            m.start()
        else:
            m.set_runstate(RunState.INMIGRATE)
        return m

    yield make
    for m in made:
        m.close()


def _migrate(mgr: MigrationManager, uri: str, caps: dict[str, bool],
             params: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    mgr.set_capabilities([{"capability": k, "state": v} for k, v in caps.items()])
    mgr.set_parameters({"max-bandwidth": 16 << 20, "downtime-limit": 100, **(params or {})})
    mgr.migrate(uri)
    deadline = time.monotonic() + 60
    while mgr.source.status.value not in FINAL:
        assert time.monotonic() < deadline, "migration did not finish"
        time.sleep(0.02)
    assert mgr.outgoing is not None and mgr.outgoing.join(10)
    return mgr.query_migrate()


def _source_ram(src: Machine) -> bytes:
    """The source's RAM once it completed: paused, so it is exactly what was sent."""
    assert src.runstate != RunState.RUNNING
    return bytes(src.read_guest(0, RAM))


def _stream_ram(stream: bytes) -> bytes:
    return analyze_stream(stream, keep_ram=True).ram["pc.ram"].tobytes()


def _destination(make: Callable[[bool], Machine], multifd: int = 0) -> tuple[Machine, MigrationManager, str]:  # fmt: skip
    dst = make(False)
    mgr = MigrationManager(dst, autostart=lambda: False)  # stays paused, as with -S
    if multifd:
        mgr.set_capabilities([{"capability": "multifd", "state": True}])
        mgr.set_parameters({"multifd-channels": multifd})
    return dst, mgr, mgr.incoming_start("tcp:127.0.0.1:0")


def _loaded(dst: Machine, mgr: MigrationManager) -> bytes:
    assert mgr.incoming is not None and mgr.incoming.join(10)
    assert mgr.query_migrate()["status"] == "completed"
    return bytes(dst.read_guest(0, RAM))


@pytest.mark.parametrize("multifd", [0, 2], ids=["main", "multifd-2"])
def test_capture_and_replay_a_live_migration(
    machines: Callable[[bool], Machine], multifd: int
) -> None:
    """CaptureServer on a port the kernel picks; the captured stream holds the source's RAM
    (with multifd: the channels' pages written into it); replayed (over as many channels) it
    loads that RAM into livemig's destination."""
    src = machines(True)
    time.sleep(0.2)
    caps = {"return-path": True, "multifd": bool(multifd)}
    params = {"multifd-channels": multifd} if multifd else {}
    with CaptureServer("tcp:127.0.0.1:0", timeout=10, multifd=multifd) as server, \
            ThreadPoolExecutor(1) as pool:  # fmt: skip
        received: Future = pool.submit(server.receive)
        info = _migrate(MigrationManager(src), server.address, caps, params)
        cap = received.result(timeout=30)
    assert info["status"] == "completed", info
    ram = _source_ram(src)
    assert any(ram)
    assert _stream_ram(cap.stream) == ram
    assert cap.path is None and cap.return_path and not cap.postcopy
    assert cap.channels == multifd
    if multifd:
        assert cap.pages > 0 and cap.syncs >= 1

    dst, dmgr, uri = _destination(machines, multifd)
    rep = replay_stream(cap.stream, uri, timeout=10, multifd=multifd)
    assert _loaded(dst, dmgr) == ram
    assert rep.nbytes == len(cap.stream) and rep.shut == 0 and rep.postcopy is None
    assert rep.channels == multifd and (rep.pages > 0) == bool(multifd)


def test_capture_stream_into_a_file_then_replay_the_file(
    machines: Callable[[bool], Machine], tmp_path: Path
) -> None:
    """The one-call forms: ``capture_stream(uri, out)`` writes the file, ``replay_stream``
    reads it by path, ``dump_ram`` writes the source's RAM."""
    src = machines(True)
    time.sleep(0.2)
    sock, out = tmp_path / "mig.sock", tmp_path / "cap.mig"
    with ThreadPoolExecutor(1) as pool:
        received = pool.submit(capture_stream, f"unix:{sock}", out, timeout=10)
        wait_until(lambda: sock.exists() or received.done(), 10, "capture listens")
        info = _migrate(MigrationManager(src), f"unix:{sock}", {"return-path": True})
        cap = received.result(timeout=30)
    assert info["status"] == "completed", info
    ram = _source_ram(src)
    assert cap.path == out and out.read_bytes() == cap.stream
    (d,) = dump_ram(analyze_stream(out.read_bytes(), keep_ram=True), tmp_path / "dump")
    assert Path(d["path"]).read_bytes() == ram

    dst, dmgr, uri = _destination(machines)
    rep = replay_stream(out, uri, timeout=10)
    assert _loaded(dst, dmgr) == ram
    assert rep.nbytes == out.stat().st_size


def _snapshot(src: Machine, path: Path, caps: dict[str, bool]) -> bytes:
    """The running source saved to ``path``; its RAM, which the file must hold."""
    time.sleep(0.2)
    info = _migrate(MigrationManager(src), f"file:{path}", caps)
    assert info["status"] == "completed", info
    return _source_ram(src)


@pytest.mark.parametrize("mapped", [False, True], ids=["stream", "mapped-ram"])
def test_snapshot_read_back_and_verified(
    machines: Callable[[bool], Machine], tmp_path: Path, mapped: bool
) -> None:
    """A checksummed snapshot read back as ``migrate --verify`` does (``verify_file``): its
    checksums and RAM digests hold, and the RAM it rebuilds is the source's. The plain one is
    then replayed over a socket into a destination, which checks the checksums again."""
    path = tmp_path / "snap.mig"
    caps = {"x-checksums": True, "x-verify": True, "mapped-ram": mapped}
    ram = _snapshot(machines(True), path, caps)
    result = verify_file(path)
    assert result.verifier is not None
    assert result.verifier.report["ram-digests"] == "equal to the source's at switch-over"
    assert result.ram["pc.ram"].tobytes() == ram
    assert (result.pages["pc.ram"].get("mapped", 0) > 0) == mapped
    if not mapped:
        dst, dmgr, uri = _destination(machines)
        replay_stream(path, uri, timeout=10)
        assert _loaded(dst, dmgr) == ram


def test_mapped_ram_snapshot_replayed_over_a_socket(
    machines: Callable[[bool], Machine], tmp_path: Path
) -> None:
    """A mapped-ram file holds no page records: replay sends the pages its bitmaps mark as
    page records, and the destination (without mapped-ram) loads the source's RAM."""
    path = tmp_path / "snap.mapped"
    ram = _snapshot(machines(True), path, {"mapped-ram": True})
    dst, dmgr, uri = _destination(machines)
    rep = replay_stream(path, uri, timeout=10)
    assert _loaded(dst, dmgr) == ram
    assert rep.nbytes == path.stat().st_size


@pytest.mark.parametrize("multifd", [0, 2], ids=["main", "multifd-2"])
def test_capture_gives_up_when_no_source_comes(multifd: int) -> None:
    """Within its time-out, with or without multifd channels to wait for (with them it used to
    wait for ever: the multifd accept loop only timed out once a first channel had come)."""
    with ThreadPoolExecutor(1) as pool, \
            CaptureServer("tcp:127.0.0.1:0", timeout=0.3, multifd=multifd) as server:  # fmt: skip
        received = pool.submit(server.receive)
        with pytest.raises(MigrationError, match=r"no migration connected to .* in 0.3 s"):
            received.result(timeout=10)


def _small_stream() -> bytes:
    """A pre-copy stream of one empty RAM section: it decodes, and has no post-copy."""
    evs: list[E.Event] = [E.Header(), E.Configuration("pc-i440fx-7.2"),
                          E.SectionStart(2, "ram", 0, 4),
                          E.RamSetup(RAM, (E.RamBlockInfo("pc.ram", RAM),)), E.RamEos(),
                          E.SectionFooter(2), E.Eof()]  # fmt: skip
    enc = Encoder()
    return b"".join(bytes(b) for ev in evs for b in enc.send(ev))


def test_bad_options_and_streams_raise_before_anything_is_sent(tmp_path: Path) -> None:
    """The command line's checks and messages, as exceptions; a replay that is refused never
    connects, and leaves the process's migration TLS settings as they were."""
    for kwargs, words in [
        ({"uri": "exec:cat"}, "expected tcp:HOST:PORT or unix:PATH"),
        ({"multifd": 300}, "multifd-channels is 1..255"),
        ({"uuid": "nope"}, "'nope' is not a UUID"),
    ]:
        options = dict(kwargs)
        uri = str(options.pop("uri", "tcp:127.0.0.1:0"))
        with pytest.raises(UsageError, match=words):
            CaptureServer(uri, **options)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match=words):
            replay_stream(b"", uri, **options)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cannot read"):
        replay_stream(tmp_path / "none.mig", "tcp:127.0.0.1:1")
    with pytest.raises(MigrationError, match=r"cannot read .* back"):
        verify_file(tmp_path / "none.mig")
    with pytest.raises(StreamError, match="stream offset"):
        analyze_stream(_small_stream()[:-3])
    with pytest.raises(StreamError, match="carries no checksums"):
        analyze_stream(_small_stream(), verify=True)

    # a listener that notes whether anything connected: nothing may, for a refused replay
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(1.0)
    uri = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    connected = threading.Event()

    def watch() -> None:
        try:
            listener.accept()[0].close()
            connected.set()
        except OSError:
            pass  # timed out: nobody came

    t = threading.Thread(target=watch)
    t.start()
    before = migration_tls("client")
    with pytest.raises(StreamError, match="stream offset"):
        replay_stream(_small_stream()[:-3], uri, timeout=1)
    with pytest.raises(UsageError, match="the capture has no switch to post-copy"):
        replay_stream(_small_stream(), uri, timeout=1, postcopy_preempt=True)
    with pytest.raises(UsageError, match="bytes/s, 0 or more"):
        replay_stream(_small_stream(), uri, timeout=1, max_postcopy_bandwidth=-1)
    t.join(5)
    listener.close()
    assert not connected.is_set()
    assert migration_tls("client") is before
