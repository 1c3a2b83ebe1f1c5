"""The dataset: which images there are, what they are labelled, how they are decoded and batched.

- `list_images` indexes a location in the Kaggle layout (`<split>/<CLASS>/*.jpeg`, or a location
  that is itself `<CLASS>/...`) into records that carry key, label and patient together.
- `split_by_patient` carves a validation split that keeps each patient on one side.
- `decode_image` turns image *file bytes* (JPEG, PNG; any size and mode) into a grayscale square;
  `equalize` then applies the model's contrast normalization (none, or histogram equalization).
- `load_images` fetches and decodes many images in parallel through two caches (the S3 object
  cache, and a cache of decoded, resized pixels checked by a digest), and returns pixels and
  labels in one object, so that no shuffle can separate an image from its label.
- `iter_batches`, `augment_batch` and `to_model_input` turn those pixels into network input, the
  same way at training and at test time.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xraylib import config, storage
from xraylib.errors import DatasetError, ImageDecodeError

# Bump when decoding changes, so decoded-pixel caches made by older code are not reused.
DECODER_VERSION = 1
_DIGEST_SIZE = 16  # bytes of BLAKE2b kept after the pixels of a decoded-cache entry
SPLIT_NAMES = ("train", "test", "val")

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # person1234_bacteria_5678.jpeg
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),  # IM-0001-0001.jpeg, NORMAL2-IM-0001-0001.jpeg
)


def patient_id(filename: str) -> str:
    """The patient an image belongs to, from its file name; an unknown pattern is its own patient."""
    name = filename.rsplit("/", 1)[-1]
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1).upper()
    return name.rsplit(".", 1)[0]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(config.IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ImageRecord:
    obj: storage.ObjectInfo
    label: int  # 0: the NORMAL folder, 1: the other one
    patient: str

    @property
    def name(self) -> str:
        return self.obj.relpath


@dataclass(frozen=True)
class ImageIndex:
    root: str
    class_names: tuple[str, str]  # (negative, positive), as the folders are spelled
    records: tuple[ImageRecord, ...]
    ignored: tuple[str, ...] = ()  # non-image files and files outside a class folder

    def counts(self) -> dict[str, int]:
        counted = Counter(r.label for r in self.records)
        return {name: counted.get(i, 0) for i, name in enumerate(self.class_names)}

    def subset(self, records: Sequence[ImageRecord]) -> ImageIndex:
        return ImageIndex(self.root, self.class_names, tuple(records), self.ignored)

    def __len__(self) -> int:
        return len(self.records)

    def describe(self) -> str:
        counts = ", ".join(f"{n} {name}" for name, n in self.counts().items())
        extra = f"; ignored {len(self.ignored)} non-image file(s)" if self.ignored else ""
        return f"{len(self.records)} images in {self.root} ({counts}){extra}"


def class_roles(folders: Sequence[str], where: str) -> tuple[str, str]:
    """(negative, positive) folder names: NORMAL in any case is negative, the other positive."""
    folders = sorted(set(folders))
    if len(folders) != 2:
        found = ", ".join(folders) if folders else "none"
        raise DatasetError(
            f"expected two class folders (NORMAL and PNEUMONIA) in {where}, found {len(folders)}: {found}; "
            "lay the images out as <CLASS>/<image>.jpeg"
        )
    normal = [f for f in folders if f.lower() == "normal"]
    if not normal:
        raise DatasetError(
            f"no NORMAL folder in {where} (found {', '.join(folders)}): the negative class must be named NORMAL"
        )
    if len(normal) == 2:  # on a case-sensitive store, NORMAL/ and normal/ are two folders
        raise DatasetError(
            f"both class folders in {where} are NORMAL ({', '.join(folders)}): merge them into one and "
            "name the other class's folder PNEUMONIA"
        )
    positive = next(f for f in folders if f != normal[0])
    return normal[0], positive


def list_images(location: str, split: str | None = None) -> ImageIndex:
    """Index the images below `location`. With `split` ('train', 'test'), a dataset root is read
    from its `<split>/` folder; a location that is itself `<CLASS>/...` is read as it is."""
    objects = storage.list_objects(location)
    root = location
    if not objects:
        raise DatasetError(f"no files found in {location}: check the location (and that the upload finished)")
    top = {o.relpath.split("/", 1)[0] for o in objects if "/" in o.relpath}
    splits_here = {t for t in top if t.lower() in SPLIT_NAMES}
    if split is not None and splits_here:
        chosen = [t for t in splits_here if t.lower() == split.lower()]
        if not chosen:
            raise DatasetError(
                f"no {split}/ folder in {location} (found {', '.join(sorted(splits_here))}): "
                f"point at the dataset root that holds {split}/, or at a folder of class folders"
            )
        prefix = chosen[0] + "/"
        root = storage.join(location, chosen[0])
        objects = [
            storage.ObjectInfo(o.location, o.relpath[len(prefix):], o.size, o.version)
            for o in objects
            if o.relpath.startswith(prefix)
        ]
    elif splits_here and splits_here == top:
        raise DatasetError(
            f"{location} holds the splits {', '.join(sorted(splits_here))}: say which one to read, "
            "or point at one of them"
        )

    ignored = [o.relpath for o in objects if not is_image_name(o.relpath) or "/" not in o.relpath]
    images = [o for o in objects if is_image_name(o.relpath) and "/" in o.relpath]
    if not images:
        loose = sum(1 for o in objects if is_image_name(o.relpath))
        fix = (f"it holds {loose} image(s) outside class folders: point at the folder that holds NORMAL/ and "
               "PNEUMONIA/ (to classify unlabelled images, use predict)") if loose else "check the location"
        raise DatasetError(f"no images (.jpeg, .jpg, .png) in class folders below {root}; {fix}")
    negative, positive = class_roles([o.relpath.split("/", 1)[0] for o in images], root)
    records = tuple(
        ImageRecord(obj=o, label=0 if o.relpath.split("/", 1)[0] == negative else 1, patient=patient_id(o.relpath))
        for o in images
    )
    return ImageIndex(root, (negative, positive), records, tuple(ignored))


def find_images(locations: Sequence[str]) -> tuple[list[str], list[str]]:
    """The images that `locations` name, unlabelled, for classifying: a file or object named like an
    image stands for itself, a folder or prefix for every image below it, in path order. Returns
    those images and the non-image files passed over below the folders."""
    images: list[str] = []
    ignored: list[str] = []
    for location in locations:
        if is_image_name(location):
            images.append(location)  # named by the user: read it without a listing
            continue
        objects = storage.list_objects(location)
        if [o.location for o in objects] == [location]:
            images.append(location)  # a single file without an image suffix: the decoder will judge it
            continue
        below = [o.location for o in objects if is_image_name(o.relpath)]
        if not below:
            raise DatasetError(f"no images (.jpeg, .jpg, .png) in {location}: check the location")
        images.extend(below)
        ignored.extend(o.location for o in objects if not is_image_name(o.relpath))
    return images, ignored


def split_by_patient(index: ImageIndex, val_fraction: float, seed: int) -> tuple[ImageIndex, ImageIndex]:
    """(train, validation): each patient's images all on one side, about `val_fraction` of each
    class's images in validation, the same split for the same seed."""
    rng = random.Random(seed)
    by_patient: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in index.records:
        by_patient[record.patient].append(record)
    val: list[ImageRecord] = []
    train: list[ImageRecord] = []
    for label in (0, 1):
        patients = sorted(p for p, recs in by_patient.items() if Counter(r.label for r in recs).most_common(1)[0][0] == label)
        rng.shuffle(patients)
        total = sum(len(by_patient[p]) for p in patients)
        target = round(total * val_fraction)
        taken = 0
        for p in patients:
            side = val if taken < target else train
            side.extend(by_patient[p])
            taken += len(by_patient[p]) if side is val else 0
    if not val or not train or len({r.label for r in val}) < 2:
        raise DatasetError(
            f"{index.root} is too small for a validation split by patient ({len(index)} images, "
            f"{len(by_patient)} patients): add images or raise the validation fraction"
        )
    key = lambda r: r.obj.relpath  # noqa: E731
    return index.subset(sorted(train, key=key)), index.subset(sorted(val, key=key))


