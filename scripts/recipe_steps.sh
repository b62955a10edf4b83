#!/usr/bin/env bash
# Times the embedded model's recipe (`diffuse train --data fashion-mnist --cond class
# --base-channels 32 --res-blocks 2`, its network, the default until 2026-12-07) in real
# use: seconds a step over steps 11-40 of a 40-step run, for each given build of diffuse and
# each precision, alternating, ROUNDS times (default 2); also prints the loss at step 40.
#
#   scripts/recipe_steps.sh [PATH/TO/diffuse ...]      (default: target/release/diffuse)
#
# PRECISIONS (default 'f32 bf16'; bf16 needs Intel AMX). Needs the Fashion-MNIST download
# (`diffuse fetch fashion-mnist`, or any earlier training run on it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
PRECISIONS=${PRECISIONS:-f32 bf16}
[ $# -gt 0 ] || set -- target/release/diffuse
out=$(mktemp -d)
for r in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    for p in $PRECISIONS; do
      run="$out/run"
      rm -rf "$run"
      "$bin" train --data fashion-mnist --cond class --objective epsilon --base-channels 32 --res-blocks 2 \
        --steps 40 --precision "$p" --out "$run" \
        > "$out/log" 2>&1 || { echo "error: $bin train failed:" >&2; tail -3 "$out/log" >&2; exit 1; }
      python3 - "$run/metrics.jsonl" "$r" "$bin" "$p" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
e = {r["step"]: r["elapsed"] for r in rows}
loss = {r["step"]: r["loss"] for r in rows}
print(f"round {sys.argv[2]}  {sys.argv[3]}  {sys.argv[4]:5s}  {(e[40] - e[10]) / 30:.3f} s/step  loss@40 {loss[40]:.7f}")
PY
    done
  done
done
rm -rf "$out"
