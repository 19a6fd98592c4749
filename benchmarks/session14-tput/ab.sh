#!/bin/bash
# Interleaved A/B of mfdi.py (session 14, helper tput): ab.sh ROUNDS KIND CHANNELS...
# A = another tree's src (A_SRC; e.g. git archive HEAD~1 src | tar -x -C /tmp/a, A_SRC=/tmp/a/src),
# B = this worktree's. Two migrations per process; summarise with sumi.py.
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.." || exit 1
r=$1; kind=$2; shift 2
for i in $(seq "$r"); do for ch in "$@"; do for t in A B; do
  p=$([ $t = A ] && echo "${A_SRC:?set A_SRC}" || echo "$PWD/src")
  PYTHONPATH=$p KIND=$kind CH=$ch R=2 TAG=$t$ch .venv/bin/python "$here/mfdi.py" 2>&1 | grep -v Warn
done; done; done
