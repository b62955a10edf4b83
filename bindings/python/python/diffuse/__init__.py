"""diffuse: denoising diffusion models from Python, over the Rust library.

    import diffuse
    pipe = diffuse.Pipeline.load("fashion-mnist")        # or "emoji", a run folder, a file
    images = pipe.generate(n=8, class_="sneaker", sampler="dpmpp-2m", steps=20, seed=0)
    images.shape, images.dtype                          # (8, 28, 28, 1) uint8

Every function takes the options of the `diffuse` command of the same job as keyword
arguments (`--min-snr 5` is `min_snr=5`, `--class` is `class_`), checks them with the
command's own parser and runs the same library code, so the same options and seed give the
same bits as the command. Errors are exceptions with the command's one-line message:
``TypeError`` for an unknown keyword, ``FileNotFoundError`` for a file or folder that does not
exist, :class:`ModelError` for a model that cannot be loaded, ``ValueError`` for the rest.
Long calls release the GIL, and Ctrl-C stops them within a step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from ._native import ModelError

__all__ = ["Pipeline", "ModelError", "train", "fid", "eval", "fetch", "export", "__version__"]
__version__: str = _native.__version__

PathLike = Union[str, "os.PathLike[str]"]
#: An image: a file path, a PIL image, or a numpy array ``[H, W]``, ``[H, W, C]`` or
#: ``[1, H, W, C]`` (C = 1, 3 or 4) of ``uint8`` or of floats in ``[0, 1]``.
ImageLike = Union[PathLike, np.ndarray, Any]
#: Progress: ``True`` for a bar on stderr (tqdm's when it is installed), a function called
#: after every step, or ``False``.
Progress = Union[bool, Callable[..., Any], None]


# ---------------------------------------------------------------------------------------------
# Keyword arguments -> the command's options


_OPTIONS: Dict[str, Dict[str, dict]] = {}


def _options(command: str) -> Dict[str, dict]:
    if command not in _OPTIONS:
        _OPTIONS[command] = {o["name"]: o for o in json.loads(_native.options(command))}
    return _OPTIONS[command]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(value)


def _argv(command: str, func: str, kwargs: Dict[str, Any]) -> List[str]:
    """The command line of `diffuse COMMAND` for keyword arguments of `func` (None: not given;
    a flag's True: given)."""
    known = _options(command)
    argv: List[str] = []
    for key, value in kwargs.items():
        name = "class" if key == "class_" else key
        spec = known.get(name)
        if spec is None:
            raise TypeError(f"{func}() got an unexpected keyword argument '{key}'")
        if value is None:
            continue
        if spec["positional"]:
            argv.append(_text(value))
            continue
        flag = "--" + name.replace("_", "-")
        if spec["flag"]:
            if not isinstance(value, bool):
                raise TypeError(f"{func}(): {key} must be True or False (got {value!r})")
            if value:
                argv.append(flag)
            continue
        argv += [flag, _text(value)]
    return argv


# ---------------------------------------------------------------------------------------------
# Images in and out


def _as_array(image: Any, what: str) -> np.ndarray:
    """`image` as a contiguous uint8 array [H, W, C] (C = 1, 3 or 4)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = np.asarray(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what}: expected a file path, a PIL image or a numpy array, got {type(image).__name__}")
    a = image
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(
            f"{what}: expected an array of shape [H, W], [H, W, C] or [1, H, W, C] with C 1, 3 or 4; got {list(image.shape)}"
        )
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{what}: the array holds NaN or infinite values")
        a = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    else:
        raise ValueError(f"{what}: expected uint8 values or floats in [0, 1]; got {a.dtype}")
    return np.ascontiguousarray(a)


def _save_png(a: np.ndarray, path: Path) -> None:
    from PIL import Image

    mode = {1: "L", 3: "RGB", 4: "RGBA"}[a.shape[2]]
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, mode).save(path)


def _image_file(image: ImageLike, what: str, folder: Path) -> str:
    """A file holding `image`: its own path, or a PNG written into `folder`."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    path = folder / f"{what}.png"
    _save_png(_as_array(image, what), path)
    return str(path)


def _image_set(images: Any, what: str, folder: Path) -> str:
    """A data spec for a set of images: a path or dataset name as it is, else a folder of PNGs
    (from an array [N, H, W], [N, H, W, C] or a sequence of images)."""
    if isinstance(images, (str, os.PathLike)):
        return os.fspath(images)
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"{what}: expected an array [N, H, W] or [N, H, W, C]; got {list(images.shape)}")
        images = list(images)
    items = list(images)
    if not items:
        raise ValueError(f"{what}: no images")
    out = folder / what
    out.mkdir()
    for i, img in enumerate(items):
        _save_png(_as_array(img, f"{what}[{i}]"), out / f"{i:05}.png")
    return str(out)


