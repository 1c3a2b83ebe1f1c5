"""The dataset: which images there are, what they are labelled, how they are decoded and batched.

- `list_images` indexes a location in the Kaggle layout (`<split>/<CLASS>/*.jpeg`, or a location
  that is itself `<CLASS>/...`) into records that carry key, label and patient together (labels
  from a table instead of folders: `labels.py`, which builds the same records).
- `split_by_patient` carves a validation split that keeps each patient on one side.
- `decode_image` turns image *file bytes* (JPEG, PNG, DICOM through `dicom.py`; any size and mode)
  into a grayscale square; `equalize` then applies the model's contrast normalization (none, or
  histogram equalization).
- `load_images` fetches and decodes many images in parallel, through the S3 object cache, into one
  file of decoded pixels in the cache (`DecodedFile`), made once per set of images, size and
  equalization on a machine and opened by every later run and every process; its pixels are read
  from that file a batch at a time (`ImageRows`), so memory does not grow with the images. It returns
  pixels and labels in one object, so that no shuffle can separate an image from its label.
- `iter_batches`, `augment_batch` and `to_model_input` turn those pixels into network input, the
  same way at training and at test time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xraylib import config, storage
from xraylib.errors import DatasetError, ImageDecodeError, LocationError

# Bump when decoding changes, so decoded-pixel files made by older code are not reused.
DECODER_VERSION = 2
_DIGEST_SIZE = 16  # bytes of BLAKE2b kept for each image of a decoded file
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


def dicom_headers(objects: Sequence[storage.ObjectInfo], cache_dir: Path | None = None) -> dict[str, tuple[bool, str | None]]:
    """For each of `objects` that may be DICOM (`.dcm`, or no extension): whether it is DICOM and its
    patient key (`dicom.patient_key` of the Patient ID tag, None without one). They are fetched
    into the object cache, where decoding then finds them."""
    from xraylib import dicom

    candidates = [o for o in objects if o.relpath.lower().endswith(".dcm") or dicom.has_no_extension(o.relpath)]
    if not candidates:
        return {}

    def read(obj: storage.ObjectInfo) -> tuple[bool, str | None]:
        data = storage.fetch(obj, cache_dir or config.default_cache_dir()).read_bytes()
        if not dicom.is_dicom(data, obj.relpath):
            return False, None
        try:
            return True, dicom.read_patient(data, obj.location)
        except ImageDecodeError:
            return True, None  # decoding will say what is wrong with it, or skip it with --skip-bad
    return dict(zip([o.location for o in candidates], storage.parallel_map(read, candidates), strict=True))


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
    class_names: tuple[str, str]  # (negative, positive), as the folders (or the labels table) spell them
    records: tuple[ImageRecord, ...]
    ignored: tuple[str, ...] = ()  # non-image files and files outside a class folder
    # What a labels table left out, counted and named: (what, the rows or images), e.g.
    # ("row(s) name no image", ("00000001_000.png", ...)); see labels.py.
    unmatched: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def counts(self) -> dict[str, int]:
        counted = Counter(r.label for r in self.records)
        return {name: counted.get(i, 0) for i, name in enumerate(self.class_names)}

    def subset(self, records: Sequence[ImageRecord]) -> ImageIndex:
        return ImageIndex(self.root, self.class_names, tuple(records), self.ignored, self.unmatched)

    def unmatched_counts(self) -> dict[str, int]:
        return {what: len(items) for what, items in self.unmatched}

    def __len__(self) -> int:
        return len(self.records)

    def describe(self) -> str:
        counts = ", ".join(f"{n} {name}" for name, n in self.counts().items())
        extra = f"; ignored {len(self.ignored)} non-image file(s)" if self.ignored else ""
        for what, items in self.unmatched:
            if items:
                shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
                extra += f"; {len(items)} {what} ({shown})"
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

    headers = dicom_headers([o for o in objects if "/" in o.relpath])
    is_image = {o.location: "/" in o.relpath and (is_image_name(o.relpath) if o.location not in headers
                                                  else headers[o.location][0]) for o in objects}
    ignored = [o.relpath for o in objects if not is_image[o.location]]
    images = [o for o in objects if is_image[o.location]]
    if not images:
        loose = sum(1 for o in objects if is_image_name(o.relpath))
        fix = (f"it holds {loose} image(s) outside class folders: point at the folder that holds NORMAL/ and "
               "PNEUMONIA/ (to classify unlabelled images, use predict; for labels in a table, pass --labels)"
               ) if loose else "check the location"
        raise DatasetError(f"no images (.jpeg, .jpg, .png, .dcm) in class folders below {root}; {fix}")
    negative, positive = class_roles([o.relpath.split("/", 1)[0] for o in images], root)
    records = tuple(
        ImageRecord(obj=o, label=0 if o.relpath.split("/", 1)[0] == negative else 1,
                    patient=headers.get(o.location, (False, None))[1] or patient_id(o.relpath))
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
        headers = dicom_headers(objects)
        kept = [is_image_name(o.relpath) if o.location not in headers else headers[o.location][0] for o in objects]
        below = [o.location for o, keep in zip(objects, kept, strict=True) if keep]
        if not below:
            raise DatasetError(f"no images (.jpeg, .jpg, .png, .dcm) in {location}: check the location")
        images.extend(below)
        ignored.extend(o.location for o, keep in zip(objects, kept, strict=True) if not keep)
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
    """File bytes (JPEG, PNG, DICOM, ...) to an `image_size` x `image_size` uint8 grayscale array.

    Raises ImageDecodeError naming `name` for anything that is not a whole, sane image."""
    from PIL import Image, ImageOps

    from xraylib import dicom

    if dicom.is_dicom(data, name):
        gray = Image.fromarray(dicom.decode_dicom(data, name))
        return np.asarray(gray.resize((image_size, image_size), Image.Resampling.BILINEAR))
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
            f"cannot decode image {name}: its bytes are not an image format xraylib reads (JPEG, PNG, DICOM); "
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

    # uint8 [N, H, W]: an `ImageRows` over the decoded file in the cache (from `load_images`), or a
    # torch tensor (images made in memory). Indexing either gives a tensor of just those images.
    pixels: Any
    labels: Any  # torch.int64 tensor [N]
    records: tuple[ImageRecord, ...]
    class_names: tuple[str, str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def __len__(self) -> int:
        return len(self.records)


def take_rows(data: LoadedImages, rows: Sequence[int]) -> LoadedImages:
    """The images at `rows` of `data`, in that order, as their own LoadedImages: over a decoded file
    a list of row numbers (no pixel is read or copied), over a tensor a copy of those rows."""
    import torch

    index = torch.as_tensor(list(rows), dtype=torch.int64)
    pixels = data.pixels.take(index) if isinstance(data.pixels, ImageRows) else data.pixels[index]
    return LoadedImages(pixels, data.labels[index], tuple(data.records[i] for i in index.tolist()), data.class_names)


def _pixels_digest(pixels: Any) -> bytes:
    return hashlib.blake2b(pixels, digest_size=_DIGEST_SIZE).digest()


def _decode_object(obj: storage.ObjectInfo, image_size: int, equalize_mode: str, cache_dir: Path) -> np.ndarray:
    raw = storage.fetch(obj, cache_dir).read_bytes()
    return equalize(decode_image(raw, image_size, obj.location), equalize_mode)


# Why one file per set of images, and no file per image any more: a run reads its images a batch at
# a time in a random order from one file, which an OS page cache serves; a file per image doubled
# the disk used (NIH's 112,120 images at 224 px are 5.6 GB of pixels) and cost a file-system lookup
# per image read. The price: another set of images (one image added or changed) is decoded again
# into a file of its own, from the object cache (no S3 request); the old file stays in the cache.
@dataclass(eq=False)
class DecodedFile:
    """The decoded, equalized pixels of a set of objects in one file in the cache: row i, of
    image_size x image_size bytes, is `objects[i]` (sorted by location). Beside it, a BLAKE2b digest
    of each row (`.sums`) and a JSON sidecar, written last, that marks the file complete and lists
    the images that could not be decoded (their rows are zeros and never read)."""

    path: Path
    objects: tuple[storage.ObjectInfo, ...]
    image_size: int
    equalize_mode: str
    cache_dir: Path
    digests: np.ndarray  # uint8 [N, _DIGEST_SIZE]
    skipped: dict[int, str]  # row -> why it could not be decoded
    _fd: int | None = field(default=None, repr=False)
    _fd_pid: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def row_bytes(self) -> int:
        return self.image_size * self.image_size

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None or self._fd_pid != os.getpid():  # a forked child opens its own
                self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
            return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The images at file `rows` (any order, repeats allowed), read with pread, not mapped: pages
        of a mapped file count in the process's resident memory once touched, so an epoch over a
        mapping would grow it by the whole file; pages read stay in the OS cache, shared by every
        process and dropped under pressure. A row whose digest does not match (damaged on disk since)
        is decoded again and rewritten."""
        n = self.row_bytes
        out = np.empty((len(rows), self.image_size, self.image_size), np.uint8)
        fd = self._descriptor()
        flat = out.reshape(len(rows), n)
        start = 0
        while start < len(rows):  # runs of consecutive rows are one read each
            stop = start + 1
            while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                stop += 1
            want = (stop - start) * n
            got = os.preadv(fd, [flat[start:stop]], int(rows[start]) * n)
            if got != want:
                raise DatasetError(f"the decoded-image file {self.path} is shorter than it should be: delete it "
                                   "(it is a cache) and run again")
            start = stop
        for i, row in enumerate(rows.tolist()):
            if _pixels_digest(flat[i]) != self.digests[row].tobytes():
                out[i] = self._repair(row)
        return out

    def _repair(self, row: int) -> np.ndarray:
        pixels = _decode_object(self.objects[row], self.image_size, self.equalize_mode, self.cache_dir)
        with contextlib.suppress(OSError):  # a cache that cannot be written to is read, and repaired each time
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, pixels.tobytes(), row * self.row_bytes)
            finally:
                os.close(fd)
        return pixels

    def __del__(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


class ImageRows:
    """Some rows of a `DecodedFile`, in an order: what `LoadedImages.pixels` is after `load_images`.
    Indexing it (a row, a slice, a list or tensor of rows) reads just those images into a new uint8
    tensor; `take` makes a smaller view without reading. Shape and dtype are a tensor's."""

    def __init__(self, file: DecodedFile, rows: np.ndarray) -> None:
        self.file = file
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.rows), self.file.image_size, self.file.image_size)

    @property
    def dtype(self) -> Any:
        import torch

        return torch.uint8

    def _file_rows(self, key: Any) -> np.ndarray:
        if hasattr(key, "numpy"):  # a tensor of rows
            key = key.cpu().numpy()
        return self.rows[key]

    def __getitem__(self, key: Any) -> Any:
        import torch

        if isinstance(key, int | np.integer):
            return torch.from_numpy(self.file.read(np.array([self.rows[key]]))[0])
        return torch.from_numpy(self.file.read(np.atleast_1d(self._file_rows(key))))

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self), 256):
            yield from self[start:start + 256]

    def take(self, rows: Any) -> ImageRows:
        return ImageRows(self.file, np.atleast_1d(self._file_rows(rows)))

    def numpy(self) -> np.ndarray:
        """Every image, read into memory: for small sets (tests, a notebook's figures)."""
        return self.file.read(self.rows)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.numpy() if dtype is None else self.numpy().astype(dtype)


