"""Channels: batched writes, time-outs, wake-ups from another thread, pipes and files."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

from livemig.transport import (
    Channel,
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
    Listener,
    RateLimiter,
    connect,
)


def _pair(timeout: float = 5.0) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel.from_socket(a, "a", timeout), Channel.from_socket(b, "b", timeout)


def _drain(ch: Channel, n: int, out: bytearray) -> None:
    buf = bytearray(1 << 16)
    while len(out) < n:
        k = ch.recv_into(memoryview(buf))
        if k == 0:
            return
        out += buf[:k]


def test_sendv_many_buffers_in_order() -> None:
    a, b = _pair()
    ram = np.random.default_rng(1).integers(0, 256, 3000 * 64, dtype=np.uint8)
    view = memoryview(ram)
    buffers = []
    for i in range(3000):  # more than IOV_MAX buffers, larger than the socket buffer
        buffers.append(i.to_bytes(8, "big"))
        buffers.append(view[i * 64 : (i + 1) * 64])
    expected = b"".join(bytes(x) for x in buffers)
    got = bytearray()
    t = threading.Thread(target=_drain, args=(b, len(expected), got))
    t.start()
    assert a.sendv(buffers) == len(expected)
    t.join(10)
    assert bytes(got) == expected
    assert a.bytes_sent == b.bytes_received == len(expected)
    a.close()
    b.close()


def test_read_times_out() -> None:
    a, b = _pair(timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout, match="no progress reading"):
        b.recv_into(memoryview(bytearray(10)))
    assert time.monotonic() - t0 < 2
    a.close()
    b.close()


def test_stalled_reader_times_out_writer() -> None:
    a, b = _pair(timeout=0.2)
    with pytest.raises(ChannelTimeout, match="writing"):
        a.send(bytes(64 << 20))  # the peer never reads
    a.close()
    b.close()


def test_shutdown_wakes_blocked_reader() -> None:
    a, b = _pair(timeout=30)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            b.recv_into(memoryview(bytearray(10)))
        except ChannelError as exc:
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    b.shutdown()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(errors[0], ChannelClosed)
    a.close()
    b.close()


def test_peer_close_is_eof() -> None:
    a, b = _pair()
    a.send(b"abc")
    a.close()
    assert b.recv_exact(3) == b"abc"
    with pytest.raises(ChannelError, match="peer closed"):
        b.recv_exact(1)
    b.close()


def test_tcp_listener_port_zero_and_connect() -> None:
    with Listener("tcp:127.0.0.1:0", timeout=5) as lst:
        assert not lst.address.endswith(":0")
        src = connect(lst.address, timeout=5)
        dst = lst.accept(timeout=5)
        src.send(b"QEVM")
        assert dst.recv_exact(4) == b"QEVM"
        dst.send(b"rp")  # the return path is the same socket, other direction
        assert src.recv_exact(2) == b"rp"
        src.close()
        dst.close()


def test_accept_times_out() -> None:
    with Listener("tcp:127.0.0.1:0") as lst, pytest.raises(ChannelTimeout):
        lst.accept(timeout=0.1)


def test_unix_listener_mode(tmp_path) -> None:
    path = tmp_path / "mig.sock"
    with Listener(f"unix:{path}") as lst:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        src = connect(f"unix:{path}")
        dst = lst.accept(timeout=5)
        src.send(b"x")
        assert dst.recv_exact(1) == b"x"
        src.close()
        dst.close()
    assert not path.exists()


def test_connect_refused_is_clear() -> None:
    with Listener("tcp:127.0.0.1:0") as lst:
        addr = lst.address
    port = addr.rsplit(":", 1)[1]
    # QEMU 10.0's words
    with pytest.raises(ChannelError, match=rf"^Failed to connect to '127\.0\.0\.1:{port}': "
                       "Connection refused$"):  # fmt: skip
        connect(addr, timeout=1)
    with pytest.raises(ChannelError, match=rf"^Failed to connect to '127\.0\.0\.1:{port}'"):
        connect(addr, timeout=1, cancelled=lambda: False)
    with pytest.raises(ChannelError, match=r"^Failed to connect to '/nonexistent/x\.sock': "
                       "No such file or directory$"):  # fmt: skip
        connect("unix:/nonexistent/x.sock", timeout=1)


def test_exec_pipes_through_a_command(tmp_path) -> None:
    out = tmp_path / "stream.gz"
    ch = connect(f"exec:gzip -c > {out}")
    ch.sendv([b"hello ", memoryview(b"world")])
    ch.close_write()
    ch.close()
    back = Listener(f"exec:gzip -dc < {out}").accept()
    assert back.recv_exact(11) == b"hello world"
    back.close()


def test_file_round_trip_with_offset(tmp_path) -> None:
    path = tmp_path / "snap"
    path.write_bytes(b"H" * 10)
    ch = connect(f"file:{path},offset=4")
    ch.send(b"data")
    ch.close_write()
    ch.close()
    assert path.read_bytes() == b"HHHHdata"
    rd = Listener(f"file:{path},offset=4").accept()
    assert rd.recv_exact(4) == b"data"
    rd.close()


def test_file_listener_missing_file(tmp_path) -> None:
    with pytest.raises(ChannelError, match=r"^Could not open '.*/nope': No such file or dir"):
        Listener(f"file:{tmp_path}/nope")


def test_file_listener_directory(tmp_path) -> None:
    """A directory was taken, then failed in the incoming thread as a failed migration;
    QEMU 10.0 refuses it in migrate-incoming itself, in these words."""
    with pytest.raises(ChannelError, match=rf"^Could not open '{tmp_path}': Is a directory$"):
        Listener(f"file:{tmp_path}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_windows() -> None:
    clock = FakeClock()
    rl = RateLimiter(1000, clock=clock)  # 100 bytes per 100 ms window
    assert rl.budget_left() == 100
    rl.account(60)
    assert not rl.over_budget()
    rl.account(40)
    assert rl.over_budget()
    clock.now += 0.1
    assert rl.budget_left() == 100
    rl.rate = 0
    assert not rl.over_budget()
    rl.account(10**9)
    assert not rl.over_budget()


def test_rate_limiter_wait_is_woken() -> None:
    rl = RateLimiter(10)  # 1 byte per window
    rl.account(5)
    wake = threading.Event()
    wake.set()
    t0 = time.monotonic()
    rl.wait(wake)
    assert time.monotonic() - t0 < 0.05


def test_subclasses_that_transform_reads_override_recv_too() -> None:
    """``Channel.recv`` reads the raw fd: a subclass with its own ``recv_into`` (TLS) must
    override ``recv`` as well, or the destination's load loop would read ciphertext."""
    from livemig.transport import tls  # noqa: F401 - registers TLSChannel

    def subclasses(cls: type) -> list[type]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    found = subclasses(Channel)
    assert found
    for cls in found:
        if cls.recv_into is not Channel.recv_into:
            assert cls.recv is not Channel.recv, f"{cls.__name__} overrides recv_into only"


