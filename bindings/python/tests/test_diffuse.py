"""Tests of the `diffuse` Python package against the `diffuse` command, with real numpy and
Pillow. The command is found at $DIFFUSE_BIN, else at target/release/diffuse of this checkout
(`cargo build --release` makes it); without it the tests that compare with it are skipped with
a note, unless DIFFUSE_BIN is set (as `.ci/run` sets it), when they fail."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffuse

ROOT = Path(__file__).resolve().parents[3]
DIGITS = str(ROOT / "tests" / "fixtures" / "digits.csv.gz")
FOLDER = ROOT / "tests" / "fixtures" / "folder"


def cli_bin() -> str:
    given = os.environ.get("DIFFUSE_BIN")
    if given:
        assert Path(given).is_file(), f"DIFFUSE_BIN={given} does not exist"
        return given
    default = ROOT / "target" / "release" / "diffuse"
    if not default.is_file():
        pytest.skip(f"skipped: no diffuse binary at {default} (cargo build --release makes it)")
    return str(default)


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([cli_bin(), *args], capture_output=True, text=True)
    assert r.returncode == 0, f"diffuse {' '.join(args)} failed: {r.stderr}"
    return r


def read_dir(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


@pytest.fixture(scope="module")
def pipe() -> diffuse.Pipeline:
    return diffuse.Pipeline.load()


# Tiny model options, as the command's end-to-end tests train on the digits fixture.
TINY = dict(cond="class", batch=8, base_channels=16, res_blocks=1, lr=1e-3, warmup=2, sample_every=0)


# --- generation -----------------------------------------------------------------------------


def test_generate_shapes_dtypes_and_outputs(pipe):
    assert pipe.family == "diffusion"
    assert pipe.image_shape == (28, 28, 1)
    x = pipe.generate(n=3, class_="sneaker", sampler="dpmpp-2m", steps=4, seed=1)
    assert x.shape == (3, 28, 28, 1) and x.dtype == np.uint8 and x.flags.c_contiguous
    f = pipe.generate(n=3, class_="sneaker", sampler="dpmpp-2m", steps=4, seed=1, output="float")
    assert f.shape == (3, 28, 28, 1) and f.dtype == np.float32
    # The pixels are the float output clamped and rounded.
    assert np.array_equal(np.rint((np.clip(f, -1, 1) + 1) * 127.5).astype(np.uint8), x)
    pil = pipe.generate(n=2, class_=7, sampler="dpmpp-2m", steps=4, seed=1, output="pil")
    assert len(pil) == 2 and pil[0].size == (28, 28)
    assert np.array_equal(np.asarray(pil[0]), x[0, :, :, 0])  # class 7 is sneaker
    # Without a class: 4 per class, in class order.
    assert pipe.generate(sampler="euler", steps=2).shape == (40, 28, 28, 1)


def test_class_names_and_config(pipe):
    names = pipe.class_names
    assert len(names) == 10 and pipe.num_classes == 10
    assert names[0] == "T-shirt/top" and names[7] == "Sneaker" and names[9] == "Ankle boot"
    cfg = pipe.config
    assert isinstance(cfg, dict) and "unet" in json.dumps(cfg)
    cfg.clear()  # a fresh dict each time
    assert pipe.config


def test_same_bits_as_the_command(pipe, tmp_path):
    out = tmp_path / "cli"
    cli("sample", "--n", "5", "--class", "2", "--sampler", "ddim", "--steps", "6",
        "--seed", "7", "--guidance", "3", "--out-dir", str(out))
    want = read_dir(out)
    got = pipe.generate(n=5, class_=2, sampler="ddim", steps=6, seed=7, guidance=3.0)
    assert want.shape == (5, 28, 28, 3)
    # The command writes grey images as RGB PNGs.
    assert np.array_equal(np.repeat(got, 3, axis=3), want)
    # Twice in one process: the same bits.
    assert np.array_equal(pipe.generate(n=5, class_=2, sampler="ddim", steps=6, seed=7, guidance=3.0), got)
    assert not np.array_equal(pipe.generate(n=5, class_=2, sampler="ddim", steps=6, seed=8, guidance=3.0), got)


def test_given_noise_matches_init_noise_of_the_command(pipe, tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    # The command's --init-noise file (safetensors, written by hand: header + raw f32).
    header = json.dumps({"noise": {"dtype": "F32", "shape": [2, 1, 28, 28], "data_offsets": [0, noise.nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    f = tmp_path / "noise.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + noise.astype("<f4").tobytes())
    cli("sample", "--init-noise", str(f), "--class", "1", "--sampler", "euler", "--steps", "5",
        "--out-dir", str(tmp_path / "cli"))
    got = pipe.generate(noise=noise, class_=1, sampler="euler", steps=5)
    assert np.array_equal(np.repeat(got, 3, axis=3), read_dir(tmp_path / "cli"))
    # A non-contiguous view of the same values gives the same images.
    wide = np.zeros((2, 1, 28, 56), np.float32)
    wide[:, :, :, ::2] = noise
    assert np.array_equal(pipe.generate(noise=wide[:, :, :, ::2], class_=1, sampler="euler", steps=5), got)
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        pipe.generate(noise=np.zeros((2, 28, 28, 1), np.float32), steps=2, sampler="euler")
    with pytest.raises(ValueError, match="disagrees"):
        pipe.generate(n=3, noise=noise, steps=2, sampler="euler")


def test_progress_function_sees_every_step(pipe):
    seen = []
    pipe.generate(n=2, class_=0, sampler="euler", steps=4, progress=lambda s, t: seen.append((s, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_edit_and_inpaint(pipe):
    shirt = pipe.generate(n=1, class_="shirt", sampler="dpmpp-2m", steps=8, seed=3)
    edits = pipe.edit(shirt[0], strength=0.5, class_="coat", steps=10, n=2, seed=1)
    assert edits.shape == (2, 28, 28, 1) and edits.dtype == np.uint8
    assert not np.array_equal(edits[0], edits[1])
    seen = []
    pipe.edit(shirt[0], strength=0.5, steps=10, progress=lambda s, t: seen.append((s, t)))
    assert len(seen) >= 4 and seen[-1][0] == seen[-1][1], seen
    # strength 0 keeps the image; a float image in [0, 1] and a PIL image read the same.
    kept = pipe.edit(shirt[0].astype(np.float32) / 255.0, strength=0.0, steps=10)
    assert np.array_equal(kept[0], shirt[0])
    assert np.array_equal(pipe.edit(Image.fromarray(shirt[0, :, :, 0]), strength=0.0, steps=10), kept)
    # Inpainting: the black half of the mask is kept.
    mask = np.zeros((28, 28), np.uint8)
    mask[:, 14:] = 255
    painted = pipe.edit(shirt, mask=mask, class_="bag", steps=10, seed=2)
    assert painted.shape == (1, 28, 28, 1)
    assert np.abs(painted[0, :, :10].astype(int) - shirt[0, :, :10].astype(int)).max() <= 2
    with pytest.raises(ValueError, match=r"expected an array of shape"):
        pipe.edit(np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8 values or floats"):
        pipe.edit(np.zeros((28, 28), np.int64))
    with pytest.raises(ValueError, match="not a super-resolution model"):
        pipe.upscale(shirt[0])


# --- errors ---------------------------------------------------------------------------------


def test_errors_are_python_exceptions(pipe, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        diffuse.train(DIGITS, tmp_path / "r", stepz=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        pipe.generate(bogus=1)
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        diffuse.Pipeline.load("no/such/model")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(diffuse.ModelError):
        diffuse.Pipeline.load(bad)
    assert issubclass(diffuse.ModelError, Exception)
    with pytest.raises(ValueError, match="sampler"):
        pipe.generate(sampler="nope")
    with pytest.raises(ValueError, match="guidance weight"):
        pipe.generate(guidance=-1.0)
    with pytest.raises(ValueError, match="class"):
        pipe.generate(class_="spaceship")
    with pytest.raises(FileNotFoundError, match="/no/such/folder"):
        diffuse.train("/no/such/folder", tmp_path / "r2", steps=2)
    with pytest.raises(ValueError, match="output"):
        pipe.generate(output="jpeg")


def test_no_panic_crosses_into_python():
    with pytest.raises(RuntimeError, match="internal error in diffuse.*boom"):
        diffuse._native._panic("boom")
    # The interpreter and the module still work.
    assert diffuse.Pipeline.load().class_names[1] == "Trouser"


# --- the GIL and Ctrl-C ---------------------------------------------------------------------


def test_gil_released_during_generation(pipe):
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    start = len(ticks)
    pipe.generate(n=8, class_=0, sampler="euler", steps=20)
    during = len(ticks) - start
    stop.set()
    t.join()
    # A thread blocked on the GIL would not tick at all while the model runs.
    assert during > 20, during


def test_ctrl_c_stops_generation_within_a_step(pipe):
    import _thread
    import signal

    # Python's own Ctrl-C handler, also where the test runs in a background job (which starts
    # with SIGINT ignored, so that interrupt_main would do nothing).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pipe.generate(n=16, class_=0, sampler="ddpm", steps=1000)  # minutes if not stopped
        assert time.monotonic() - t0 < 15
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


# --- training, resume, fid, eval ------------------------------------------------------------


def metric_steps(run: Path):
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_and_interrupt(tmp_path):
    run = tmp_path / "run"
    seen = []
    out = diffuse.train(DIGITS, run, steps=4, checkpoint_every=2, progress=lambda *r: seen.append(r), **TINY)
    assert out == run and (run / "model.safetensors").is_file()
    assert [r[0] for r in seen] == [1, 2, 3, 4] and all(r[1] == 4 for r in seen)
    assert all(np.isfinite(r[2]) for r in seen)
    diffuse.train(DIGITS, run, steps=6, resume=True, progress=False, **TINY)
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    pipe = diffuse.Pipeline.load(run)
    assert pipe.image_shape == (8, 8, 1) and pipe.num_classes == 10
    assert pipe.generate(n=2, class_=3, steps=2, sampler="euler").shape == (2, 8, 8, 1)

    # Interrupted at step 3 (checkpoints every 4): the step is kept, resume continues.
    stopped = tmp_path / "stopped"

    def stop_at_3(step, *_):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        diffuse.train(DIGITS, stopped, steps=8, checkpoint_every=4, progress=stop_at_3, **TINY)
    assert metric_steps(stopped) == [1, 2, 3]
    assert (stopped / "checkpoint.safetensors").is_file()
    diffuse.train(DIGITS, stopped, steps=5, resume=True, checkpoint_every=4, progress=False, **TINY)
    assert metric_steps(stopped) == [1, 2, 3, 4, 5]

    # The same run from the command: the same losses (same seed, same bits).
    cmd = tmp_path / "cmd"
    cli("train", "--data", DIGITS, "--out", str(cmd), "--steps", "4", "--checkpoint-every", "2",
        "--cond", "class", "--batch", "8", "--base-channels", "16", "--res-blocks", "1",
        "--lr", "1e-3", "--warmup", "2", "--sample-every", "0")
    losses = lambda r: [json.loads(l)["loss"] for l in (r / "metrics.jsonl").read_text().splitlines()]
    assert losses(cmd) == losses(run)[:4]


def test_fid_matches_the_command(pipe, tmp_path):
    a = pipe.generate(n=24, sampler="dpmpp-2m", steps=6, seed=1)
    b = pipe.generate(n=24, sampler="dpmpp-2m", steps=6, seed=2)
    got = diffuse.fid(a, b)
    assert np.isfinite(got["fid"]) and got["n_a"] == 24 and got["n_b"] == 24
    for name, x in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(x):
            Image.fromarray(img[:, :, 0]).save(tmp_path / name / f"{i:05}.png")
    j = tmp_path / "fid.json"
    cli("fid", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(j))
    want = json.loads(j.read_text())
    for k in ("fid", "kid_mean", "precision", "recall"):
        assert got[k] == want[k], (k, got[k], want[k])
    # Folders give the same figures as arrays.
    assert diffuse.fid(tmp_path / "a", tmp_path / "b")["fid"] == got["fid"]


def test_eval_returns_the_report(tmp_path):
    run = tmp_path / "run"
    diffuse.train(DIGITS, run, steps=2, progress=False, **TINY)
    r = diffuse.eval(run, data=DIGITS, n=8, n_real=100, steps=2)
    assert r["n"] == 8 and r["steps"] == 2 and np.isfinite(r["fid"])
    j = tmp_path / "eval.json"
    cli("eval", "--model", str(run), "--data", DIGITS, "--n", "8", "--n-real", "100", "--steps", "2",
        "--json", str(j))
    assert json.loads(j.read_text())["fid"] == r["fid"]
    with pytest.raises(ValueError, match="--n must be between"):
        diffuse.eval(run, data=DIGITS, n=1)


def test_upscale_matches_the_command(tmp_path):
    # A tiny 2x super-resolution model on the folder fixture (as tests/all/superres.rs trains).
    sr = tmp_path / "sr"
    diffuse.train(FOLDER, sr, task="superres", scale=2, image_size=16, steps=3, batch=4, base_channels=8,
                  norm_groups=4, res_blocks=1, warmup=1, sample_every=0, progress=False)
    pipe = diffuse.Pipeline.load(sr)
    small = np.asarray(Image.open(FOLDER / "circle" / "a_grey.png").convert("RGB").resize((8, 8), Image.BILINEAR))
    got = pipe.upscale(small, steps=4, n=2, seed=3)
    assert got.shape == (2, 16, 16, 3) and got.dtype == np.uint8
    Image.fromarray(small).save(tmp_path / "small.png")
    cli("upscale", "--model", str(sr), "--image", str(tmp_path / "small.png"), "--steps", "4", "--n", "2",
        "--seed", "3", "--out", str(tmp_path / "grid.png"))
    # The command writes the versions as a grid (2-pixel white borders): compare the cells.
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    cells = [grid[2:18, 2 + 18 * i: 18 + 18 * i] for i in range(2)]
    assert all(np.array_equal(c, g) for c, g in zip(cells, got)), "upscale differs from the command"
    with pytest.raises(ValueError, match="--scale 4"):
        pipe.upscale(small, scale=4)
