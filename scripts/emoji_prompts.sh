#!/bin/sh
# Makes the prompt -> image figures of the README's "Text prompts" section with the shipped
# emoji model (needs `diffuse fetch text-encoder`): one row of 8 samples per prompt in
# docs/emoji/<prompt>.png. Usage: scripts/emoji_prompts.sh [path/to/diffuse]
set -e
D=${1:-diffuse}
mkdir -p docs/emoji
for p in "grinning face" "smiling face with sunglasses" "green apple" "blue car" "fire" \
         "pizza" "rocket" "red heart" "a purple elephant" "blue apple" "a cat wearing sunglasses" \
         "the eiffel tower at night"; do
  f=$(echo "$p" | tr ' ' '-')
  "$D" sample --model emoji --prompt "$p" --n 8 --cols 8 --steps 50 --sampler euler-a \
    --guidance 3 --seed 1 --out "docs/emoji/$f.png"
done
