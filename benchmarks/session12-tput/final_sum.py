import re, sys, statistics as S, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"(\w) ch=(\d) load ([\d.]+) .*?([\d.]+) GB/s\s+src user ([\d.]+) sys ([\d.]+)\s+dst user ([\d.]+) sys ([\d.]+)", line)
    if not m: continue
    v, ch = m[1], int(m[2]); gbs = float(m[4]); cpu = sum(float(m[i]) for i in range(5, 9)) / 1.073741824
    rows[(v, ch)].append((gbs, cpu, float(m[3]), [float(m[i]) for i in range(5, 9)]))
for ch in (1, 2, 4):
    out = []
    for v in "ABQ":
        r = rows.get((v, ch), [])
        if not r: continue
        out.append(f"{v}: {S.median(x[0] for x in r):.2f} GB/s ({', '.join(f'{x[0]:.2f}' for x in r)}) CPU {S.median(x[1] for x in r):.2f} s/GB")
    print(f"ch={ch}  " + "  |  ".join(out))
