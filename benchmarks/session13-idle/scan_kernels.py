"""Zero-scan kernels over 1 GiB of idle guest RAM (session 13, helper idle): reduce along rows, reduceat,
flat. Single thread, GB/s of the best of 4."""
import numpy as np, time, os
from livemig.bench import throughput as T
m = T._machine(1<<30); a = m.ram_blocks[0].array; T.fill(a, os.environ.get("KIND","idle"))
w = a.view(np.uint64).reshape(-1, 512); n = w.shape[0]; J = 1024
flat = a.view(np.uint64)
ix = np.arange(0, J*512, 512)
def t(name, f, reps=4):
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter(); f(); best = min(best, time.perf_counter() - t0)
    print(f"{name}: {best*1e3:.1f} ms  {(1<<30)/best/1e9:.1f} GB/s", flush=True)
t("reduceat", lambda: [np.bitwise_or.reduceat(flat[i*512:(i+J)*512], ix) for i in range(0, n, J)])
t("max axis1", lambda: [np.maximum.reduce(w[i:i+J], axis=1) for i in range(0, n, J)])
t("or axis1", lambda: [np.bitwise_or.reduce(w[i:i+J], axis=1) for i in range(0, n, J)])
t("flat", lambda: [np.bitwise_or.reduce(w[i:i+J].ravel()) for i in range(0, n, J)])
