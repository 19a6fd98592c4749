"""One process, R multifd migrations of a 1 GiB guest (session 14, helper tput; from session
13's mfd.py): GB/s, CPU s per GB of both processes, and the source's thread CPU inside the
measured window: the send worker's jobs (``job_cpu``, of it ``sendv_cpu`` in writev) and the
migration thread's ``_send_part`` / ``_sync`` / ``_complete`` (``zero_mask`` its zero probe).
Thread CPU (``time.thread_time``) held within ~10 % on a loaded host where GB/s swung 3x.
env KIND (idle, random), CH (channels), R (runs), TAG (label), SPLIT=1 (per-thread /proc
sampler), NOSCAN=1 (the zero probe in the channel thread: scan_ahead off), JOBPK=N (data jobs
of N packets). Run with PYTHONPATH=<a tree>/src to measure another tree (``ab.sh``)."""
import os, sys, time, tempfile, threading, subprocess, signal
from pathlib import Path
from livemig.bench import throughput as T
from livemig.migration.manager import MigrationManager
from livemig.transport.open import Listener
size = int(os.environ.get("SIZE", 1 << 30))
ch = int(os.environ.get("CH", "4")); thr = int(os.environ.get("THR", "0"))
rep = int(os.environ.get("R", "3")); kind = os.environ.get("KIND", "idle")
tag = os.environ.get("TAG", "")
from livemig.migration.multifd import MultifdSender
if os.environ.get("NOSCAN"): MultifdSender.scan_ahead = False

import livemig.migration.multifd as MF
from livemig.transport import channel as CHM
ACC = {"job_wall":0.0,"job_cpu":0.0,"sendv_wall":0.0,"sendv_cpu":0.0,"jobs":0,"get_wall":0.0}
_sj = MF._SendChannel.send_job
def send_job(self,*a,**k):
    w0=time.perf_counter(); c0=time.thread_time()
    try: return _sj(self,*a,**k)
    finally:
        ACC["job_wall"]+=time.perf_counter()-w0; ACC["job_cpu"]+=time.thread_time()-c0; ACC["jobs"]+=1
MF._SendChannel.send_job = send_job
_sv = CHM.Channel.sendv
def sendv(self,*a,**k):
    if not threading.current_thread().name.startswith("mig/src/send"): return _sv(self,*a,**k)
    w0=time.perf_counter(); c0=time.thread_time()
    try: return _sv(self,*a,**k)
    finally:
        ACC["sendv_wall"]+=time.perf_counter()-w0; ACC["sendv_cpu"]+=time.thread_time()-c0
CHM.Channel.sendv = sendv

import livemig.savevm.ram as RAMM
from livemig.migration import source as SRC
MT = {}
def wrap(obj, name, key, only_main=True):
    f = getattr(obj, name)
    def g(*a, **k):
        if only_main and threading.current_thread().name != "mig/src/main": return f(*a, **k)
        c0 = time.thread_time()
        try: return f(*a, **k)
        finally: MT[key] = MT.get(key, 0.0) + time.thread_time() - c0
    setattr(obj, name, g)
wrap(SRC.OutgoingMigration, "_run", "run_total")
wrap(SRC.OutgoingMigration, "_send_part", "send_part")
wrap(RAMM.RamSaver, "take", "take")
wrap(MF.MultifdSender, "send_batches", "send_batches")
wrap(MF.MultifdSender, "_put", "put")
wrap(MF.MultifdSender, "sync", "mf_sync")
wrap(MF.MultifdSender, "_scan_one_queued", "scan_queued")
wrap(SRC.OutgoingMigration, "_sync", "sync")
wrap(SRC.OutgoingMigration, "_setup", "setup")
wrap(SRC.OutgoingMigration, "_complete", "complete")
wrap(SRC.OutgoingMigration, "_cleanup", "cleanup")
if os.environ.get('JOBPK'): MF.JOB_PAGES = int(os.environ['JOBPK']) * 128
MF.zero_mask_orig = MF.zero_mask
def zm(*a):
    c0 = time.thread_time()
    try: return MF.zero_mask_orig(*a)
    finally:
        if threading.current_thread().name == "mig/src/main": MT["zero_mask"] = MT.get("zero_mask", 0.0) + time.thread_time() - c0
MF.zero_mask = zm
m = T._machine(size)
T.fill(m.ram_blocks[0].array, kind)
wd = Path(tempfile.mkdtemp())
def tasks(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            s = open(f"/proc/{pid}/task/{t}/stat").read()
        except OSError:
            continue
        comm = s[s.index("(")+1:s.rindex(")")]
        f = s.rsplit(")", 1)[1].split()
        out[int(t)] = (comm, (int(f[11]) + int(f[12])) / 100)
    return out
class Sampler(threading.Thread):
    def __init__(self, pids):
        super().__init__(daemon=True); self.pids = pids; self.last = {}; self.stop = False
        self.first = {}
        for p in pids:
            for tid, v in tasks(p).items(): self.first[(p, tid)] = v
    def run(self):
        while not self.stop:
            for p in self.pids:
                try:
                    for tid, v in tasks(p).items(): self.last[(p, tid)] = v
                except OSError: pass
            time.sleep(0.01)
    def split(self):
        agg = {}
        for k, (comm, c) in self.last.items():
            c0 = self.first.get(k, (comm, 0.0))[1]
            name = ("S:" if k[0] == os.getpid() else "D:") + comm
            agg[name] = agg.get(name, 0) + c - c0
        return {k: round(v*1000) for k, v in sorted(agg.items()) if v > 0.005}
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
    mgr.set_parameters({**params, "max-bandwidth": 1 << 40, "x-io-timeout": 120000, "downtime-limit": 300, "zero-page-detection": os.environ.get("ZPD", "multifd")})
    samp = Sampler([os.getpid(), dest.proc.pid]) if os.environ.get("SPLIT") else None
    if samp: samp.start()
    c0 = time.process_time(); d0 = dest.cpu()
    perf = subprocess.Popen(["perf","record","-F",os.environ.get("PF","2000"),"-g","-p",f"{os.getpid()},{dest.proc.pid}","-o",os.environ["PERF"]],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL) if os.environ.get("PERF") and r == rep-1 else None
    if perf: time.sleep(0.5)
    mgr.migrate(uri); mgr.outgoing.join(600)
    if perf: perf.send_signal(signal.SIGINT); perf.wait()
    sc = time.process_time() - c0; dc = dest.cpu() - d0
    if samp: samp.stop = True; samp.join()
    q = mgr.query_migrate()
    act = (q["total-time"] - q["setup-time"]) / 1000
    gb = size / 1e9
    print(f"{tag} {kind} ch={ch}: {size/act/1e9:.2f} GB/s  cpu/GB {(sc+dc)/gb:.3f} (src {sc/gb:.3f} dst {dc/gb:.3f}) {q['status']} setup {q['setup-time']}ms total {q['total-time']}ms down {q.get('downtime')}ms"
          + (f" {samp.split()}" if samp else ""), flush=True)
    dest.close()
    print("   ", {k:(round(v*1000,1) if isinstance(v,float) else v) for k,v in ACC.items()}, flush=True)
    for k in ACC: ACC[k]=0 if k=="jobs" else 0.0
    print("    main", {k: round(v*1000,1) for k,v in MT.items()}, flush=True); MT.clear()