def _to_grayscale(im: Any) -> np.ndarray:
    """Any PIL mode to 8-bit gray. High-bit-depth images are stretched by their own maximum,
    since 16-bit radiographs store 10 to 16 significant bits."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        top = float(arr.max())
        arr = arr * (255.0 / top) if top > 255 else arr
        return np.clip(arr, 0, 255).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("L"))


def decode_image(data: bytes, image_size: int, name: str) -> np.ndarray:
    """File bytes (JPEG, PNG, ...) to an `image_size` x `image_size` uint8 grayscale array.

    Raises ImageDecodeError naming `name` for anything that is not a whole, sane image."""
    from PIL import Image, ImageOps

    too_big = "it is corrupt or a decompression bomb; remove it (or pass --skip-bad)"
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        if width * height > config.MAX_IMAGE_PIXELS:
            raise ImageDecodeError(
                f"{name} claims {width}x{height} pixels, over the limit of {config.MAX_IMAGE_PIXELS:,}: {too_big}"
            )
        if im.format == "JPEG" and im.mode in ("L", "RGB"):
            im.draft("L", (image_size, image_size))  # decode at reduced scale: much faster
        im.load()
        im = ImageOps.exif_transpose(im)
        gray = Image.fromarray(_to_grayscale(im))
        return np.asarray(gray.resize((image_size, image_size), Image.Resampling.BILINEAR))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard fires in open() for the largest claims
        raise ImageDecodeError(f"{name} is too large to decode safely ({exc}): {too_big}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            f"cannot decode image {name}: its bytes are not an image format PIL reads (JPEG, PNG); "
            "replace or remove it (or pass --skip-bad to skip bad images)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            f"cannot decode image {name}: {exc}; replace or remove it (or pass --skip-bad to skip bad images)"
        ) from None


def equalize(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Contrast normalization of one uint8 image: 'none', or 'histogram' (global histogram
    equalization). Equalizing maps every monotonic change of the intensity curve (exposure,
    gamma, contrast, a detector's response) to the same image, so the model cannot learn one
    scanner's grey levels as a cue."""
    if mode == "none":
        return pixels
    if mode != "histogram":
        raise ValueError(f"unknown equalize mode {mode!r}: choose one of {', '.join(config.EQUALIZE_MODES)}")
    cdf = np.bincount(pixels.ravel(), minlength=256).cumsum()
    low, total = cdf[np.flatnonzero(cdf)[0]], cdf[-1]
    if total == low:  # a flat image: nothing to spread
        return pixels
    lut = np.clip(np.round((cdf - low) * 255.0 / (total - low)), 0, 255).astype(np.uint8)
    return lut[pixels]