def test_hold_gil_send_and_recv_round_trip() -> None:
    a, b = _pair()
    header, page = b"\x00" * 8, memoryview(bytearray(os.urandom(4096)))
    assert a.sendv([header, page], hold_gil=True) == 4104
    got = bytearray()
    buf = memoryview(bytearray(8192))
    while len(got) < 4104:
        got += buf[: b.recv_into(buf, hold_gil=True)]
    assert bytes(got) == header + bytes(page)
    assert a.bytes_sent == 4104 and b.bytes_received == 4104


def test_hold_gil_send_falls_back_when_the_socket_is_full() -> None:
    """Larger than the socket buffer: the held write takes what fits, the rest waits in poll
    (releasing the lock) while the reader drains; nothing is lost or reordered."""
    a, b = _pair()
    a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
    data = os.urandom(4 << 20)
    out = bytearray()
    reader = threading.Thread(target=_drain, args=(b, len(data), out))
    reader.start()
    assert a.sendv([data], hold_gil=True) == len(data)
    reader.join(10)
    assert bytes(out) == data and a.bytes_sent == len(data)


def test_hold_gil_recv_waits_and_sees_close() -> None:
    a, b = _pair(timeout=0.2)
    buf = memoryview(bytearray(64))
    with pytest.raises(ChannelTimeout):
        b.recv_into(buf, hold_gil=True)
    threading.Timer(0.05, a.close).start()
    b.timeout = 5.0
    assert b.recv_into(buf, hold_gil=True) == 0


def test_hold_gil_errors_are_channel_errors() -> None:
    a, b = _pair()
    b.close()
    with pytest.raises(ChannelError):
        for _ in range(100):  # the first write may still be accepted before the reset
            a.sendv([b"x" * 65536], hold_gil=True)


def test_held_calls_name_their_errors() -> None:
    from livemig import held
    from livemig.iovec import address

    a, b = socket.socketpair()
    a.setblocking(False)
    buf = bytearray(16)
    addr, size, _keep = address(buf)
    with pytest.raises(BlockingIOError):
        held.read(a.fileno(), addr, size)  # nothing there: EAGAIN, not a hang
    assert held.write(b.fileno(), b"abc") == 3
    assert held.read(a.fileno(), addr, size) == 3 and bytes(buf[:3]) == b"abc"
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    with pytest.raises(OSError) as exc:
        held.write(w, b"x")
    assert not isinstance(exc.value, BlockingIOError)
    assert held.ioctl(r, 0, 0)[1] != 0  # EBADF reported as an errno, not raised
    a.close()
    b.close()


def test_held_try_read_reports_empty_as_minus_one() -> None:
    from livemig import held
    from livemig.iovec import address

    a, b = socket.socketpair()
    a.setblocking(False)
    buf = bytearray(16)
    addr, size, _keep = address(buf)
    assert held.try_read(a.fileno(), addr, size) == -1  # empty: no exception
    b.send(b"xyz")
    assert held.try_read(a.fileno(), addr, size) == 3 and bytes(buf[:3]) == b"xyz"
    a.close()
    b.close()
    with pytest.raises(OSError):
        held.try_read(a.fileno(), addr, size)  # a closed descriptor (EBADF)


