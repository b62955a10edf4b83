#!/usr/bin/env bash
# Sampling speed against PyTorch on the same model: `examples/sample_latency.rs` (A) and its
# PyTorch twin `scripts/sample_latency_torch.py` (B, diffusers' UNet2DModel on the model
# exported by `diffuse export --diffusers`) run alternately, A B A B, and the medians' ratios
# are printed: the time to one image at batch 1 (as `serve` makes it) and images/s at batch 64,
# DPM-Solver++(2M), 20 steps, guidance 2; and, for diffuse, the share of one image's time that
# is not the denoiser (the sampler's own work: guidance, the update, the noise).
#
#   scripts/latency_vs_torch.sh [MODEL]      (default: the embedded fashion-mnist model)
#
# Needs `pip install torch diffusers`. Knobs: ROUNDS (2), STEPS (20), REPEATS (10: timed calls
# per run at batch 1, a quarter of that at batch 64), TORCH_THREADS (2), BUILD=0 (skip the
# build). VARIANTS and TORCH_VARIANTS: '|'-separated environment settings, each run as its own
# A or B every round (default: diffuse f32 and bf16 where the processor runs it; PyTorch f32
# eager and bf16 autocast with channels_last). BIN=path in a variant runs another build of
# the example, e.g. VARIANTS='BIN=/tmp/old_sample_latency|default' to compare two builds.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-fashion-mnist}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-20}
REPEATS=${REPEATS:-10}
export TORCH_THREADS=${TORCH_THREADS:-2}
python3 -c 'import torch, diffusers' 2>/dev/null || { echo "error: needs PyTorch and diffusers: run 'pip install torch diffusers'" >&2; exit 1; }
[ "${BUILD:-1}" = 0 ] || cargo build --release --quiet --example sample_latency --bin diffuse
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
  VARIANTS=${VARIANTS:-DIFFUSE_MATMUL=f32|DIFFUSE_MATMUL=bf16}
else
  VARIANTS=${VARIANTS:-DIFFUSE_MATMUL=f32}
fi
TORCH_VARIANTS=${TORCH_VARIANTS:-default|TORCH_AUTOCAST=bf16 CHANNELS_LAST=1}
out=$(mktemp -d)
if [ "$MODEL" = fashion-mnist ]; then
  target/release/diffuse export --diffusers "$out/model" > /dev/null
else
  target/release/diffuse export --model "$MODEL" --diffusers "$out/model" > /dev/null
fi
IFS='|' read -ra VARS <<< "$VARIANTS"
IFS='|' read -ra TVARS <<< "$TORCH_VARIANTS"
printf '%s\n' "${VARS[@]}" > "$out/variants"
printf '%s\n' "${TVARS[@]}" > "$out/torch_variants"
for r in $(seq 1 "$ROUNDS"); do
  for i in "${!VARS[@]}"; do
    v=${VARS[$i]}
    [ "$v" = default ] && v=
    echo "== round $r: diffuse ${VARS[$i]}" >&2
    env $v RAYON_NUM_THREADS="$TORCH_THREADS" bash -c \
      'exec "${BIN:-target/release/examples/sample_latency}" "$@"' _ "$MODEL" "$STEPS" "$REPEATS" \
      > "$out/a${r}_$i.txt"
  done
  for i in "${!TVARS[@]}"; do
    v=${TVARS[$i]}
    [ "$v" = default ] && v=
    echo "== round $r: pytorch ${TVARS[$i]}" >&2
    env $v python3 scripts/sample_latency_torch.py "$out/model" "$STEPS" "$REPEATS" > "$out/b${r}_$i.txt" 2>/dev/null
  done
done
python3 - "$out" "$ROUNDS" <<'PY'
import re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
variants = open(f"{out}/variants").read().splitlines()
torch_variants = open(f"{out}/torch_variants").read().splitlines()
def read(path):
    text = open(path).read()
    lat = re.search(r"RESULT latency B=1 ([0-9.]+) s", text)
    thr = re.search(r"RESULT sample B=64 ([0-9.]+) img/s", text)
    share = re.search(r"RESULT sampler share ([0-9.-]+)", text)
    return tuple(float(m.group(1)) if m else float("nan") for m in (lat, thr, share))
a = {i: [read(f"{out}/a{r}_{i}.txt") for r in range(1, rounds + 1)] for i in range(len(variants))}
b = {i: [read(f"{out}/b{r}_{i}.txt") for r in range(1, rounds + 1)] for i in range(len(torch_variants))}
med = lambda runs, k: statistics.median(x[k] for x in runs)
print(f"{'':<44}{'B=1 seconds':>12}{'B=64 img/s':>12}")
for name, runs in [(f"diffuse {v}", a[i]) for i, v in enumerate(variants)] + [(f"pytorch {v}", b[i]) for i, v in enumerate(torch_variants)]:
    per = " ".join(f"{x[0]:.3f}/{x[1]:.1f}" for x in runs)
    print(f"{name:<44}{med(runs, 0):>12.4f}{med(runs, 1):>12.2f}   (per round: {per})")
for i, v in enumerate(variants):
    print(f"diffuse {v}: the sampler's own share of one image's time {med(a[i], 2):.1%} (the rest is the denoiser)")
for i, v in enumerate(variants):
    for j, t in enumerate(torch_variants):
        print(f"diffuse {v} vs pytorch {t}: latency {med(b[j], 0) / med(a[i], 0):.2f}x as fast, throughput {med(a[i], 1) / med(b[j], 1):.2f}x")
PY
