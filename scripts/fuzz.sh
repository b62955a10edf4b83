#!/usr/bin/env bash
# A longer fuzz campaign of the readers of untrusted input (tests/all/fuzz.rs): 50 times the
# inputs of the default `cargo test` run, with a random seed, one target after the other. It runs
#
#   FUZZ_ITERS_SCALE=${SCALE:-50} FUZZ_SEED=${SEED:-$RANDOM} \
#     cargo test --release --test all fuzz:: -- --nocapture --test-threads=1
#
# Usage: scripts/fuzz.sh [TARGET]   (TARGET: safetensors, model, pickle, idx, idx_gz, captions,
# scheduler, serve or folder; default all). Knobs: SCALE (50), SEED (random; printed, so that a
# failing run can be repeated), and the harness's own FUZZ_TIME_LIMIT_S (10), FUZZ_MAX_ALLOC_MB
# (256), FUZZ_MAX_LIVE_MB (2048) and FUZZ_VERBOSE. A failing input is saved under $TMPDIR (or
# /tmp) and its path printed; rerun one with FUZZ_SEED=S FUZZ_INDEX=I, or FUZZ_REPLAY=path.
# The folder loader's "warning: skipped ..." lines are filtered out of the output.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-50}
SEED=${SEED:-$RANDOM}
echo "fuzz: seed $SEED, scale $SCALE (rerun with SEED=$SEED SCALE=$SCALE $0 ${1:-})"
FUZZ_ITERS_SCALE=$SCALE FUZZ_SEED=$SEED \
  cargo test --release --test all "fuzz::${1:-}" -- --nocapture --test-threads=1 2>&1 |
  grep -av '^warning: skipped [0-9]* unreadable'
