"""multifd receive/send CPU without the migration around it:
python rxbench.py NCHAN [SIZE_MIB]   -> prints 'tx user sys  rx user sys  GB/s'"""
import os, sys, socket, time, resource, subprocess, threading
import numpy as np
nch = int(sys.argv[1]); size = int(sys.argv[2] if len(sys.argv) > 2 else 1024) << 20
if os.environ.get("RX_ROLE") == "rx":
    from livemig.machine.ram import RAMBlock
    from livemig.savevm.ram import RamLoader
    from livemig.migration.multifd import MultifdReceiver
    from livemig.transport.channel import Channel
    blk = RAMBlock("pc.ram", size, prefault=True); loader = RamLoader([blk])
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8)
    print(ls.getsockname()[1], flush=True)
    chans = []
    for i in range(nch):
        s, _ = ls.accept(); s.recv(64, socket.MSG_WAITALL)  # the init packet
        chans.append(Channel.from_socket(s, f"multifd {i}"))
    spy = subprocess.Popen(["/tmp/tput/tools/bin/py-spy","record","-p",str(os.getpid()),"-r","1000","--native","--threads","-f","raw","-o","/tmp/tput/spy-rx.txt"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL) if os.environ.get("SPY") else None
    if spy: time.sleep(1)
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    rx = MultifdReceiver(loader, chans, timeout=30)
    for w in rx.workers: w.thread.join()
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    if spy:
        import signal; spy.send_signal(signal.SIGINT); spy.wait()
    assert rx.error is None, rx.error
    assert rx.normal_pages == size // 4096, rx.normal_pages
    print(f"{t1.ru_utime - t0.ru_utime:.3f} {t1.ru_stime - t0.ru_stime:.3f}", flush=True)
    sys.exit()
from livemig.machine.ram import RAMBlock
from livemig.savevm.ram import Batch
from livemig.migration.multifd import MultifdSender
from livemig.transport.channel import Channel
if os.environ.get("SCAN") == "0": MultifdSender.scan_ahead = False
blk = RAMBlock("pc.ram", size, prefault=True)
rng = np.random.default_rng(1)
pages = blk.array.reshape(-1, 4096)
for s in range(0, len(pages), 4096):
    pages[s:s+4096] = rng.integers(1, 256, (min(4096, len(pages)-s), 4096), dtype=np.uint8)
p = subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env={**os.environ, "RX_ROLE": "rx"}, stdout=subprocess.PIPE, text=True)
port = int(p.stdout.readline())
trk = None
if os.environ.get("WP") == "1":
    from livemig.memtrack import open_tracker
    trk = open_tracker([blk]); trk.start()
chans = []
for i in range(nch):
    s = socket.create_connection(("127.0.0.1", port)); chans.append(Channel.from_socket(s, f"multifd {i}"))
spy = subprocess.Popen(["/tmp/tput/tools/bin/py-spy","record","-p",str(os.getpid()),"-r","1000","--native","--threads","-f","raw","-o","/tmp/tput/spy-tx.txt"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL) if os.environ.get("SPYTX") else None
if spy: time.sleep(1)
t0 = resource.getrusage(resource.RUSAGE_SELF); w0 = time.perf_counter()
tx = MultifdSender([blk], chans, timeout=30)
idx = np.arange(blk.npages)
tx.send_batches([Batch(blk, idx, idx[:0])])
tx.close()
w1 = time.perf_counter(); t1 = resource.getrusage(resource.RUSAGE_SELF)
if spy:
    import signal; spy.send_signal(signal.SIGINT); spy.wait()
out = p.stdout.readline().split(); p.wait()
if trk is not None: trk.stop()
print(f"tx {t1.ru_utime - t0.ru_utime:.3f} {t1.ru_stime - t0.ru_stime:.3f}  rx {out[0]} {out[1]}  {size / (w1 - w0) / 1e9:.2f} GB/s", flush=True)
