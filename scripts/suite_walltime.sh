#!/bin/bash
# Interleaved full-suite wall times of two trees (scripts/results/test_suite_walltime.md).
# Usage: BASE=../base_wt CUR=../cur_wt LOG=suite_walltime.log scripts/suite_walltime.sh
#   (make the trees with `git worktree add ../base_wt <rev>`: siblings of ../shared, so real-data tests run in both).
# Runs alternate B1 C1 B2 C2 B3 C3 (RUNS overrides; TESTS limits the test paths, e.g. for a dry run). Each line
# of LOG: run, commit, exit status, wall seconds, /proc/loadavg at start and end, pytest's summary.
# Run it on a quiet machine: nothing else beside it.
set -u
LOG=$(realpath -m "${LOG:-suite_walltime.log}")
for run in ${RUNS:-B1 C1 B2 C2 B3 C3}; do
  case $run in B*) tree=$(realpath "$BASE");; C*) tree=$(realpath "$CUR");; esac
  start_load=$(cut -d' ' -f1-3 /proc/loadavg)
  t0=$(date +%s.%N)
  (cd "$tree" && HF_HUB_OFFLINE=1 PYTHONPATH=$tree timeout 1500 python -m pytest -q -p no:cacheprovider ${TESTS:-}) \
    > "$LOG.$run.out" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  echo "$run $(git -C "$tree" rev-parse --short HEAD) rc=$rc wall=$(echo "$t1 - $t0" | bc)" \
       "load_start=[$start_load] load_end=[$(cut -d' ' -f1-3 /proc/loadavg)] :: $(tail -1 "$LOG.$run.out")" >> "$LOG"
done