def _to_output(data: bytes, shape: Sequence[int], output: str) -> Any:
    n, c, h, w = shape
    if output == "float":
        a = np.frombuffer(data, dtype=np.float32).reshape(n, c, h, w)
    else:
        a = np.frombuffer(data, dtype=np.uint8).reshape(n, c, h, w)
    a = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    if output == "pil":
        from PIL import Image

        return [Image.fromarray(x[:, :, 0] if c == 1 else x) for x in a]
    return a


def _check_output(output: str) -> None:
    if output not in ("uint8", "float", "pil"):
        raise ValueError(f"output must be 'uint8', 'float' or 'pil' (got {output!r})")


class _Bar:
    """A progress bar on stderr: tqdm's when it is installed, else one line redrawn."""

    def __init__(self, unit: str):
        self.unit = unit
        self.tqdm = None
        try:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(unit=unit, file=sys.stderr)
        except ImportError:
            pass

    def update(self, done: int, total: int, postfix: str = "") -> None:
        if self.tqdm is not None:
            if self.tqdm.total != total:
                self.tqdm.reset(total=total)
            self.tqdm.n = done
            if postfix:
                self.tqdm.set_postfix_str(postfix, refresh=False)
            self.tqdm.refresh()
            return
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r[{'=' * filled}{' ' * (width - filled)}] {done}/{total} {self.unit}s {postfix}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _step_function(progress: Progress, unit: str):
    """(function for the native call, bar to close)."""
    if progress is None or progress is False:
        return None, None
    if progress is True:
        bar = _Bar(unit)
        return bar.update, bar
    if callable(progress):
        return progress, None
    raise TypeError(f"progress must be True, False or a function (got {progress!r})")


