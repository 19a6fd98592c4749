#!/bin/bash
# BASE_SRC: the src/ of the commit to compare with (git archive BASE src | tar -x -C DIR)
# interleaved: base livemig (A), this branch (B), QEMU 10.0.2 (Q); 1 GiB random, prefaulted dest
rounds=${1:-3}
cd "$(dirname "$0")/../.."  # the worktree: its .venv and src
export LIVEMIG_QEMU=/root/.cache/livemig/qemu-10.0/bin/qemu-system-x86_64
for r in $(seq $rounds); do
  for ch in 1 2 4; do
    echo "A ch=$ch load $(cut -d' ' -f1 /proc/loadavg) $(PYTHONPATH=$BASE_SRC .venv/bin/python benchmarks/session12-tput/mfd.py $ch 0 1 2>&1 | head -1)"
    echo "B ch=$ch load $(cut -d' ' -f1 /proc/loadavg) $(.venv/bin/python benchmarks/session12-tput/mfd.py $ch 0 1 2>&1 | head -1)"
    echo "Q ch=$ch load $(cut -d' ' -f1 /proc/loadavg) $(.venv/bin/python benchmarks/session12-tput/qmfd.py $ch 1 2>&1 | tail -1)"
  done
done
