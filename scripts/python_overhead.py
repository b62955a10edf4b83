"""The overhead of the Python package against the `diffuse` command for the same work:
`diffuse sample` (a fresh process: load the model, sample, write PNGs) against a fresh Python
process that imports diffuse, loads the model and calls `Pipeline.generate` with the same
options, alternating A B A B, and the time of the `generate` call alone against the command's
sampling time as the command reports it. Both sides make the same images (checked).

    python scripts/python_overhead.py [--rounds 3] [--n 64] [--steps 50] [--bin target/release/diffuse]

Run with the Python that has the package installed (`pip install ./bindings/python`).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import diffuse
pipe = diffuse.Pipeline.load()
t1 = time.perf_counter()
x = pipe.generate(n={n}, sampler="{sampler}", steps={steps}, seed=5)
t2 = time.perf_counter()
import numpy as np
np.save(sys.argv[1], x)
print(json.dumps({{"load": t1 - t0, "generate": t2 - t1}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--bin", default=str(Path(__file__).resolve().parents[1] / "target" / "release" / "diffuse"))
    a = ap.parse_args()
    cli_wall, py_wall, py_gen = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        child = CHILD.format(n=a.n, sampler=a.sampler, steps=a.steps)
        for r in range(a.rounds):
            out = tmp / f"cli{r}"
            t = time.perf_counter()
            subprocess.run([a.bin, "sample", "--n", str(a.n), "--sampler", a.sampler, "--steps", str(a.steps),
                            "--seed", "5", "--out-dir", str(out)], check=True, capture_output=True)
            cli_wall.append(time.perf_counter() - t)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", child, str(tmp / f"py{r}.npy")], check=True,
                               capture_output=True, text=True)
            py_wall.append(time.perf_counter() - t)
            py_gen.append(json.loads(p.stdout.strip().splitlines()[-1])["generate"])
            want = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(out.glob("*.png"))])
            got = np.load(tmp / f"py{r}.npy")
            assert np.array_equal(np.repeat(got, 3, axis=3) if got.shape[3] == 1 else got, want), "images differ"
            print(f"round {r + 1}: command {cli_wall[-1]:.2f} s, Python process {py_wall[-1]:.2f} s "
                  f"(generate call {py_gen[-1]:.2f} s)", flush=True)
    c, p, g = (statistics.median(v) for v in (cli_wall, py_wall, py_gen))
    print(f"median: command {c:.2f} s, Python process {p:.2f} s ({p / c:.3f}x), generate call alone {g:.2f} s "
          f"({g / c:.3f}x of the whole command); same images: yes")


if __name__ == "__main__":
    main()