def _run_with_progress(progress: Progress, call: Callable[[Any], Any]) -> Any:
    """`call(step_function)` with the bar or function `progress` asks for."""
    step, bar = _step_function(progress, "step")
    try:
        return call(step)
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """A model ready to generate: diffusion (with its sampler, guidance and, for a text model,
    the text encoder), or a GAN, autoregressive or VAE model. Load one with
    :meth:`Pipeline.load`."""

    def __init__(self, native: Any):
        self._native = native
        self._info = json.loads(native.info())

    @classmethod
    def load(cls, model: Optional[PathLike] = None) -> "Pipeline":
        """Loads a model: ``None`` or ``"fashion-mnist"`` (the embedded model),
        ``"fashion-mnist-fast"`` (4 steps), ``"emoji"`` (text; needs ``diffuse fetch
        text-encoder``), the other shipped models, a run folder, a ``.safetensors`` model file,
        or a diffusers DDPM pipeline folder."""
        return cls(_native.Model.load(None if model is None else os.fspath(model)))

    @property
    def family(self) -> str:
        """``"diffusion"``, ``"gan"``, ``"autoregressive"`` or ``"vae"``."""
        return self._info["family"]

    @property
    def source(self) -> str:
        """Where the model came from."""
        return self._info["source"]

    @property
    def class_names(self) -> Optional[List[str]]:
        """The classes of a class-conditioned model, in index order; ``None`` otherwise."""
        names = self._info["class_names"]
        return None if names is None else list(names)

    @property
    def num_classes(self) -> Optional[int]:
        return self._info["num_classes"]

    @property
    def takes_text(self) -> bool:
        """Whether the model is conditioned on text prompts."""
        return bool(self._info["text"])

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(H, W, C)`` of the images it makes."""
        c, h, w = self._info["shape"]
        return (h, w, c)

    @property
    def config(self) -> Dict[str, Any]:
        """The model's config (as saved with it), a fresh dict."""
        return json.loads(json.dumps(self._info["config"]))

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        return f"Pipeline({self.source!r}, family={self.family!r}, images={h}x{w}x{c})"

    def generate(
        self,
        n: Optional[int] = None,
        *,
        class_: Union[int, str, None] = None,
        prompt: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        seed: int = 0,
        noise: Optional[np.ndarray] = None,
        progress: Progress = False,
        output: str = "uint8",
        eta: Optional[float] = None,
        spacing: Optional[str] = None,
        variance: Optional[str] = None,
        karras: bool = False,
        clip_sample: Optional[bool] = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
        batch: Optional[int] = None,
        temperature: Optional[float] = None,
        precision: Optional[str] = None,
    ) -> Any:
        """Generates images, as ``diffuse sample`` with the same options does (same seed, same
        bits).

        n: images (default 16, or 4 per class for a class-conditioned model without a class).
        class_: a class index or name. prompt / negative_prompt: for text models.
        sampler: ddpm, ddim, dpmpp-2m, euler, euler-a or heun (default: ddpm over all steps; a
        flow model's Euler; a distilled student's own). steps, guidance (1 = none), eta,
        spacing, variance, karras, clip_sample, guidance_interval ``(lo, hi)``: as the command's.
        noise: ``x_T`` as a float array ``[N, C, H, W]`` of unit variance (diffusers' ``latents``).
        progress: ``True`` for a bar, or ``f(step, total)``.
        output: ``"uint8"`` (``[N, H, W, C]`` pixels), ``"float"`` (``[N, H, W, C]`` float32 in
        model space ``[-1, 1]``, before clamping and rounding) or ``"pil"`` (PIL images).
        """
        _check_output(output)
        options = _argv(
            "sample",
            "generate",
            dict(
                n=n,
                class_=class_,
                prompt=prompt,
                negative_prompt=negative_prompt,
                sampler=sampler,
                steps=steps,
                guidance=guidance,
                seed=seed,
                eta=eta,
                spacing=spacing,
                variance=variance,
                karras=karras,
                clip_sample=clip_sample,
                guidance_interval=guidance_interval,
                batch=batch,
                temperature=temperature,
                precision=precision,
            ),
        )
        native_noise = None
        if noise is not None:
            a = np.asarray(noise)
            if a.ndim != 4 or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                raise ValueError(
                    f"noise: expected a float array [N, C, H, W] (here [N, {self._info['shape'][0]}, {self._info['shape'][1]}, {self._info['shape'][2]}]); got {a.dtype} {list(a.shape)}"
                )
            a = np.ascontiguousarray(a, dtype=np.float32)
            native_noise = (a.tobytes(), list(a.shape))
        data, shape = _run_with_progress(
            progress, lambda step: self._native.generate(options, native_noise, output == "float", step)
        )
        return _to_output(data, shape, output)

    def edit(
        self,
        image: ImageLike,
        *,
        strength: Optional[float] = None,
        mask: Optional[ImageLike] = None,
        class_: Union[int, str, None] = None,
        prompt: Optional[str] = None,
        guidance: Optional[float] = None,
        n: int = 1,
        seed: int = 0,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        output: str = "uint8",
        eta: Optional[float] = None,
        spacing: Optional[str] = None,
        variance: Optional[str] = None,
        karras: bool = False,
        clip_sample: Optional[bool] = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
        batch: Optional[int] = None,
        precision: Optional[str] = None,
        progress: Progress = False,
    ) -> Any:
        """Edits an image, as ``diffuse edit`` does: SDEdit (``strength``: 0 keeps the image, 1
        regenerates it; default 0.6) or inpainting with ``mask`` (white where the image is
        regenerated; strength 1 by default). The image (and mask) is resized and centre-cropped
        to the model's size; arrays are read as 8-bit pixels, as the command reads files.
        Returns ``n`` edits (``output`` and ``progress`` as in :meth:`generate`)."""
        _check_output(output)
        with tempfile.TemporaryDirectory(prefix="diffuse-edit-") as tmp:
            folder = Path(tmp)
            options = _argv(
                "edit",
                "edit",
                dict(
                    image=_image_file(image, "image", folder),
                    mask=None if mask is None else _image_file(mask, "mask", folder),
                    strength=strength,
                    class_=class_,
                    prompt=prompt,
                    guidance=guidance,
                    n=n,
                    seed=seed,
                    sampler=sampler,
                    steps=steps,
                    eta=eta,
                    spacing=spacing,
                    variance=variance,
                    karras=karras,
                    clip_sample=clip_sample,
                    guidance_interval=guidance_interval,
                    batch=batch,
                    precision=precision,
                ),
            )
            data, shape = _run_with_progress(
                progress, lambda step: self._native.edit(options, output == "float", step)
            )
        return _to_output(data, shape, output)

    def upscale(
        self,
        image: ImageLike,
        *,
        n: int = 1,
        seed: int = 0,
        scale: Optional[int] = None,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        output: str = "uint8",
        eta: Optional[float] = None,
        spacing: Optional[str] = None,
        variance: Optional[str] = None,
        karras: bool = False,
        clip_sample: Optional[bool] = None,
        batch: Optional[int] = None,
        precision: Optional[str] = None,
        progress: Progress = False,
    ) -> Any:
        """Enlarges an image with a super-resolution model, as ``diffuse upscale`` does: ``n``
        versions (different noise each). An image larger than the model's input is first
        reduced to it. ``output`` and ``progress`` as in :meth:`generate`."""
        _check_output(output)
        with tempfile.TemporaryDirectory(prefix="diffuse-upscale-") as tmp:
            options = _argv(
                "upscale",
                "upscale",
                dict(
                    model=self.source,
                    image=_image_file(image, "image", Path(tmp)),
                    n=n,
                    seed=seed,
                    scale=scale,
                    sampler=sampler,
                    steps=steps,
                    eta=eta,
                    spacing=spacing,
                    variance=variance,
                    karras=karras,
                    clip_sample=clip_sample,
                    batch=batch,
                    precision=precision,
                ),
            )
            data, shape = _run_with_progress(
                progress, lambda step: self._native.upscale(options, output == "float", step)
            )
        return _to_output(data, shape, output)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def train(
    data: PathLike,
    out: PathLike,
    *,
    progress: Progress = True,
    **options: Any,
) -> Path:
    """Trains a model, as ``diffuse train --data DATA --out OUT`` with ``options`` does:
    ``steps``, ``batch``, ``lr``, ``cond="class"``, ``objective``, ``family``, ``minutes``,
    ``resume=True``, ... (``diffuse train --help`` lists them; ``--min-snr`` is ``min_snr``).

    data: an image folder, IDX file, digits CSV or dataset name (``"fashion-mnist"``).
    progress: ``True`` for a bar, or ``f(step, total, loss, lr, elapsed_seconds)`` after every
    step. Ctrl-C, or an exception from ``progress``, stops the run after the step in hand with
    its checkpoint written (``resume=True`` continues) and is raised.
    Returns the run folder (its ``model.safetensors`` loads with :meth:`Pipeline.load`).
    """
    argv = _argv("train", "train", dict(data=os.fspath(data), out=os.fspath(out), **options))
    step, bar = _step_function(progress, "step")
    if bar is not None:
        step = lambda s, total, loss, lr, elapsed: bar.update(s, total, f"loss {loss:.4f}")  # noqa: E731
    try:
        _native.train(argv, step)
    finally:
        if bar is not None:
            bar.close()
    return Path(out)


