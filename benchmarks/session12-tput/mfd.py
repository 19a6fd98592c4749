"""quick multifd experiment (session 12, tput): one 1 GiB migration to a prefaulted destination,
CPU split per side and per thread. python mfd.py CHANNELS [THREADS] [REPEAT]; env KIND=idle|random,
PERF=1 / SPY=1 / STRACE=1 record the migration (outputs under /tmp/tput)"""
import os, sys, time, tempfile
from pathlib import Path
from livemig.bench import throughput as T
from livemig.migration.manager import MigrationManager
from livemig.transport.open import Listener
size = 1 << 30
ch = int(sys.argv[1]); thr = int(sys.argv[2]) if len(sys.argv) > 2 else 0
rep = int(sys.argv[3]) if len(sys.argv) > 3 else 3
THREADS = []
m = T._machine(size)
if os.environ.get("SCAN") == "0":
    from livemig.migration.multifd import MultifdSender; MultifdSender.scan_ahead = False
T.fill(m.ram_blocks[0].array, os.environ.get("KIND", "random"))
wd = Path(tempfile.mkdtemp())
def pst(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / 100, int(f[12]) / 100
for r in range(rep):
    T._reuse(m)
    with Listener("tcp:127.0.0.1:0") as probe:
        uri = probe.address
    dest = T._Destination(size, wd, True)
    caps = [{"capability": "x-checksums", "state": False}, {"capability": "multifd", "state": True}]
    params = {"multifd-channels": ch, "multifd-compression": "none"}
    if thr: params["x-multifd-threads"] = thr
    dest.qmp.command("migrate-set-capabilities", capabilities=caps)
    dest.qmp.command("migrate-set-parameters", **params, **{"x-io-timeout": 120000})
    dest.qmp.command("migrate-incoming", uri=uri)
    mgr = MigrationManager(m)
    mgr.set_capabilities([*caps, {"capability": "return-path", "state": True}])
    mgr.set_parameters({**params, "max-bandwidth": 1 << 40, "x-io-timeout": 120000, "downtime-limit": 300, "zero-page-detection": "multifd"})
    import threading as _th
    seen = {}; stop = _th.Event()
    def _tasks(pid):
        out = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                raw = open(f"/proc/{pid}/task/{tid}/stat").read()
            except OSError:
                continue
            name = raw[raw.index("(")+1:raw.rindex(")")]
            f = raw.rsplit(")", 1)[1].split()
            out[(pid, tid, name)] = (int(f[11]), int(f[12]))
        return out
    base = {**_tasks(os.getpid()), **_tasks(dest.proc.pid)}
    def _mon():
        while not stop.is_set():
            for k, v in {**_tasks(os.getpid()), **_tasks(dest.proc.pid)}.items():
                seen[k] = v
            time.sleep(0.05)
    mon = _th.Thread(target=_mon, daemon=True); mon.start()
    t = os.times(); du0, ds0 = pst(dest.proc.pid)
    import subprocess, signal
    perf = [subprocess.Popen(["perf","record",*(["-g"] if os.environ.get("PERF")=="g" else []),"-p",str(p),"-o",f"/tmp/tput/mfd-{ch}-{thr}-{r}-{side}.data"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL) for side, p in (("src",os.getpid()),("dst",dest.proc.pid))] if os.environ.get("PERF") else None
    spy = [subprocess.Popen(["/tmp/tput/tools/bin/py-spy","record","-p",str(p),"-r","500","--nonblocking","--threads","-f","raw","-o",f"/tmp/tput/spy-{side}.txt"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL) for side, p in (("src",os.getpid()),("dst",dest.proc.pid))] if os.environ.get("SPY") else None
    if spy: time.sleep(1.0)
    st = [subprocess.Popen(["strace",*(["-f","-e","trace=futex,writev,poll","-qq"] if os.environ.get("STRACE")=="t" else ["-c","-f"]),"-p",str(p),"-o",f"/tmp/tput/strace-{side}.txt"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL) for side, p in (("src",os.getpid()),("dst",dest.proc.pid))] if os.environ.get("STRACE") else None
    if st: time.sleep(1.0)
    if perf: time.sleep(0.5)
    mgr.migrate(uri); mgr.outgoing.join(600)
    if perf: [(p.send_signal(signal.SIGINT), p.wait()) for p in perf]
    if spy: [(p.send_signal(signal.SIGINT), p.wait()) for p in spy]
    if st: [(p.send_signal(signal.SIGINT), p.wait()) for p in st]
    t2 = os.times(); du1, ds1 = pst(dest.proc.pid)
    stop.set(); mon.join()
    per = {}
    for k, (u, sy) in seen.items():
        u0, s0 = base.get(k, (0, 0))
        if (u - u0) + (sy - s0) >= 2:
            nm = ("S:" if k[0] == os.getpid() else "D:") + k[2]
            pu, ps = per.get(nm, (0, 0)); per[nm] = (pu + u - u0, ps + sy - s0)
    THREADS.append(per)
    q = mgr.query_migrate()
    act = (q["total-time"] - q["setup-time"]) / 1000
    print(f"ch={ch} thr={thr}: {size/act/1e9:.2f} GB/s  src user {t2.user-t.user:.2f} sys {t2.system-t.system:.2f}  dst user {du1-du0:.2f} sys {ds1-ds0:.2f}  {q['status']}", flush=True)
    dest.close()
    print("   " + "  ".join(f"{k} {u*10}/{sy*10}" for k, (u, sy) in sorted(per.items())), flush=True)
