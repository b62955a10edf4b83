#!/usr/bin/env bash
# The 20-minute recipe study of docs/fast-generation.md: each variant of the Fashion-MNIST
# recipe trained for the same 20 minutes, then judged by `diffuse eval` at n=1000 (classifier
# features, guidance 1, seed 0) with its objective's best cheap sampler: heun at 10 steps (19
# evaluations) for flow models, DPM-Solver++(2M) at 20 and Euler-ancestral at 50 for diffusion
# ones. Also writes the floor: 1,000 test images judged the same way (`diffuse eval --real`).
#
#   scripts/recipe_study.sh [RUNS_DIR] [JSON_DIR]      (defaults: runs/recipe, docs/recipe)
#
# STEPS is the baseline recipe's step count for the budget (1,900: 20 minutes of this project's
# 2-core machine in f32; STEPS=2680 is 20 minutes in bf16, docs/recipe-2680). A row whose
# steps cost more or less time (another width or batch size) trains for STEPS / COST steps,
# COST being its seconds per step over the baseline's; COST_ONLY=1 instead prints each row's
# seconds per step on this machine (80 steps, the first 20 not counted; the "flow" row is the
# baseline), from which to take them, and trains nothing else. SEEDS="1 2" also judges each
# model with those sampling seeds (JSON_DIR/seeds/), and the table then gives the mean FID.
# Rows already in JSON_DIR are kept (delete one to redo it). VARIANTS picks rows by name
# (default: all). Needs the Fashion-MNIST download (`diffuse fetch fashion-mnist`). About 23
# minutes a row on 2 cores; the train log of each row says its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/recipe}
OUT=${2:-docs/recipe}
D=${DIFFUSE:-target/release/diffuse}
STEPS=${STEPS:-1900}

FLOW_EVAL="--sampler heun --steps 10"
DIFF_EVAL="--sampler dpmpp-2m --steps 20"
# name | eval sampler | training options | run (default: the name) | seconds per step over
# the baseline's (default 1; measured on the AMD EPYC of session 25 in bf16 by timings like
# COST_ONLY=1's, over the median of the baseline's nine timings: docs/fast-generation.md).
# The baseline network is the one the study started from, the default until 2026-12-07 (32
# base channels, two residual blocks a level); every row names its network, so the rows train
# what they trained then whatever the default is now. flow-resblocks1-width24 is today's
# default network.
NET="--base-channels 32 --res-blocks 2"
ROWS=(
  "epsilon|$DIFF_EVAL|--objective epsilon $NET"
  "epsilon-euler-a|--sampler euler-a --steps 50|--objective epsilon $NET|epsilon"
  "flow|$FLOW_EVAL|--objective flow $NET"
  "flow-lr8e-4|$FLOW_EVAL|--objective flow $NET --lr 8e-4"
  "flow-cosine|$FLOW_EVAL|--objective flow $NET --lr-schedule cosine"
  "flow-loc0.5|$FLOW_EVAL|--objective flow $NET --flow-loc 0.5"
  "flow-edm-sigmas|$FLOW_EVAL|--objective flow $NET --flow-loc -1.2 --flow-scale 1.2"
  "v|$DIFF_EVAL|--objective v $NET"
  "flow-ema0.999|$FLOW_EVAL|--objective flow $NET --ema-decay 0.999"
  "flow-batch16|$FLOW_EVAL|--objective flow $NET --batch 16||0.5307"
  "flow-batch64|$FLOW_EVAL|--objective flow $NET --batch 64||1.729"
  "flow-width24|$FLOW_EVAL|--objective flow --base-channels 24 --res-blocks 2||0.732"
  "flow-width48|$FLOW_EVAL|--objective flow --base-channels 48 --res-blocks 2||1.804"
  "flow-resblocks1|$FLOW_EVAL|--objective flow --base-channels 32 --res-blocks 1||0.6204"
  "flow-resblocks1-width24|$FLOW_EVAL|--objective flow --base-channels 24 --res-blocks 1||0.496"
  "flow-resblocks1-width24-lr8e-4|$FLOW_EVAL|--objective flow --base-channels 24 --res-blocks 1 --lr 8e-4||0.496"
  "flow-resblocks1-width16|$FLOW_EVAL|--objective flow --base-channels 16 --res-blocks 1||0.29"
)

