"""Raw loopback TCP, no livemig: one sender thread, MODE=writev|splice|zerocopy, N sockets round
robin per 4 MiB job of 8 packets (1344-byte header + 512 KiB) from a 1 GiB memfd; one receiver
thread reading header+pages with readv into a memfd (RXMODE=bulk: 1 MiB recv_into, as the TCP
RAM-to-RAM baseline); NODELAY=0|1. Prints user/sys s of each side and GB/s. argv: N MiB.
Session 14 ran it with N=1 only (its receiver fails now and then with N > 1: not looked into)."""
import os, sys, socket, mmap, time, ctypes, select, resource, threading
import numpy as np
N = int(sys.argv[1]); SIZE = int(sys.argv[2]) << 20; MODE = os.environ.get("MODE", "writev")
PK = 512 << 10; HDR = 1344; JOB = 8
def ram(size):
    fd = os.memfd_create("ram"); os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    m.madvise(23)
    return m
if os.environ.get("ROLE") == "rx":
    m = ram(SIZE); mv = memoryview(m)
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8); print(ls.getsockname()[1], flush=True)
    socks = [ls.accept()[0] for _ in range(N)]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    hdr = bytearray(HDR); hv = memoryview(hdr)
    pos = [0] * N  # packets received per socket
    done = 0; total = SIZE // PK
    p = select.poll(); [p.register(s.fileno(), select.POLLIN) for s in socks]
    fds = {s.fileno(): i for i, s in enumerate(socks)}
    if os.environ.get("RXMODE") == "bulk":
        tot = 0; at = 0; expect = SIZE + (SIZE // PK) * HDR
        share = SIZE // N
        import threading
        def one(i, sk):
            global tot
            v = mv[i*share:(i+1)*share]; at = 0
            while True:
                k = sk.recv_into(v[at:at + (1 << 20)])
                if not k: break
                tot += k; at = (at + k) % share
        one(0, socks[0]) if N == 1 else [t.join() for t in [threading.Thread(target=one, args=(i, sk)) for i, sk in enumerate(socks)] if not t.start()]
        done = total
    while done < total:
        for fd, _ in p.poll(1000):
            i = fds[fd]
            # packet number k on socket i -> global packet: job j = k//JOB on socket i is global job i + N*j
            k = pos[i]; g = (i + N * (k // JOB)) * JOB + k % JOB
            bufs = [hv, mv[g * PK:(g + 1) * PK]]
            while bufs:
                n = os.readv(fd, bufs)
                assert n
                while n:
                    if n >= len(bufs[0]): n -= len(bufs[0]); bufs.pop(0)
                    else: bufs[0] = bufs[0][n:]; n = 0
            pos[i] += 1; done += 1
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ok = bytes(mv[:64]) == bytes(64)
    print(f"{r1.ru_utime-r0.ru_utime:.3f} {r1.ru_stime-r0.ru_stime:.3f} {int(ok)}", flush=True)
    sys.exit()
import subprocess
m = ram(SIZE); a = np.frombuffer(m, np.uint8)
chunk = np.random.default_rng(1).integers(1, 256, 16 << 20, dtype=np.uint8)
for s in range(0, SIZE, len(chunk)): a[s:s+len(chunk)] = chunk[:SIZE-s]
mv = memoryview(m)
p = subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env={**os.environ, "ROLE": "rx"}, stdout=subprocess.PIPE, text=True)
port = int(p.stdout.readline())
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(N)]
for s in socks:
    if os.environ.get('NODELAY','1')=='1': s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if MODE == 'zerocopy': s.setsockopt(socket.SOL_SOCKET, 60, 1)  # SO_ZEROCOPY
zc_calls = 0
libc = ctypes.CDLL(None, use_errno=True)
libc.vmsplice.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
libc.vmsplice.restype = ctypes.c_ssize_t
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
iov = (ctypes.c_uint64 * 2)()
PIPESZ = int(os.environ.get("PIPESZ", 1 << 20))
pr, pw = os.pipe(); import fcntl; fcntl.fcntl(pw, 1031, PIPESZ)  # F_SETPIPE_SZ
hdr = bytes(HDR)
r0 = resource.getrusage(resource.RUSAGE_SELF); w0 = time.perf_counter()
njobs = SIZE // PK // JOB
for j in range(njobs):
    s = socks[j % N]; fd = s.fileno()
    if MODE == "writev":
        bufs = []
        for k in range(JOB):
            g = j * JOB + k; bufs += [hdr, mv[g * PK:(g + 1) * PK]]
        tot = sum(len(b) for b in bufs)
        while bufs:
            n = os.writev(fd, bufs)
            while n:
                if n >= len(bufs[0]): n -= len(bufs[0]); bufs.pop(0)
                else: bufs[0] = bufs[0][n:]; n = 0
    elif MODE == "zerocopy":
        bufs = []
        for k in range(JOB):
            g = j * JOB + k; bufs += [hdr, mv[g * PK:(g + 1) * PK]]
        while bufs:
            try:
                n = s.sendmsg(bufs, [], 0x4000000)  # MSG_ZEROCOPY
            except BlockingIOError:
                n = 0
            zc_calls += 1
            while n:
                if n >= len(bufs[0]): n -= len(bufs[0]); bufs.pop(0)
                else: bufs[0] = bufs[0][n:]; n = 0
            # reap completions (never block)
            while True:
                try:
                    s.recvmsg(0, 4096, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
    else:
        for k in range(JOB):
            g = j * JOB + k
            s.sendall(hdr, socket.MSG_MORE)
            off = g * PK; left = PK
            while left:
                step = min(left, PIPESZ)
                iov[0] = base + off; iov[1] = step
                n = libc.vmsplice(pw, iov, 1, 0)
                assert n > 0, ctypes.get_errno()
                moved = 0
                while moved < n:
                    moved += os.splice(pr, fd, n - moved, flags=4 if (left - n) or k < JOB - 1 else 0)  # SPLICE_F_MORE
                off += n; left -= n
for s in socks: s.shutdown(socket.SHUT_WR)
out = p.stdout.readline().split(); p.wait()
w1 = time.perf_counter(); r1 = resource.getrusage(resource.RUSAGE_SELF)
print(f"{MODE} ch={N} tx {r1.ru_utime-r0.ru_utime:.3f} {r1.ru_stime-r0.ru_stime:.3f}  rx {out[0]} {out[1]}  {SIZE/(w1-w0)/1e9:.2f} GB/s ok={out[2]}")
