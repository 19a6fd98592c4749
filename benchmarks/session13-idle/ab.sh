#!/bin/bash
# Interleaved A/B of one multifd migration per run (mfd.py), A = main's tree, B = this branch.
# usage: ab.sh KIND CHANNELS ROUNDS RUNS_PER_ROUND   (e.g. ab.sh idle 4 2 3)
# A's source must be on a path of its own (git archive main src | tar -x -C /tmp/main):
# A_SRC=/tmp/main/src B_SRC=$PWD/src. Run from the worktree (its .venv).
here=$(dirname "$0")
for i in $(seq "$3"); do
  for t in A B; do
    p=$([ $t = A ] && echo "${A_SRC:-/work/main/src}" || echo "${B_SRC:-$PWD/src}")
    KIND=$1 CH=$2 R=$4 TAG=$t PYTHONPATH=$p .venv/bin/python "$here/mfd.py"
  done
done
