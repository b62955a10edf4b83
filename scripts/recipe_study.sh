#!/usr/bin/env bash
# The 20-minute recipe study of docs/fast-generation.md: each variant of the Fashion-MNIST
# recipe trained for the same 1,900 steps (20 minutes of this project's 2-core machine at the
# default width in f32; STEPS=2680 is 20 minutes in bf16, docs/recipe-2680), then judged by
# `diffuse eval` at n=1000 (classifier features, guidance 1, seed 0) with its objective's best
# cheap sampler: heun at 10 steps (19 evaluations) for flow models, DPM-Solver++(2M) at 20 and
# Euler-ancestral at 50 for diffusion ones. Also writes the floor: 1,000 test images judged the
# same way (`diffuse eval --real`).
#
#   scripts/recipe_study.sh [RUNS_DIR] [JSON_DIR]      (defaults: runs/recipe, docs/recipe)
#
# Rows already in JSON_DIR are kept (delete one to redo it). VARIANTS picks rows by name
# (default: all). Needs the Fashion-MNIST download (`diffuse fetch fashion-mnist`). About 23
# minutes a row on 2 cores; the train log of each row says its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/recipe}
OUT=${2:-docs/recipe}
D=${DIFFUSE:-target/release/diffuse}
STEPS=${STEPS:-1900}
mkdir -p "$RUNS" "$OUT"

FLOW_EVAL="--sampler heun --steps 10"
DIFF_EVAL="--sampler dpmpp-2m --steps 20"
# name | eval sampler | training options beyond the defaults | run (default: the name)
ROWS=(
  "epsilon|$DIFF_EVAL|--objective epsilon"
  "epsilon-euler-a|--sampler euler-a --steps 50|--objective epsilon|epsilon"
  "flow|$FLOW_EVAL|--objective flow"
  "flow-lr8e-4|$FLOW_EVAL|--objective flow --lr 8e-4"
  "flow-cosine|$FLOW_EVAL|--objective flow --lr-schedule cosine"
  "flow-loc0.5|$FLOW_EVAL|--objective flow --flow-loc 0.5"
  "flow-edm-sigmas|$FLOW_EVAL|--objective flow --flow-loc -1.2 --flow-scale 1.2"
  "v|$DIFF_EVAL|--objective v"
)

for row in "${ROWS[@]}"; do
  IFS='|' read -r name sampler opts run <<<"$row"
  if [ -n "${VARIANTS:-}" ] && [[ " $VARIANTS " != *" $name "* ]]; then continue; fi
  [ -f "$OUT/$name.json" ] && continue
  run=${run:-$name}
  if [ ! -f "$RUNS/$run/model.safetensors" ]; then
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$D" train --data fashion-mnist --cond class --out "$RUNS/$run" --seed 0 --steps "$STEPS" \
      --sample-every 0 $opts > "$RUNS/$run.log" 2>&1
    echo "$run: trained in $(( $(date +%s) - start )) s" | tee -a "$RUNS/$run.log"
  fi
  # shellcheck disable=SC2086
  "$D" eval --data fashion-mnist --features fashion-mnist --n 1000 --model "$RUNS/$run" \
    $sampler --json "$OUT/$name.json" | grep FID | sed "s/^/$name: /"
done

if [ ! -f "$OUT/real.json" ]; then
  "$D" eval --real fashion-mnist:test --data fashion-mnist --features fashion-mnist --n 1000 \
    --json "$OUT/real.json" | grep FID | sed "s/^/floor: /"
fi

# The table of docs/fast-generation.md: each row's figures and its FID over the floor's.
python3 - "$OUT" <<'PY'
import json, os, sys
d = sys.argv[1]
rows = {f[:-5]: json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f.endswith(".json")}
floor = rows.pop("real")["fid"]
print("| variant | sampler | FID | FID / floor | precision | recall | class accuracy |")
print("|---|---|---|---|---|---|---|")
for name, r in sorted(rows.items(), key=lambda kv: kv[1]["fid"]):
    print(f"| {name} | {r['sampler']} {r['steps']} | {r['fid']:.3f} | {r['fid'] / floor:.1f} | "
          f"{r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} |")
print(f"| real (floor: 1,000 test images) | - | {floor:.3f} | 1.0 | - | - | - |")
PY