def test_hold_gil_recv_follows_the_buffer_it_is_given() -> None:
    """The held read caches the address of the buffer it last read into: a different buffer
    must get the bytes, never the cached one."""
    a, b = _pair()
    one, two = memoryview(bytearray(4)), memoryview(bytearray(4))
    for i, buf in enumerate([one, two, one, two, two, one]):
        a.sendv([bytes([i]) * 4])
        got = 0
        while got < 4:
            got += b.recv_into(buf[got:] if got else buf, hold_gil=True)
        assert bytes(buf) == bytes([i]) * 4


def test_waits_from_several_threads_each_use_their_own_poll() -> None:
    """Poll objects are cached per thread (a poll object polled from two threads at once
    raises): readers in turn on different threads, and a writer waiting for room on another,
    all complete."""
    a, b = _pair()
    a._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
    data = os.urandom(1 << 20)
    outs: list[bytearray] = []
    for _ in range(3):
        out = bytearray()
        reader = threading.Thread(target=_drain, args=(b, len(data), out))
        reader.start()
        writer = threading.Thread(target=a.sendv, args=([data],))
        writer.start()
        writer.join(10)
        reader.join(10)
        outs.append(out)
    assert all(bytes(o) == data for o in outs)


def _tcp_pair(timeout: float = 5.0) -> tuple[Channel, Channel]:
    with Listener("tcp:127.0.0.1:0", timeout=timeout) as lst:
        src = connect(lst.address, timeout=timeout)
        return src, lst.accept(timeout=timeout)


def test_wait_buffered_returns_once_enough_is_there() -> None:
    src, dst = _tcp_pair()
    try:
        src.send(b"x" * 1000)
        feeder = threading.Timer(0.1, lambda: src.send(b"y" * 63_000))
        feeder.start()
        t0 = time.monotonic()
        dst.wait_buffered(64_000, 5.0)
        waited = time.monotonic() - t0
        feeder.join()
        # woken by the second send, not by the first 1000 bytes, and long before the time-out
        assert 0.05 < waited < 2.0, waited
        assert len(dst.recv(1 << 20)) == 64_000
    finally:
        src.close()
        dst.close()


def test_wait_buffered_gives_up_at_its_time_out_and_leaves_reads_as_they_were() -> None:
    src, dst = _tcp_pair(timeout=0.5)
    try:
        src.send(b"tail")
        t0 = time.monotonic()
        dst.wait_buffered(1 << 19, 0.05)  # a tail shorter than the mark: only the time-out
        assert 0.04 < time.monotonic() - t0 < 1.0
        assert dst.recv(100) == b"tail"
        # the mark is reset: an ordinary wait wakes on a few bytes, not on half a MiB
        threading.Timer(0.05, lambda: src.send(b"ok")).start()
        t0 = time.monotonic()
        assert dst.recv(100) == b"ok"
        assert time.monotonic() - t0 < 0.4
    finally:
        src.close()
        dst.close()


def test_wait_buffered_returns_at_the_end_of_the_stream_and_on_shutdown() -> None:
    src, dst = _tcp_pair()
    try:
        src.send(b"last")
        src.close_write()
        t0 = time.monotonic()
        dst.wait_buffered(1 << 19, 5.0)
        assert time.monotonic() - t0 < 1.0
        assert dst.recv(100) == b"last"
        assert dst.recv(100) == b""
        threading.Timer(0.05, dst.shutdown).start()
        t0 = time.monotonic()
        dst.wait_buffered(1 << 19, 5.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        src.close()
        dst.close()


def test_wait_buffered_does_nothing_on_a_pipe() -> None:
    r, w = os.pipe()
    ch = Channel("pipe", r, None, timeout=1.0)
    try:
        t0 = time.monotonic()
        ch.wait_buffered(1 << 19, 5.0)
        assert time.monotonic() - t0 < 0.5
    finally:
        ch.close()
        os.close(w)
        os.close(r)


def test_rate_limiter_windows_keep_their_pace() -> None:
    """A thread back 5 ms late for a window does not push every later window back: the next
    one still starts 100 ms after the last (a late thread stretched each window, and a 128
    MiB/s limit carried ~111 MiB/s); a window missed entirely is not made up."""

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    rl = RateLimiter(1000, clock=clock)  # 100 bytes per 100 ms window
    rl.account(100)
    clock.now = 0.105  # back late: the window that began at 0.1 is open, 95 ms of it left
    assert rl.budget_left() == 100
    rl.account(100)
    clock.now = 0.2
    assert rl.budget_left() == 100
    rl.account(100)
    clock.now = 0.55  # three windows missed: one budget, not four
    assert rl.budget_left() == 100
    rl.account(100)
    clock.now = 0.59
    assert rl.over_budget()
