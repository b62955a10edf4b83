#!/usr/bin/env bash
# The family comparison of docs/FAMILIES.md: each generation family trained on class-conditioned
# Fashion-MNIST for the same wall-clock budget (MINUTES, default 20, on an otherwise idle
# machine), then judged by `diffuse eval` at n=1000 (classifier features, seed 0; guidance 1 and
# the flow model's best cheap sampler, Heun at 10 steps, for diffusion; bits per dimension on
# fashion-mnist:test for the families with a likelihood), with a 10x10 grid (one row per class)
# of each.
#
#   scripts/families.sh [RUNS_DIR] [OUT_DIR]      (defaults: runs/families, docs/families)
#
# Rows already in OUT_DIR are kept (delete one to redo it); FAMILIES picks rows by name
# (default: all). Needs the Fashion-MNIST download (`diffuse fetch fashion-mnist`). About
# MINUTES + 3 minutes a row on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/families}
OUT=${2:-docs/families}
D=${DIFFUSE:-target/release/diffuse}
MINUTES=${MINUTES:-20}
mkdir -p "$RUNS" "$OUT"

# name | training options | eval and grid options
ROWS=(
  "gan|--family gan --steps 100000|"
  "gan-no-ms|--family gan --mode-seeking 0 --steps 100000|"
  "autoregressive|--family autoregressive --steps 100000|"
  "vae|--family vae --steps 100000|"
  # The network of docs/FAMILIES.md's runs, the default until 2026-12-07 (the default now, one
  # block a level of 24 channels, is measured in docs/fast-generation.md's recipe study).
  "diffusion|--base-channels 32 --res-blocks 2 --steps 100000|--sampler heun --steps 10 --guidance 1"
)

for row in "${ROWS[@]}"; do
  IFS='|' read -r name train sample <<<"$row"
  if [ -n "${FAMILIES:-}" ] && [[ " $FAMILIES " != *" $name "* ]]; then continue; fi
  [ -f "$OUT/$name.json" ] && continue
  if [ ! -f "$RUNS/$name/model.safetensors" ]; then
    # shellcheck disable=SC2086
    "$D" train --data fashion-mnist --cond class --out "$RUNS/$name" --minutes "$MINUTES" $train
  fi
  # shellcheck disable=SC2086
  "$D" eval --model "$RUNS/$name" --data fashion-mnist --features fashion-mnist --n 1000 \
    $sample --json "$OUT/$name.json"
  # shellcheck disable=SC2086
  "$D" sample --model "$RUNS/$name" --n 100 --cols 10 $sample --out "$OUT/$name-grid.png"
done
