"""The machine's floor for one post-copy page request, measured in the same run as the benchmark.

``livemig bench postcopy`` reports request latency; on a shared machine the same code gives a
p50 twice as high in a slow hour as in a quiet one. This module measures, beside it, the
smallest Python program with post-copy's request path, so that the benchmark can print its
latency as a ratio to what this machine can do right now:

* a thread touches pages of a private region registered with userfaultfd in missing mode (the
  guest's vCPU);
* a fault thread reads each fault and writes an 8-byte request over loopback TCP to a page
  server in another process (the source's return-path thread);
* the server writes the page back on a second connection (as ``postcopy-preempt`` does);
* a receive thread installs it with ``UFFDIO_COPY``, which wakes the toucher.

Latency is from the fault read to the install, as livemig's destination measures its own.
There is no migration stream, no guest, no bitmap, no lock: what is left is the kernel's
loopback TCP, its wake-ups, and the interpreter. The three request-path threads get the
real-time priority livemig's own take (``boost_thread``). ``busy`` processes write memory
meanwhile, as a guest's vCPUs keep the cores busy and the caches cold (on these VMs a busy core
wakes a thread faster than an idle one: the floor with busy cores is the lower one, by about
half).
"""

from __future__ import annotations

import ctypes
import mmap
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from livemig.errors import LivemigError
from livemig.memtrack import uffd as U
from livemig.memtrack._sys import buffer_address
from livemig.migration.postcopy_source import RT_PRIORITY, boost_thread
from livemig.units import PAGE_SIZE

TIMEOUT = 10.0  # seconds any step may take before the measurement gives up

_SERVER = r"""
import os, socket, sys
try:  # the priority livemig's return-path thread gives itself (boost_thread)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(sys.argv[2])))
except (OSError, AttributeError):
    pass
ls = socket.create_server(("127.0.0.1", 0))
ls.settimeout(float(sys.argv[1]))
print(ls.getsockname()[1], flush=True)
req, _ = ls.accept()
rep, _ = ls.accept()
for s in (req, rep):
    s.settimeout(float(sys.argv[1]))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
page = bytes(range(256)) * 16
try:
    while True:
        r = b""
        while len(r) < 8:
            got = req.recv(8 - len(r))
            if not got:
                raise EOFError
            r += got
        rep.sendall(r + page)
except (OSError, EOFError):
    pass
"""

# A stand-in for a vCPU: rewrites one byte of every page of 48 MiB, as memstress does, so the
# request path's code and data are pushed out of the caches between two faults as in a run
# with a guest (a bare spin loop touches no memory and leaves them in the caches).
_BUSY = """
import sys, time
import numpy as np
pages = np.ones((12288, 4096), np.uint8)  # populated before the floor starts
print("busy", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pages[:, 0] += 1
"""

_libc = ctypes.CDLL(None)
_REQ = struct.Struct("<Q")


def measure(faults: int = 2000, busy: int = 0) -> dict[str, Any]:
    """Latency percentiles (microseconds) of ``faults`` remote page faults, one at a time,
    with ``busy`` spinning processes beside them."""
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[socket.socket] = []
    uf: U.Userfaultfd | None = None
    threads: list[threading.Thread] = []
    stop = threading.Event()  # ends the fault thread's wait when the measurement is over
    area = mmap.mmap(-1, faults * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        server = subprocess.Popen([sys.executable, "-c", _SERVER, str(TIMEOUT), str(RT_PRIORITY)],
                                  stdout=subprocess.PIPE)  # fmt: skip
        procs.append(server)
        assert server.stdout is not None
        port = int(server.stdout.readline() or 0)
        if not port:
            raise LivemigError("request floor: the page server did not start")
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
        req, rep = socks
        for _ in range(busy):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY, str(4 * TIMEOUT)],
                                          stdout=subprocess.PIPE))  # fmt: skip
        for p in procs[1:]:
            assert p.stdout is not None
            p.stdout.readline()  # busy now (or dead: then the floor runs without it)
        base = buffer_address(area)
        uf = U.Userfaultfd(0)
        uf.register(base, faults * PAGE_SIZE, U.UFFDIO_REGISTER_MODE_MISSING)
        asked: dict[int, float] = {}
        lat: list[float] = []
        errors: list[BaseException] = []
        stage = np.zeros(PAGE_SIZE, np.uint8)

        def fault_thread() -> None:
            requested = 0
            boost_thread(realtime=True)
            try:
                idle_since = time.monotonic()
                while requested < faults and not stop.is_set():
                    # short polls, so that a failed measurement ends this thread at once:
                    # closing the uffd should wake the poll, but once in a CI run it did not
                    if not uf.wait(0.1):
                        if time.monotonic() - idle_since > TIMEOUT:
                            raise LivemigError("no fault within the time-out")
                        continue
                    idle_since = time.monotonic()
                    for ev in uf.read_events():
                        if ev.is_pagefault:
                            addr = ev.address & ~(PAGE_SIZE - 1)
                            asked[addr] = time.monotonic()
                            req.sendall(_REQ.pack(addr))
                            requested += 1
            except BaseException as exc:  # reported by the caller, not lost in a thread
                errors.append(exc)

        def receive_thread() -> None:
            buf = bytearray(_REQ.size + PAGE_SIZE)
            view = memoryview(buf)
            boost_thread(realtime=True)
            try:
                for _ in range(faults):
                    got = 0
                    while got < len(buf):
                        n = rep.recv_into(view[got:])
                        if not n:
                            raise LivemigError("the page server went away")
                        got += n
                    addr = _REQ.unpack_from(buf)[0]
                    stage[:] = np.frombuffer(buf, np.uint8, PAGE_SIZE, _REQ.size)
                    uf.copy(addr, stage.ctypes.data, PAGE_SIZE)
                    lat.append(time.monotonic() - asked.pop(addr))
            except BaseException as exc:
                errors.append(exc)

        def toucher() -> None:
            for i in range(faults):
                _libc.memset(ctypes.c_void_p(base + i * PAGE_SIZE), 1, 1)

        threads += [threading.Thread(target=f, daemon=True, name=f"floor/{f.__name__}")
                   for f in (fault_thread, receive_thread, toucher)]  # fmt: skip
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT + faults * 0.01
        # a failed thread ends the wait: the toucher may be stuck on a fault nobody will serve
        while not errors and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            threads[2].join(0.05)
        if errors:
            raise LivemigError(f"request floor: {errors[0]}")
        if len(lat) < faults:
            raise LivemigError(f"request floor: {len(lat)} of {faults} faults served in time")
    finally:
        stop.set()
        if uf is not None:
            uf.close()  # wakes a toucher still blocked on a fault: it retries without uffd
        for t in threads:
            t.join(TIMEOUT)  # none may touch the region after it is unmapped
        for s in socks:
            s.close()
        for p in procs:
            p.kill()
            p.wait()
        area.close()
    us = np.array(lat) * 1e6
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    return {"faults": faults, "busy": busy, "p50-us": round(float(p50), 1),
            "p90-us": round(float(p90), 1), "p99-us": round(float(p99), 1)}  # fmt: skip