def _decoded_file_paths(objects: Sequence[storage.ObjectInfo], image_size: int, equalize_mode: str,
                        cache_dir: Path) -> dict[str, Path]:
    digest = hashlib.sha256(f"{image_size}|{equalize_mode}|{DECODER_VERSION}\n".encode())
    for obj in objects:
        digest.update(f"{obj.location}\0{obj.version}\n".encode())
    base = cache_dir / "decoded" / f"{digest.hexdigest()[:40]}-{image_size}px"
    return {kind: base.with_name(base.name + suffix)
            for kind, suffix in (("pixels", ".u8"), ("sums", ".sums"), ("meta", ".json"), ("lock", ".lock"))}


def _open_decoded(paths: dict[str, Path], objects: tuple[storage.ObjectInfo, ...], image_size: int,
                  equalize_mode: str, cache_dir: Path) -> DecodedFile | None:
    """The complete decoded file at `paths`, or None when there is none (or only part of one)."""
    try:
        meta = json.loads(paths["meta"].read_text())
        digests = np.fromfile(paths["sums"], dtype=np.uint8)
        size = paths["pixels"].stat().st_size
    except (OSError, ValueError):
        return None
    n = len(objects)
    if meta.get("rows") != n or size != n * image_size * image_size or digests.size != n * _DIGEST_SIZE:
        return None
    return DecodedFile(paths["pixels"], objects, image_size, equalize_mode, cache_dir, digests.reshape(n, _DIGEST_SIZE),
                       {int(row): reason for row, reason in meta.get("skipped", {}).items()})