@dataclass
class LoadedImages:
    """Decoded pixels with their labels and records, index-aligned: row i of each belongs together."""

    pixels: Any  # torch.uint8 tensor [N, H, W]
    labels: Any  # torch.int64 tensor [N]
    records: tuple[ImageRecord, ...]
    class_names: tuple[str, str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def __len__(self) -> int:
        return len(self.records)


def _decoded_cache_path(obj: storage.ObjectInfo, image_size: int, cache_dir: Path) -> Path:
    tag = f"{obj.location}|{obj.version}|{image_size}|{DECODER_VERSION}"
    digest = hashlib.sha256(tag.encode("utf-8")).hexdigest()
    return cache_dir / f"decoded-{image_size}" / digest[:2] / digest


def _pixels_digest(pixels: bytes) -> bytes:
    return hashlib.blake2b(pixels, digest_size=_DIGEST_SIZE).digest()


def _load_one(record: ImageRecord, image_size: int, cache_dir: Path) -> np.ndarray:
    cached = _decoded_cache_path(record.obj, image_size, cache_dir)
    n = image_size * image_size
    if cached.exists():
        # An entry is the pixels and a digest of them: one damaged on disk since it was written,
        # even with its size intact, is decoded again instead of served for ever.
        data = cached.read_bytes()
        if len(data) == n + _DIGEST_SIZE and _pixels_digest(data[:n]) == data[n:]:
            return np.frombuffer(data, dtype=np.uint8, count=n).reshape(image_size, image_size)
    raw = storage.fetch(record.obj, cache_dir).read_bytes()
    pixels = decode_image(raw, image_size, record.obj.location)
    storage.write_cache_file(cached, pixels.tobytes() + _pixels_digest(pixels.tobytes()))
    return pixels


def decode_each(
    load: Callable[[Any], np.ndarray], items: Sequence[Any], *, skip_bad: bool, progress: str | None = None
) -> tuple[list[tuple[Any, np.ndarray]], list[tuple[Any, str]]]:
    """`load` every item on the thread pool: (item, pixels) for those decoded, (item, reason) for
    those skipped. A bad image raises its ImageDecodeError, unless `skip_bad` sets it aside."""

    def attempt(item: Any) -> np.ndarray | str:
        try:
            return load(item)
        except ImageDecodeError as exc:
            if skip_bad:
                return str(exc)
            raise

    results = storage.parallel_map(attempt, items, progress=progress)
    kept = [(item, px) for item, px in zip(items, results, strict=True) if not isinstance(px, str)]
    skipped = [(item, px) for item, px in zip(items, results, strict=True) if isinstance(px, str)]
    return kept, skipped


def load_images(
    index: ImageIndex,
    image_size: int,
    *,
    equalize_mode: str = "none",
    skip_bad: bool = False,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> LoadedImages:
    """Fetch and decode every image of `index`, then `equalize` it with `equalize_mode`. A bad
    image raises ImageDecodeError naming it, unless `skip_bad`, which leaves it out and lists it
    in `skipped`."""
    import torch

    cache_dir = cache_dir or config.default_cache_dir()
    kept, bad = decode_each(lambda record: equalize(_load_one(record, image_size, cache_dir), equalize_mode),
                            index.records, skip_bad=skip_bad, progress="loading images" if progress else None)
    skipped = [(r.obj.location, reason) for r, reason in bad]
    if not kept:
        raise DatasetError(f"none of the {len(index)} images in {index.root} could be decoded")
    pixels = torch.from_numpy(np.stack([px for _, px in kept]))
    labels = torch.tensor([r.label for r, _ in kept], dtype=torch.int64)
    return LoadedImages(pixels, labels, tuple(r for r, _ in kept), index.class_names, skipped)


def iter_batches(
    data: LoadedImages, batch_size: int, *, shuffle: bool, generator: Any = None
) -> Iterator[tuple[Any, Any, Any]]:
    """(pixels, labels, row indices) batches; one permutation indexes both pixels and labels."""
    import torch

    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        yield data.pixels[rows], data.labels[rows], rows


def to_model_input(pixels: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 [B, H, W] (or float [B, 1, H, W] in 0..1) to normalized float [B, 3, H, W]."""
    import torch

    x = pixels.unsqueeze(1).float().div_(255.0) if pixels.dtype == torch.uint8 else pixels
    x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def augment_batch(pixels: Any, generator: Any = None, level: str = "acquisition") -> Any:
    """Random changes of the kind radiographs vary by; no flips (the heart is on the left).

    - 'geometry': small rotations, shifts and zoom, and contrast and brightness.
    - 'acquisition': what another detector, protocol or technician changes: framing (zoom from
      0.8 to 1.25, wider shifts, and for half the images a black surround where the film ends
      instead of its edge repeated, and a dark frame), gamma, softness (Gaussian blur) and
      detector noise. Framing matters most: in the training images NORMAL films have far more
      black border than PNEUMONIA ones (40% of their edge pixels against 21%), and a model trained
      with 'geometry' calls a pneumonia film with a black frame normal and a tightly cropped normal
      film pneumonia (benchmarks/bench_shift.py). NORMAL films are also sharper (sharpness alone
      separates the classes with ROC AUC 0.88): blur and noise break that link.

    uint8 [B, H, W] in, float [B, 1, H, W] in 0..1 out, on the pixels' device; the random draws
    come from `generator` (a CPU one), so a seed gives the same views anywhere."""
    import torch

    if level not in config.AUGMENT_LEVELS or level == "none":
        raise ValueError(f"unknown augmentation level {level!r}: choose one of {', '.join(config.AUGMENT_LEVELS[1:])}")
    b = pixels.shape[0]

    def uniform(lo: float, hi: float) -> Any:
        return (torch.rand(b, generator=generator) * (hi - lo) + lo).to(pixels.device)

    def chance(p: float) -> Any:
        return (torch.rand(b, generator=generator) < p).to(pixels.device)

    def sometimes(p: float, lo: float, hi: float) -> Any:
        """For a share `p` of the images a value in [lo, hi), for the rest 0 (the change left out)."""
        return uniform(lo, hi) * chance(p)

    if level == "geometry":
        x = affine_batch(pixels, angle=uniform(-10, 10), scale=uniform(0.9, 1.1), shift_x=uniform(-0.06, 0.06),
                         shift_y=uniform(-0.06, 0.06))
    else:
        framing = {"angle": uniform(-10, 10), "scale": torch.exp(uniform(math.log(0.8), math.log(1.25))),
                   "shift_x": uniform(-0.08, 0.08), "shift_y": uniform(-0.08, 0.08)}
        edge = affine_batch(pixels, **framing)
        black = affine_batch(pixels, **framing, fill="zeros")
        x = torch.where(chance(0.5).view(b, 1, 1, 1), black, edge)
    if level == "acquisition":
        gamma = torch.exp(uniform(-0.25, 0.25)).view(b, 1, 1, 1)  # 0.78..1.28
        x = x.clamp(min=1e-6).pow(gamma)
        x = _blur_batch(x, sometimes(0.5, 0.2, 1.2))
    contrast = uniform(0.85, 1.15).view(b, 1, 1, 1)
    brightness = uniform(-0.08, 0.08).view(b, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    if level == "acquisition":
        sigma = sometimes(0.5, 0.0, 0.03).view(b, 1, 1, 1)
        x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        x = _dark_frame(x, sometimes(0.2, 0.0, 0.06))
    return x.clamp_(0, 1)


def _blur_batch(x: Any, sigma: Any) -> Any:
    """Gaussian blur of each image [B, 1, H, W] with its own `sigma` in pixels (0 leaves it as it is)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.dtype).clamp(min=1e-3).view(b, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, 7]; sigma 0 gives a single 1 in the middle
    flat = x.reshape(1, b, *x.shape[2:])
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel.view(b, 1, 1, -1), groups=b)
    flat = F.conv2d(flat, kernel.view(b, 1, -1, 1), groups=b)
    return flat.reshape(x.shape)


def _dark_frame(x: Any, fraction: Any) -> Any:
    """A black border of `fraction` of the side around each image (0: none)."""
    import torch

    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    edge_h = (fraction * h).view(-1, 1, 1)
    edge_w = (fraction * w).view(-1, 1, 1)
    inside = (rows >= edge_h) & (rows < h - edge_h) & (cols >= edge_w) & (cols < w - edge_w)
    return x * inside.unsqueeze(1).to(x.dtype)


def affine_batch(pixels: Any, *, angle: Any, scale: Any, shift_x: Any, shift_y: Any, fill: str = "border") -> Any:
    """Rotate (degrees), zoom and shift (fractions of the side) each image; numbers or one per image.
    uint8 [B, H, W] in, float [B, 1, H, W] in 0..1 out; what comes into view beyond the edges is the
    edge extended ('border') or black ('zeros', as around a film)."""
    import torch
    import torch.nn.functional as F

    x = pixels.unsqueeze(1).float().div_(255.0)
    b = x.shape[0]

    def per_image(value: Any) -> Any:
        return torch.as_tensor(value, dtype=torch.float32, device=x.device).expand(b)

    radians = per_image(angle) * (math.pi / 180)
    cos, sin = torch.cos(radians) / per_image(scale), torch.sin(radians) / per_image(scale)
    theta = torch.stack([torch.stack([cos, -sin, per_image(shift_x)], 1), torch.stack([sin, cos, per_image(shift_y)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=fill, align_corners=False)


def report_skipped(skipped: list[tuple[str, str]], log: Callable[[str], None] = print) -> None:
    if skipped:
        log(f"skipped {len(skipped)} bad image(s):")
        for _name, reason in skipped:
            log(f"  {reason}")


__all__ = [
    "ImageIndex",
    "ImageRecord",
    "LoadedImages",
    "affine_batch",
    "augment_batch",
    "decode_image",
    "equalize",
    "find_images",
    "iter_batches",
    "list_images",
    "load_images",
    "patient_id",
    "split_by_patient",
    "to_model_input",
]
