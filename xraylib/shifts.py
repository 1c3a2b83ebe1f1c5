"""Acquisition shifts: what another scanner, protocol or hospital does to a chest radiograph.

A model scored only on held-out patients of its own cohort is scored on the easy case; new
scans arrive with another exposure, detector, resolution, compression, framing and markers.
`SHIFTS` is a fixed suite of such changes, each a plain function from a full-resolution
grayscale image (uint8 [H, W]) to the *file bytes* a PACS export would hold, so that a shifted
image goes through the very decoding and preprocessing that `evaluate` and `predict` apply.

The suite is kept apart from training's augmentation (`dataset.augment_batch`): where a shift's
family is one that augmentation draws from, the shift is stronger than anything training draws
(rotations of 15 degrees against 10, zoom 1.2 against 1.1, gamma 0.6 and 1.6 against 0.78-1.28,
blur of 1.5 px at full size and noise of 10 grey levels against what the model's smaller input
sees), and `TRAINED_FAMILIES` says which families each augmentation level draws, so that a
report can also give the mean and worst over the shifts a model never trained on: re-compression
and burnt-in markers for every level, and cropping for every level but 'collimation' (which cuts
up to 10% of a side, against the cropped top's 12%).

`load_shifted` decodes a list of image locations under one shift; `shift_metrics` scores a
model's probabilities under every shift and summarizes them (clean, mean, worst).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Shift = Callable[[np.ndarray, np.random.Generator], bytes]


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _jpeg(gray: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _levels(fn: Callable[[np.ndarray], np.ndarray]) -> Shift:
    """A change of the intensity curve, applied to values in 0..1."""
    return lambda gray, rng: _png(fn(gray.astype(np.float32) / 255.0) * 255.0)


def _pil(fn: Callable[[Any], Any]) -> Shift:
    def apply(gray: np.ndarray, rng: np.random.Generator) -> bytes:
        from PIL import Image

        return _png(np.asarray(fn(Image.fromarray(gray))))

    return apply


def _blur(radius: float) -> Shift:
    """Softness: a Gaussian blur of `radius` pixels of the original image."""
    def blur(im: Any) -> Any:
        from PIL import ImageFilter

        return im.filter(ImageFilter.GaussianBlur(radius))

    return _pil(blur)


def _noise(sigma: float) -> Shift:
    """Detector noise: Gaussian, `sigma` in grey levels of 255, drawn per image from `rng`."""
    return lambda gray, rng: _png(gray.astype(np.float32) + rng.normal(0.0, sigma, gray.shape))


def _resolution_loss(factor: float) -> Shift:
    def apply(gray: np.ndarray, rng: np.random.Generator) -> bytes:
        from PIL import Image

        im = Image.fromarray(gray)
        small = im.resize((max(8, round(im.width * factor)), max(8, round(im.height * factor))), Image.Resampling.BOX)
        return _png(np.asarray(small.resize(im.size, Image.Resampling.BILINEAR)))

    return apply


def _zoom(scale: float) -> Shift:
    """`scale` > 1 crops the centre (a tighter collimation); < 1 shrinks the chest inside a black frame."""

    def apply(gray: np.ndarray, rng: np.random.Generator) -> bytes:
        from PIL import Image

        im = Image.fromarray(gray)
        w, h = im.size
        if scale >= 1:
            cw, ch = round(w / scale), round(h / scale)
            left, top = (w - cw) // 2, (h - ch) // 2
            return _png(np.asarray(im.crop((left, top, left + cw, top + ch))))
        canvas = Image.new("L", (round(w / scale), round(h / scale)), 0)
        canvas.paste(im, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        return _png(np.asarray(canvas))

    return apply


def _crop_top(fraction: float) -> Shift:
    """Framing: the top `fraction` of the film cut off (neck and clavicles out of view)."""
    return lambda gray, rng: _png(gray[round(gray.shape[0] * fraction):])


def _rotate(degrees: float) -> Shift:
    def apply(gray: np.ndarray, rng: np.random.Generator) -> bytes:
        from PIL import Image

        return _png(np.asarray(Image.fromarray(gray).rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0)))

    return apply


def _border(fraction: float, value: int) -> Shift:
    def apply(gray: np.ndarray, rng: np.random.Generator) -> bytes:
        out = gray.copy()
        b = max(1, round(min(gray.shape) * fraction))
        out[:b], out[-b:], out[:, :b], out[:, -b:] = value, value, value, value
        return _png(out)

    return apply


def _markers(gray: np.ndarray, rng: np.random.Generator) -> bytes:
    """A side marker and a burnt-in text label, as another hospital's exports carry."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(gray)
    draw = ImageDraw.Draw(im)
    side = min(im.size)
    font = ImageFont.load_default(size=max(8, side // 8))
    small = ImageFont.load_default(size=max(6, side // 22))
    draw.text((round(im.width * 0.78), round(im.height * 0.05)), "R", fill=255, font=font)
    draw.rectangle((0, im.height - side // 9, im.width // 2, im.height), fill=0)
    draw.text((side // 40, im.height - side // 10), "PORTABLE AP 12:03", fill=230, font=small)
    return _png(np.asarray(im))


# name: the shift. Severities are those of a plausible change of scanner or protocol: visible to a
# radiologist, not destroying the finding.
SHIFTS: dict[str, Shift] = {
    "brighter": _levels(lambda x: x + 0.15),
    "darker": _levels(lambda x: x - 0.15),
    "gamma 0.6": _levels(lambda x: np.power(x, 0.6)),
    "gamma 1.6": _levels(lambda x: np.power(x, 1.6)),
    "low contrast": _levels(lambda x: (x - 0.5) * 0.6 + 0.5),
    "high contrast": _levels(lambda x: (x - 0.5) * 1.4 + 0.5),
    "noise": _noise(10.0),
    "blur": _blur(1.5),
    "resolution loss": _resolution_loss(0.3),
    "jpeg q15": lambda gray, rng: _jpeg(gray, 15),
    "zoom in 1.2": _zoom(1.2),
    "zoom out 0.8": _zoom(0.8),
    "crop top 12%": _crop_top(0.12),
    "rotate 15": _rotate(15.0),
    "rotate -15": _rotate(-15.0),
    "black border": _border(0.06, 0),
    "markers": _markers,
}


# Each shift's family, and the families each augmentation level (config.AUGMENT_LEVELS) draws from.
FAMILIES = {
    "brighter": "exposure", "darker": "exposure", "gamma 0.6": "gamma", "gamma 1.6": "gamma",
    "low contrast": "contrast", "high contrast": "contrast", "noise": "noise", "blur": "softness",
    "resolution loss": "softness", "jpeg q15": "compression", "zoom in 1.2": "zoom", "zoom out 0.8": "zoom",
    "crop top 12%": "framing", "rotate 15": "rotation", "rotate -15": "rotation", "black border": "frame",
    "markers": "markers",
}
TRAINED_FAMILIES = {
    "none": frozenset(),
    "geometry": frozenset({"exposure", "contrast", "zoom", "rotation"}),
    "acquisition": frozenset({"exposure", "contrast", "zoom", "rotation", "gamma", "noise", "softness", "frame"}),
    "collimation": frozenset({"exposure", "contrast", "zoom", "rotation", "gamma", "noise", "softness", "frame",
                              "framing"}),
}


def full_resolution_gray(data: bytes) -> np.ndarray:
    """File bytes to a full-size uint8 grayscale array (the shifts work on the original pixels)."""
    from PIL import Image, ImageOps

    from xraylib.dataset import _to_grayscale

    im = Image.open(io.BytesIO(data))
    im.load()
    return _to_grayscale(ImageOps.exif_transpose(im))


def load_shifted(locations: Sequence[str], shift: str, image_size: int, *, equalize_mode: str = "none",
                 seed: int = 0) -> Any:
    """uint8 [N, image_size, image_size] pixels of `locations` under `shift` ('clean' for none),
    decoded and preprocessed as `evaluate` does. Noise is drawn from `seed`, per image."""
    import torch

    from xraylib import storage
    from xraylib.dataset import decode_image, equalize

    def one(i_location: tuple[int, str]) -> np.ndarray:
        i, location = i_location
        data = storage.read_bytes(location)
        if shift != "clean":
            data = SHIFTS[shift](full_resolution_gray(data), np.random.default_rng([seed, i]))
        return equalize(decode_image(data, image_size, location), equalize_mode)

    pixels = storage.parallel_map(one, list(enumerate(locations)))
    return torch.from_numpy(np.stack(pixels))


def shift_metrics(labels: np.ndarray, probabilities: dict[str, np.ndarray], threshold: float,
                  augment: str | None = None) -> dict[str, Any]:
    """Metrics at `threshold` for each shift's probabilities (keys: 'clean' and shift names), and
    the mean and the worst over the shifts (the clean images left out of both). With `augment`,
    the level a model trained with, also 'unseen_mean' and 'unseen_worst': over the shifts whose
    family that level never draws."""
    from xraylib.evaluate import compute_metrics

    per_shift = {name: compute_metrics(labels, p, threshold) for name, p in probabilities.items()}
    keys = ("accuracy", "sensitivity", "specificity", "roc_auc")

    def summarize(names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
        rows = [per_shift[n] for n in names]
        return ({k: float(np.mean([m[k] for m in rows])) for k in keys},
                {k: float(np.min([m[k] for m in rows])) for k in keys})

    shifted = [name for name in per_shift if name != "clean"]
    mean, worst = summarize(shifted)
    result = {"per_shift": per_shift, "mean": mean, "worst": worst}
    if augment is not None:
        unseen = [n for n in shifted if FAMILIES[n] not in TRAINED_FAMILIES[augment]]
        result["unseen_mean"], result["unseen_worst"] = summarize(unseen)
    return result
