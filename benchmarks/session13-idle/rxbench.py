"""Receiver micro-benchmark (session 13, helper idle): a prebuilt idle multifd stream (one page in 64
holds data) through a socketpair into one _RecvChannel; its thread CPU per packet. env SIZE, R, PROF=1 (cProfile)."""
import numpy as np, time, os, itertools, socket, threading, sys
from livemig.bench import throughput as T
from livemig.savevm.ram import zero_mask, RamLoader
from livemig.migration import multifd as M
from livemig.transport import Channel
size = int(os.environ.get("SIZE", 256 << 20))
m = T._machine(size); a = m.ram_blocks[0].array; T.fill(a, os.environ.get("KIND","idle"))
b = m.ram_blocks[0]
class S: pass
s = S(); s.names = {}; s.packet_num = itertools.count(); s.flag = 0; s.checks = None
ch = M._SendChannel.__new__(M._SendChannel); ch.sender = s
w = a.view(np.uint64).reshape(-1, 512); n = w.shape[0]; J = M.JOB_PAGES
bufs = []
for i in range(0, n, J):
    j = np.arange(i, i+J)
    bufs += ch._mixed_packets(0, b, j, zero_mask(w, j))
bufs.append(M.MultifdPacket(M.MULTIFD_FLAG_SYNC, next(s.packet_num), "", np.empty(0, np.uint64), 0, 0, M.PAGES_ALLOC, 0).pack())
blob = b"".join(bytes(x) for x in bufs)
npk = n // 128
dm = T._machine(size)
def once():
    sa, sb = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        sa.close(); sb.sendall(blob); sb.close(); os._exit(0)
    sb.close()
    loader = RamLoader(dm.ram_blocks)
    r = M.MultifdReceiver.__new__(M.MultifdReceiver)
    r.loader = loader; r.checks = None; r.checked = None; r.block_sizes = loader.block_sizes()
    r.views = {name: bb.view for name, bb in loader.blocks.items()}
    r.compression = "none"; r.flag = 0; r.timeout = 30; r.error = None; r.closing = False
    r._lock = threading.Lock(); r._arrived = threading.Semaphore(0)
    c = M._RecvChannel(r, 0, Channel.from_socket(sa, "rx"))
    time.sleep(0.2)  # let the writer fill the socket buffer
    t0 = time.thread_time(); w0 = time.perf_counter()
    while True:
        got = c.packet()
        if got == "sync": break
    t1 = time.thread_time(); w1 = time.perf_counter()
    os.waitpid(pid, 0); sa.close()
    assert c.zero + c.normal == n, (c.zero, c.normal)
    return (t1 - t0) / npk * 1e6, (w1 - w0)
res = [once() for _ in range(int(os.environ.get("R", "5")))]
print(f"{os.environ.get('TAG','')} rx: {min(x[0] for x in res):.1f} us/packet CPU (min), median {sorted(x[0] for x in res)[len(res)//2]:.1f}")
if os.environ.get("PROF"):
    import cProfile, pstats
    cProfile.run("once()", "/tmp/idle/rx.prof")
    pstats.Stats("/tmp/idle/rx.prof").sort_stats("tottime").print_stats(18)
