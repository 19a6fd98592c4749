"""Receiver thread CPU only (session 14, helper tput): one writer process feeds N socketpairs a
job (JOB_PAGES of random pages, as _run_packets builds them) at a time, round robin like the
source's single worker; the real _RecvWorker reads them in this thread: its thread CPU per
GiB (the first round faults the destination's RAM in: skip it). argv: N [MiB]; env R rounds."""
import numpy as np, time, os, itertools, socket, threading, sys
from livemig.bench import throughput as T
from livemig.savevm.ram import RamLoader
from livemig.migration import multifd as M
from livemig.transport import Channel
N = int(sys.argv[1]); size = int(sys.argv[2] if len(sys.argv) > 2 else 512) << 20
m = T._machine(size); a = m.ram_blocks[0].array
chunk = np.random.default_rng(1).integers(1, 256, 16 << 20, dtype=np.uint8)
for s in range(0, size, len(chunk)): a[s:s+len(chunk)] = chunk[:size-s]
b = m.ram_blocks[0]
class S: pass
s = S(); s.names = {}; s.packet_num = itertools.count(); s.flag = 0; s.checks = None
ch = M._SendChannel.__new__(M._SendChannel); ch.sender = s
npages = size // 4096; J = M.JOB_PAGES
jobs = [ch._run_packets(0, b, i, J) for i in range(0, npages, J)]
dm = T._machine(size)
def once():
    pairs = [socket.socketpair() for _ in range(N)]
    pid = os.fork()
    if pid == 0:
        for ra, _ in pairs: ra.close()
        for j, bufs in enumerate(jobs):
            w = pairs[j % N][1]
            views = [memoryview(x).cast("B") for x in bufs]
            while views:
                n = os.writev(w.fileno(), views)
                while n:
                    if n >= len(views[0]): n -= len(views[0]); views.pop(0)
                    else: views[0] = views[0][n:]; n = 0
        for _, w in pairs: w.close()
        os._exit(0)
    for _, w in pairs: w.close()
    loader = RamLoader(dm.ram_blocks)
    r = M.MultifdReceiver.__new__(M.MultifdReceiver)
    r.loader = loader; r.checks = None; r.checked = None; r.block_sizes = loader.block_sizes()
    r.views = {name: bb.view for name, bb in loader.blocks.items()}
    r.compression = "none"; r.flag = 0; r.timeout = 30; r.error = None; r.closing = False
    r._lock = threading.Lock(); r._arrived = threading.Semaphore(0)
    r.on_error = lambda reason: None
    r.channels = [M._RecvChannel(r, i, Channel.from_socket(ra, f"rx{i}")) for i, (ra, _) in enumerate(pairs)]
    w = M._RecvWorker(r, r.channels)
    t0 = time.thread_time(); w0 = time.perf_counter(); ru0 = os.times()
    w._run()
    t1 = time.thread_time(); w1 = time.perf_counter(); ru1 = os.times()
    os.waitpid(pid, 0)
    assert r.error is None, r.error
    got = sum(c.normal for c in r.channels); assert got == npages, (got, npages)
    gib = size / (1 << 30)
    return (t1 - t0) / gib, (ru1.user - ru0.user) / gib, (ru1.system - ru0.system) / gib, size / (w1 - w0) / 1e9
R = int(os.environ.get("R", "3"))
for _ in range(R):
    c, u, sy, gbs = once()
    print(f"{os.environ.get('TAG', '')} N={N} thread cpu {c:.3f} s/GiB (user {u:.3f} sys {sy:.3f})  {gbs:.2f} GB/s", flush=True)
