#!/bin/sh
# Latent against pixel diffusion on 64x64 emoji (docs/LATENT.md): a VAE, then a latent and a
# pixel text-conditioned model trained for the same wall-clock time, then samples and metrics.
# Usage: scripts/latent_vs_pixel.sh [path/to/diffuse] [minutes per model]
set -e
D=${1:-diffuse}
MIN=${2:-12}
"$D" fetch emoji
"$D" fetch text-encoder
"$D" train-vae --data emoji --image-size 64 --widths 32,64,64 --steps 1000 --batch 16 --out runs/vae-emoji
timeout $((MIN * 60)) "$D" train --data emoji --cond text --latent runs/vae-emoji --image-size 64 --objective epsilon \
    --base-channels 64 --res-blocks 2 --steps 100000 --checkpoint-every 50 --sample-every 0 --out runs/ldm-emoji || true
timeout $((MIN * 60)) "$D" train --data emoji --cond text --image-size 64 --objective epsilon \
    --base-channels 32 --res-blocks 2 --steps 100000 --checkpoint-every 25 --sample-every 0 --out runs/px64-emoji || true
for m in ldm-emoji px64-emoji; do
  for p in "grinning face" "red heart" "fire" "blue car"; do
    "$D" sample --model runs/$m --prompt "$p" --n 8 --cols 8 --steps 50 --sampler euler-a \
      --guidance 3 --seed 1 --out "runs/$m-$(echo "$p" | tr ' ' '-').png"
  done
  "$D" eval --model runs/$m --data emoji --features inception --n 100 --n-real 200 \
    --sampler euler-a --steps 25 --guidance 1 --batch 50 --json runs/$m-eval.json
done
