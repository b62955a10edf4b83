#!/usr/bin/env bash
# Runs `diffuse bench` (A) and the PyTorch reference (B) alternately, A B A B, on the same
# machine in one go, and prints each run's images/s and the diffuse/PyTorch ratios of the medians.
#
#   scripts/bench_vs_torch.sh [PATH/TO/reference_unet_torch.py]
#
# Needs `pip install torch`. The reference script lives in the team's shared/bench folder
# (default: ../shared/bench/reference_unet_torch.py). Knobs: ROUNDS (2), WARMUP (3), ITERS (10).
# VARIANTS: '|'-separated environment settings, each run as its own A in every round, to
# measure one change against another in the same session, e.g.
#   VARIANTS='DIFFUSE_KERNELS=burn DIFFUSE_KEEP_FREED=0|DIFFUSE_KERNELS=burn|DIFFUSE_KERNELS=conv|default'
# (DIFFUSE_KERNELS=burn: burn's own convolution and group norm; DIFFUSE_KEEP_FREED=0: glibc's
# default malloc tuning; DIFFUSE_MATMUL=f32 or bf16: the products' precision; default:
# everything as shipped). BIN=path in a variant runs another build of diffuse, e.g. the
# previous commit's, copied aside.
# TORCH_VARIANTS: likewise for the reference, each run as its own B in every round. Default:
# plain f32 eager beside PyTorch's strong CPU setting (bf16 autocast and channels_last, see
# ../shared/bench/MODEL.md); add e.g. '|TORCH_COMPILE=1 WARMUP=8' for torch.compile.
# BUILD=0 skips the release build (e.g. to time the binary `cargo test --release` left).
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:-../shared/bench/reference_unet_torch.py}
ROUNDS=${ROUNDS:-2}
VARIANTS=${VARIANTS:-default}
TORCH_VARIANTS=${TORCH_VARIANTS:-default|TORCH_AUTOCAST=bf16 CHANNELS_LAST=1}
export WARMUP=${WARMUP:-3} ITERS=${ITERS:-10} LOSS_STEPS=${LOSS_STEPS:-0} TORCH_THREADS=${TORCH_THREADS:-2}
[ -f "$REF" ] || { echo "error: PyTorch reference $REF not found" >&2; exit 1; }
python3 -c 'import torch' 2>/dev/null || { echo "error: PyTorch is not installed: run 'pip install torch'" >&2; exit 1; }
[ "${BUILD:-1}" = 0 ] || cargo build --release --quiet
IFS='|' read -ra VARS <<< "$VARIANTS"
IFS='|' read -ra TVARS <<< "$TORCH_VARIANTS"
out=$(mktemp -d)
printf '%s\n' "${VARS[@]}" > "$out/variants"
printf '%s\n' "${TVARS[@]}" > "$out/torch_variants"
grep -m1 '^model name' /proc/cpuinfo | sed 's/.*: /cpu: /' > "$out/cpu"
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|amx_bf16)$' | tr '\n' ' ' | sed 's/^/features: /' >> "$out/cpu"
for r in $(seq 1 "$ROUNDS"); do
  for i in "${!VARS[@]}"; do
    v=${VARS[$i]}
    [ "$v" = default ] && v=
    echo "== round $r: diffuse ${VARS[$i]}" >&2
    env $v /usr/bin/time -f 'maxrss_kb %M' -o "$out/a${r}_$i.rss" \
      bash -c 'exec "${BIN:-target/release/diffuse}" bench --warmup "$0" --iters "$1"' "$WARMUP" "$ITERS" \
      > "$out/a${r}_$i.txt" 2>/dev/null
  done
  for i in "${!TVARS[@]}"; do
    v=${TVARS[$i]}
    [ "$v" = default ] && v=
    echo "== round $r: pytorch ${TVARS[$i]}" >&2
    env $v /usr/bin/time -f 'maxrss_kb %M' -o "$out/b${r}_$i.rss" python3 "$REF" > "$out/b${r}_$i.txt" 2>/dev/null
  done
done
python3 - "$out" "$ROUNDS" <<'PY'
import re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
variants = open(f"{out}/variants").read().splitlines()
torch_variants = open(f"{out}/torch_variants").read().splitlines()
print(open(f"{out}/cpu").read().strip())
keys = [("train B=16", "train_b16"), ("train B=64", "train_b64"), ("infer B=64", "infer_b64")]
def read(path):
    text = open(path).read()
    vals = {}
    for label, key in keys:
        m = re.search(r"RESULT %s .*?([0-9.]+) img/s" % label, text)
        vals[key] = float(m.group(1)) if m else float("nan")
    m = re.search(r"maxrss_kb ([0-9]+)", open(path[:-4] + ".rss").read())
    vals["rss"] = int(m.group(1)) * 1024 / 1e9 if m else float("nan")
    return vals
for ti, tname in enumerate(torch_variants):
  b = [read(f"{out}/b{r}_{ti}.txt") for r in range(1, rounds + 1)]
  for i, name in enumerate(variants):
    a = [read(f"{out}/a{r}_{i}.txt") for r in range(1, rounds + 1)]
    print(f"-- diffuse: {name}   pytorch: {tname}")
    print(f"{'measure':<12}{'diffuse img/s':>16}{'pytorch img/s':>16}{'ratio':>8}")
    for _, key in keys:
        ma = statistics.median(x[key] for x in a)
        mb = statistics.median(x[key] for x in b)
        runs = " ".join(f"{x[key]:.1f}/{y[key]:.1f}" for x, y in zip(a, b))
        print(f"{key:<12}{ma:>16.2f}{mb:>16.2f}{ma / mb:>8.2f}   (A/B per round: {runs})")
    ra, rb = (statistics.median(x["rss"] for x in v) for v in (a, b))
    print(f"{'peak RSS GB':<12}{ra:>16.2f}{rb:>16.2f}{ra / rb:>8.2f}   (whole process: both B=16 and B=64 training, then inference)")
PY