# Whether VARIANTS (default: all) picks row $1.
picked() { [ -z "${VARIANTS:-}" ] || [[ " $VARIANTS " == *" $1 "* ]]; }

if [ -n "${COST_ONLY:-}" ]; then
  tmp=$(mktemp -d)
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name sampler opts run cost <<<"$row"
    picked "$name" || continue
    # shellcheck disable=SC2086
    "$D" train --data fashion-mnist --cond class --out "$tmp/$name" --seed 0 --steps 80 \
      --sample-every 0 $opts > /dev/null 2> "$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
    python3 - "$tmp/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
e = {r["step"]: r["elapsed"] for r in map(json.loads, open(sys.argv[1]))}
print(f"{sys.argv[2]}: {(e[80] - e[20]) / 60:.4f} s a step")
PY
  done
  rm -rf "$tmp"
  exit 0
fi

mkdir -p "$RUNS" "$OUT"
# The JSON of row $1 judged with sampling seed $2.
json_of() { if [ "$2" = 0 ]; then echo "$OUT/$1.json"; else echo "$OUT/seeds/$1-seed$2.json"; fi; }

for row in "${ROWS[@]}"; do
  IFS='|' read -r name sampler opts run cost <<<"$row"
  picked "$name" || continue
  run=${run:-$name}
  missing=0
  for seed in 0 ${SEEDS:-}; do [ -f "$(json_of "$name" "$seed")" ] || missing=1; done
  [ $missing = 0 ] && continue
  steps=$(python3 -c "print(round($STEPS / ${cost:-1}))")
  if [ ! -f "$RUNS/$run/model.safetensors" ]; then
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$D" train --data fashion-mnist --cond class --out "$RUNS/$run" --seed 0 --steps "$steps" \
      --sample-every 0 $opts > "$RUNS/$run.log" 2>&1
    echo "$run: $steps steps trained in $(( $(date +%s) - start )) s" | tee -a "$RUNS/$run.log"
  fi
  for seed in 0 ${SEEDS:-}; do
    json=$(json_of "$name" "$seed")
    [ -f "$json" ] && continue
    mkdir -p "$(dirname "$json")"
    # shellcheck disable=SC2086
    "$D" eval --data fashion-mnist --features fashion-mnist --n 1000 --model "$RUNS/$run" \
      $sampler --seed "$seed" --json "$json" | grep FID | sed "s/^/$name, seed $seed: /"
  done
done

if [ ! -f "$OUT/real.json" ]; then
  "$D" eval --real fashion-mnist:test --data fashion-mnist --features fashion-mnist --n 1000 \
    --json "$OUT/real.json" | grep FID | sed "s/^/floor: /"
fi

# The table of docs/fast-generation.md: each row's figures and its FID over the floor's (with
# SEEDS, the FID at each sampling seed and their mean's ratio to the floor).
python3 - "$OUT" <<'PY'
import json, os, sys
d = sys.argv[1]
rows = {f[:-5]: json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f.endswith(".json")}
floor = rows.pop("real")["fid"]
seeds = os.path.join(d, "seeds")
def fids(name):
    more = sorted(f for f in os.listdir(seeds) if f.startswith(name + "-seed")) if os.path.isdir(seeds) else []
    return [rows[name]["fid"]] + [json.load(open(os.path.join(seeds, f)))["fid"] for f in more]
print("| variant | sampler | FID (sampling seeds 0, 1, ...) | mean FID / floor | precision | recall | class accuracy |")
print("|---|---|---|---|---|---|---|")
for name, r in sorted(rows.items(), key=lambda kv: sum(fids(kv[0])) / len(fids(kv[0]))):
    f = fids(name)
    print(f"| {name} | {r['sampler']} {r['steps']} | {' / '.join(f'{x:.3f}' for x in f)} | "
          f"{sum(f) / len(f) / floor:.1f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} |")
print(f"| real (floor: 1,000 test images) | - | {floor:.3f} | 1.0 | - | - | - |")
PY
