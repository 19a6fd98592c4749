#!/bin/bash
cd /work/main
F=src/livemig/migration/multifd.py
for round in 1 2; do
 for v in 8 16; do
  sed -i "s/^JOB_PAGES = .*/JOB_PAGES = $v * PAGES_ALLOC/" $F
  .venv/bin/livemig bench throughput --size 1G --kinds random --channels 1,2,4 --repeat 3 --checksums off --dest-ram prefault --no-qemu --json /tmp/s14/ab-$v-$round.json > /tmp/s14/ab-$v-$round.txt 2>&1
  echo "$round $v $(date +%T) $(cut -d' ' -f1 /proc/loadavg)"
 done
done
sed -i "s/^JOB_PAGES = .*/JOB_PAGES = 16 * PAGES_ALLOC/" $F