def _build_decoded(paths: dict[str, Path], objects: tuple[storage.ObjectInfo, ...], image_size: int, equalize_mode: str,
                   cache_dir: Path, *, skip_bad: bool, progress: str | None) -> None:
    """Decode every object into a temporary file, then rename it (and its digests) into place and
    write the sidecar last. Each image goes straight to its row: nothing is held in memory. A bad
    image stops it at once (its name in the error) unless `skip_bad`."""
    import shutil

    n, row_bytes = len(objects), image_size * image_size
    folder = paths["pixels"].parent
    for stale in folder.glob(f".{paths['pixels'].name}.*.part"):  # left by a build that was killed (we hold the lock)
        stale.unlink(missing_ok=True)
    needed, free = n * row_bytes, shutil.disk_usage(folder).free
    if needed > free:
        raise LocationError(f"the decoded images need {needed / 1e9:.2f} GB in {folder} and only {free / 1e9:.2f} GB are "
                            "free: free some, or set XRAYLIB_CACHE_DIR to a folder on a larger disk")
    tmp = paths["pixels"].with_name(f".{paths['pixels'].name}.{os.getpid()}.part")
    digests = np.zeros((n, _DIGEST_SIZE), np.uint8)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.ftruncate(fd, n * row_bytes)

        bar, counted = None, threading.Lock()
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=progress, unit="item", leave=True)  # as storage.parallel_map's bars

        def decode(row: int) -> str | None:
            try:
                pixels = _decode_object(objects[row], image_size, equalize_mode, cache_dir)
            except ImageDecodeError as exc:
                if skip_bad:
                    return str(exc)
                raise
            os.pwrite(fd, pixels.tobytes(), row * row_bytes)
            digests[row] = np.frombuffer(_pixels_digest(pixels), np.uint8)
            if bar is not None:
                with counted:
                    bar.update(1)
            return None

        # A task per run of rows, not per image: a pending task costs memory (about 2 KB), which for
        # 100,000 images would be what the file saves; runs short enough to keep every worker busy.
        step = max(1, min(256, n // (config.S3_WORKERS * 4)))
        try:
            reasons = [reason for chunk in storage.parallel_map(
                lambda start: [decode(row) for row in range(start, min(start + step, n))], range(0, n, step))
                for reason in chunk]
        finally:
            if bar is not None:
                bar.close()
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise LocationError(f"cannot write the decoded images to {tmp} ({exc.strerror or exc}): check that the disk "
                                "has room, or set XRAYLIB_CACHE_DIR to another folder") from None
        raise
    os.close(fd)
    storage.write_cache_file(paths["sums"], digests.tobytes())
    os.replace(tmp, paths["pixels"])
    skipped = {str(row): reason for row, reason in enumerate(reasons) if reason is not None}
    storage.write_cache_file(paths["meta"], json.dumps({"rows": n, "image_size": image_size, "equalize": equalize_mode,
                                                         "decoder_version": DECODER_VERSION, "skipped": skipped}).encode())


def decoded_file(objects: Sequence[storage.ObjectInfo], image_size: int, *, equalize_mode: str = "none",
                 skip_bad: bool = False, cache_dir: Path | None = None, progress: bool = False) -> DecodedFile:
    """The `DecodedFile` of `objects` at `image_size`, equalized with `equalize_mode`: opened when the
    cache holds it complete, else made. A lock file lets one process make it while any other that
    asks for the same file (a torchrun job's other processes, a second run) waits, then opens it."""
    import fcntl

    cache_dir = cache_dir or config.default_cache_dir()
    ordered = tuple(sorted({o.location: o for o in objects}.values(), key=lambda o: o.location))
    paths = _decoded_file_paths(ordered, image_size, equalize_mode, cache_dir)
    found = _open_decoded(paths, ordered, image_size, equalize_mode, cache_dir)
    if found is not None:
        return found
    try:
        paths["lock"].parent.mkdir(parents=True, exist_ok=True)
        lock = open(paths["lock"], "a+b")  # noqa: SIM115 (held across the build below)
    except OSError as exc:
        raise LocationError(f"cannot write the cache in {paths['lock'].parent}: {exc.strerror or exc}; "
                            "set XRAYLIB_CACHE_DIR to a folder that can be") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            found = _open_decoded(paths, ordered, image_size, equalize_mode, cache_dir)
            if found is None:
                _build_decoded(paths, ordered, image_size, equalize_mode, cache_dir, skip_bad=skip_bad,
                               progress="loading images" if progress else None)
                found = _open_decoded(paths, ordered, image_size, equalize_mode, cache_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if found is None:
        raise LocationError(f"the decoded-image file {paths['pixels']} was written but cannot be read back: "
                            "check the disk, or set XRAYLIB_CACHE_DIR to another folder")
    return found


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
    """Fetch and decode every image of `index` into its `DecodedFile` (or open the one the cache
    holds), `equalize`d with `equalize_mode`; the pixels are read from it as they are indexed. A bad
    image raises ImageDecodeError naming it, unless `skip_bad`, which leaves it out and lists it in
    `skipped`."""
    import torch

    file = decoded_file([r.obj for r in index.records], image_size, equalize_mode=equalize_mode, skip_bad=skip_bad,
                        cache_dir=cache_dir, progress=progress)
    row_of = {obj.location: row for row, obj in enumerate(file.objects)}
    rows = [row_of[r.obj.location] for r in index.records]
    bad = [(r.obj.location, file.skipped[row]) for r, row in zip(index.records, rows, strict=True) if row in file.skipped]
    if bad and not skip_bad:  # found by an earlier run with --skip-bad, recorded with the file
        raise ImageDecodeError(bad[0][1])
    kept = [(r, row) for r, row in zip(index.records, rows, strict=True) if row not in file.skipped]
    if not kept:
        raise DatasetError(f"none of the {len(index)} images in {index.root} could be decoded")
    labels = torch.tensor([r.label for r, _ in kept], dtype=torch.int64)
    return LoadedImages(ImageRows(file, np.array([row for _, row in kept], dtype=np.int64)), labels,
                        tuple(r for r, _ in kept), index.class_names, bad)


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


def augment_batch(pixels: Any, generator: Any = None, level: str = "collimation") -> Any:
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
    - 'collimation' (the default): 'acquisition', and each side of the framed film cut,
      independently, by up to 10% for 30% of the images, then squashed back to the square: a film
      collimated tighter on one side, which every film's squash to a square turns into a stretch
      and a move of the chest. Isotropic zoom and shifts cannot draw that, and the cropped top, a
      vertical stretch with the chest moved up, was the weak spot of the cpu preset trained with
      'acquisition' on the shift benchmark (specificity 0.63; 0.85 with this level).

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

    acquisition = level != "geometry"  # 'acquisition' and 'collimation', which adds cuts to it
    if not acquisition:
        x = affine_batch(pixels, angle=uniform(-10, 10), scale=uniform(0.9, 1.1), shift_x=uniform(-0.06, 0.06),
                         shift_y=uniform(-0.06, 0.06))
    else:
        framing = {"angle": uniform(-10, 10), "scale": torch.exp(uniform(math.log(0.8), math.log(1.25))),
                   "shift_x": uniform(-0.08, 0.08), "shift_y": uniform(-0.08, 0.08)}
        if level == "collimation":
            framing["cuts"] = torch.stack([sometimes(0.3, 0.0, 0.10) for _ in range(4)], 1)
        edge = affine_batch(pixels, **framing)
        black = affine_batch(pixels, **framing, fill="zeros")
        x = torch.where(chance(0.5).view(b, 1, 1, 1), black, edge)
    if acquisition:
        gamma = torch.exp(uniform(-0.25, 0.25)).view(b, 1, 1, 1)  # 0.78..1.28
        x = x.clamp(min=1e-6).pow(gamma)
        x = _blur_batch(x, sometimes(0.5, 0.2, 1.2))
    contrast = uniform(0.85, 1.15).view(b, 1, 1, 1)
    brightness = uniform(-0.08, 0.08).view(b, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    if acquisition:
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


def affine_batch(pixels: Any, *, angle: Any, scale: Any, shift_x: Any, shift_y: Any, cuts: Any = None,
                 fill: str = "border") -> Any:
    """Rotate (degrees), zoom and shift (fractions of the side) each image; numbers or one per image.
    With `cuts` ([B, 4]: left, right, top, bottom, fractions of the side), that much of each side of
    the result is cut off and the rest squashed back to the square, in the same resampling.
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
    if cuts is not None:
        # The kept window, in the grid's [-1, 1] coordinates of the rotated, zoomed and shifted
        # image: output point p samples that image at window_scale * p + window_centre.
        left, right, top, bottom = (cuts[:, i].to(x.device, torch.float32) * 2 for i in range(4))
        window = torch.zeros(b, 3, 3, device=x.device)
        window[:, 0, 0], window[:, 0, 2] = 1 - (left + right) / 2, (left - right) / 2
        window[:, 1, 1], window[:, 1, 2] = 1 - (top + bottom) / 2, (top - bottom) / 2
        window[:, 2, 2] = 1
        theta = theta @ window
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=fill, align_corners=False)


def report_skipped(skipped: list[tuple[str, str]], log: Callable[[str], None] = print) -> None:
    if skipped:
        log(f"skipped {len(skipped)} bad image(s):")
        for _name, reason in skipped:
            log(f"  {reason}")


__all__ = [
    "DecodedFile",
    "ImageIndex",
    "ImageRecord",
    "ImageRows",
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
    "take_rows",
    "to_model_input",
]
