"""Summary of mfdi.py / ab.sh output: medians per TAG of GB/s, CPU s/GB and the source's thread CPU in the measured window."""
import re, ast, statistics as st, collections, sys
lines=open(sys.argv[1]).read().splitlines()
res=collections.defaultdict(list)
i=0
while i < len(lines):
    m=re.match(r"(\S+) \S+ ch=\d+: (\S+) GB/s\s+cpu/GB (\S+) \(src (\S+) dst ([0-9.]+)", lines[i])
    if m:
        acc=ast.literal_eval(lines[i+1].strip()); mt=ast.literal_eval(lines[i+2].strip()[5:])
        win = acc['job_cpu'] + mt.get('send_part',0)+mt.get('sync',0)+mt.get('complete',0)
        res[m.group(1)].append((float(m.group(2)), float(m.group(3)), float(m.group(4)), float(m.group(5)), win, acc['job_cpu'], mt.get('send_part',0), mt.get('zero_mask',0)))
        i+=3
    else: i+=1
for k,v in sorted(res.items()):
    c=list(zip(*v)); print(k, "n",len(v), "GB/s", st.median(c[0]), "cpu/GB", st.median(c[1]), "src", st.median(c[2]), "dst", st.median(c[3]), "src in-window ms", round(st.median(c[4]),1), "worker", round(st.median(c[5]),1), "main send_part", round(st.median(c[6]),1), "main zero_mask", round(st.median(c[7]),1))
    print("   src-in-window all:", [round(x,1) for x in c[4]], "GB/s all:", c[0])
