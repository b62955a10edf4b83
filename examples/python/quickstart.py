"""diffuse from Python in one script: make a folder of images, train a class-conditioned
model on it for a few minutes, look at a grid of samples, and score them with FID.

    pip install ./bindings/python        # once, from the repository's root
    python examples/python/quickstart.py [--data FOLDER] [--minutes 3] [--show]

Without --data it draws its own folder: 16x16 discs and squares in random colours, one
subfolder per class (a folder's first-level subfolders are its classes).
"""

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import diffuse


def make_shapes(folder: Path, per_class: int = 300, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for shape in ("disc", "square"):
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
            r = rng.uniform(3, 6)
            cx, cy = rng.uniform(r, size - r, 2)
            box = [cx - r, cy - r, cx + r, cy + r]
            colour = tuple(int(v) for v in rng.integers(120, 256, 3))
            draw = ImageDraw.Draw(img)
            (draw.ellipse if shape == "disc" else draw.rectangle)(box, fill=colour)
            img.save(folder / shape / f"{i:04}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a folder of images (default: drawn shapes)")
    ap.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--show", action="store_true", help="open the grid in an image viewer")
    args = ap.parse_args()

    data = args.data or make_shapes(Path("runs/quickstart-data"))
    t0 = time.time()
    # The options of `diffuse train` as keyword arguments; Ctrl-C stops with a checkpoint
    # and resume=True continues.
    # Up to 3,000 steps (the default), stopping early when the minutes run out.
    diffuse.train(data, args.out, cond="class", image_size=16, minutes=args.minutes,
                  resume=(args.out / "checkpoint.safetensors").exists())
    print(f"trained for {time.time() - t0:.0f} s")

    pipe = diffuse.Pipeline.load(args.out)
    print(pipe, "classes:", pipe.class_names)
    rows = [pipe.generate(n=8, class_=c, sampler="euler", steps=30, seed=i)
            for i, c in enumerate(pipe.class_names)]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    img = Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST)
    img.save("quickstart-grid.png")
    print("wrote quickstart-grid.png (one row per class)")
    if args.show:
        img.show()

    # FID of 200 samples against the training images, on Inception features (fetched once).
    diffuse.fetch("inception")
    samples = pipe.generate(n=200, sampler="euler", steps=30, seed=1)
    report = diffuse.fid(data, samples, features="inception")
    print(f"FID {report['fid']:.2f}, precision {report['precision']:.3f}, recall {report['recall']:.3f}")


if __name__ == "__main__":
    main()
