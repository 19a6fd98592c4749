"""QEMU 10 multifd: python qmfd.py CHANNELS [REPEAT]; prints user/sys split per side"""
import os, sys, time, subprocess, signal, tempfile
from pathlib import Path
import numpy as np
from livemig.bench import throughput as T
from livemig.bench import qemu_multifd as Q
from livemig.bench.common import Workdir, set_migration, wait_migration_end, free_port
size = 1 << 30
ch = int(sys.argv[1]); rep = int(sys.argv[2]) if len(sys.argv) > 2 else 3
m = T._machine(size)
T.fill(m.ram_blocks[0].array, "random")
def pst(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / 100, int(f[12]) / 100
import inspect
with Workdir() as wd:
    qs = Q.QemuSource(m.ram_blocks[0].array, wd)
    for r in range(rep):
        src = qs._start("qsrc", qs._src_ram, False); dst = qs._start("qdst", qs._dst_ram, True)
        try:
            caps = {"multifd": True}; params = {"multifd-channels": ch}
            with src.qmp() as sq, dst.qmp() as dq:
                set_migration(dq, caps, params)
                set_migration(sq, caps, {**params, "max-bandwidth": 1 << 40, "downtime-limit": 300})
                port = free_port(); uri = f"tcp:127.0.0.1:{port}"
                dq.command("migrate-incoming", uri=uri)
                su0, ss0 = pst(src.pid); du0, ds0 = pst(dst.pid)
                perf = [subprocess.Popen(["perf","record",*(["-g"] if os.environ.get("PERF")=="g" else []),"-p",str(p),"-o",f"/tmp/tput/q-{ch}-{r}-{side}.data"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL) for side, p in (("src",src.pid),("dst",dst.pid))] if os.environ.get("PERF") else None
                if perf: time.sleep(0.5)
                sq.command("migrate", uri=uri)
                q = wait_migration_end(lambda: sq.command("query-migrate"), 600, "q")
                if perf: [(p.send_signal(signal.SIGINT), p.wait()) for p in perf]
                su1, ss1 = pst(src.pid); du1, ds1 = pst(dst.pid)
            act = (q["total-time"] - q.get("setup-time", 0)) / 1000
            print(f"QEMU ch={ch}: {size/act/1e9:.2f} GB/s  src user {su1-su0:.2f} sys {ss1-ss0:.2f}  dst user {du1-du0:.2f} sys {ds1-ds0:.2f}  {q['status']}", flush=True)
        finally:
            dst.stop(); src.stop(); qs._dst_ram.unlink(missing_ok=True)
    qs.close()