def fid(a: Any, b: Any, *, features: str = "fashion-mnist", **options: Any) -> Dict[str, Any]:
    """FID, KID, precision and recall between two image sets, as ``diffuse fid A B`` does.

    a, b: an image folder, IDX file, digits CSV or dataset name, a uint8 array ``[N, H, W]`` or
    ``[N, H, W, C]`` (floats in ``[0, 1]`` too), or a sequence of images.
    features: ``"fashion-mnist"`` (the shipped classifier), ``"inception"``, or a classifier
    file. Returns the report as a dict (``fid``, ``kid_mean``, ``precision``, ...).
    """
    with tempfile.TemporaryDirectory(prefix="diffuse-fid-") as tmp:
        folder = Path(tmp)
        argv = _argv(
            "fid",
            "fid",
            dict(a=_image_set(a, "a", folder), b=_image_set(b, "b", folder), features=features, **options),
        )
        return json.loads(_native.fid(argv))


def eval(model: Optional[PathLike] = None, **options: Any) -> Dict[str, Any]:  # noqa: A001
    """Samples from a model and scores the samples, as ``diffuse eval`` does: ``n``, ``data``,
    ``sampler``, ``steps``, ``guidance``, ``features``, ... Returns the report as a dict."""
    argv = _argv("eval", "eval", dict(model=None if model is None else os.fspath(model), **options))
    return json.loads(_native.eval(argv))


def fetch(name: str) -> None:
    """Fetches a named dataset or weights into the cache, as ``diffuse fetch NAME`` does:
    ``fashion-mnist``, ``mnist``, ``digits``, ``emoji``, ``inception`` (FID features) or
    ``text-encoder`` (for the emoji model and text training). Does nothing if already there."""
    _native.run(["fetch", str(name)])


def export(model: Optional[PathLike], diffusers: PathLike) -> Path:
    """Writes a diffuse model as a diffusers pipeline folder (``DDPMPipeline.from_pretrained``
    loads it), as ``diffuse export`` does. Returns the folder."""
    argv = ["export", "--diffusers", os.fspath(diffusers)]
    if model is not None:
        argv += ["--model", os.fspath(model)]
    _native.run(argv)
    return Path(diffusers)
