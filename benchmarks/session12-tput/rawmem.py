"""raw loopback, receiver memory kinds: python rawmem.py KIND...  (anon | anonw | shmfile | memfd)"""
import os, sys, socket, threading, mmap, resource, time
import numpy as np
SIZE = 1 << 30; HDR = 1344; PKT = 512 * 1024
src = mmap.mmap(-1, SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | 0x8000)
np.frombuffer(src, np.uint8)[:] = np.random.default_rng(1).integers(1, 256, SIZE, dtype=np.uint8)
srcv = memoryview(src); hdr = bytes(HDR)
def mem(kind):
    if kind == "anon":
        return mmap.mmap(-1, SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | 0x8000)
    if kind == "anonw":  # populated by writing
        m = mmap.mmap(-1, SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS); np.frombuffer(m, np.uint8)[::4096] = 0; return m
    if kind == "shmfile":
        p = f"/dev/shm/rawmem-{os.getpid()}"; fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600); os.ftruncate(fd, SIZE)
        m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED); os.close(fd); os.unlink(p); np.frombuffer(m, np.uint8)[::4096] = 0; return m
    if kind == "anonpw":
        m = mmap.mmap(-1, SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS); m.madvise(23); return m
    if kind == "memfdpw":
        fd = os.memfd_create("x"); os.ftruncate(fd, SIZE); m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED); os.close(fd); m.madvise(23); return m
    if kind == "memfd":
        fd = os.memfd_create("x"); os.ftruncate(fd, SIZE); m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED | 0x8000); os.close(fd); return m
def sender(sock):
    for j in range(0, SIZE // PKT, 8):
        bufs = []
        for p in range(j, j + 8): bufs += [hdr, srcv[p * PKT:(p + 1) * PKT]]
        sock.sendmsg(bufs)
def rall(s, v):
    got = 0
    while got < len(v):
        n = s.recv_into(v[got:]); got += n
def receiver(sock, dst):
    t0 = resource.getrusage(resource.RUSAGE_THREAD)
    dv = memoryview(dst); h = memoryview(bytearray(HDR))
    for p in range(SIZE // PKT):
        rall(sock, h); rall(sock, dv[p * PKT:(p + 1) * PKT])
    t1 = resource.getrusage(resource.RUSAGE_THREAD); res['r'] = t1.ru_stime - t0.ru_stime; res['f'] = t1.ru_minflt - t0.ru_minflt
for rnd in range(int(os.environ.get("ROUNDS", 3))):
    for kind in sys.argv[1:]:
        res = {}; dst = mem(kind)
        ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen()
        c = socket.create_connection(ls.getsockname()); s, _ = ls.accept()
        t = time.perf_counter()
        th = [threading.Thread(target=sender, args=(c,)), threading.Thread(target=receiver, args=(s, dst))]
        [x.start() for x in th]; [x.join() for x in th]
        print(f"{kind:8s} {SIZE/(time.perf_counter()-t)/1e9:.2f} GB/s recv sys {res['r']:.3f} faults {res['f']}", flush=True)
        c.close(); s.close(); ls.close(); dst.close()
