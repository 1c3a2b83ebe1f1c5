"""Generated chest-X-ray-like images in the Kaggle layout, for the demo and the tests.

Not medical data: a dark field with two bright lung fields, ribs and a heart shadow; PNEUMONIA
images add cloudy opacities inside the lungs. A ResNet50 learns to tell them apart in a minute
on a CPU, which is all the demo and the tests need. Sizes, aspect ratios and modes vary as in
the real dataset, and file names follow its patient patterns (several images per patient).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SPLITS = {"train": 1.0, "val": 0.25, "test": 0.5}


def chest_image(rng: np.random.Generator, pneumonia: bool, height: int, width: int) -> np.ndarray:
    """One uint8 grayscale picture."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = yy / height, xx / width
    image = np.full((height, width), 0.12, np.float32)
    for cx in (0.32, 0.68):  # lungs: bright in a radiograph's display convention here
        lung = ((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
        image[lung] = 0.55
    ribs = (np.sin(y * 40 + rng.uniform(0, 6)) > 0.6) & (np.abs(x - 0.5) > 0.08)
    image[ribs] += 0.08
    heart = ((x - 0.55) / 0.12) ** 2 + ((y - 0.62) / 0.14) ** 2 < 1
    image[heart] = 0.3
    if pneumonia:
        for _ in range(int(rng.integers(2, 5))):
            cx = rng.choice([0.32, 0.68]) + rng.uniform(-0.08, 0.08)
            cy, r = rng.uniform(0.35, 0.7), rng.uniform(0.06, 0.12)
            blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2)))
            image -= 0.35 * blob  # consolidation: denser, darker lung field
    image += rng.normal(0, 0.04, image.shape).astype(np.float32)
    image *= rng.uniform(0.85, 1.15)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def encode(pixels: np.ndarray, mode: str = "L", fmt: str = "JPEG") -> bytes:
    from PIL import Image

    im = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def file_names(cls: str, count: int, rng: np.random.Generator, start: int) -> list[str]:
    """Kaggle-style names: about two images per patient."""
    names = []
    patient = start
    while len(names) < count:
        for series in range(1, int(rng.integers(1, 4)) + 1):
            if cls == "NORMAL":
                names.append(f"IM-{patient:04d}-{series:04d}.jpeg")
            else:
                kind = "bacteria" if rng.random() < 0.65 else "virus"
                names.append(f"person{patient}_{kind}_{len(names) + 1}.jpeg")
        patient += 1
    return names[:count]


def generate_dataset(root: str | Path, images_per_class: int = 60, *, min_side: int = 96, max_side: int = 160,
                     seed: int = 0) -> dict[str, dict[str, int]]:
    """Write `<split>/<NORMAL|PNEUMONIA>/*.jpeg` under `root`; train gets `images_per_class`
    per class, val and test fewer. Returns the counts written."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    counts: dict[str, dict[str, int]] = {}
    patient_start = 1
    for split, share in SPLITS.items():
        counts[split] = {}
        for cls in ("NORMAL", "PNEUMONIA"):
            n = max(4, round(images_per_class * share))
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for name in file_names(cls, n, rng, patient_start):
                height = int(rng.integers(min_side, max_side + 1))
                width = int(height * rng.uniform(0.8, 1.25))
                mode = "RGB" if rng.random() < 0.1 else "L"  # a few RGB files, as in the real data
                (folder / name).write_bytes(encode(chest_image(rng, cls != "NORMAL", height, width), mode))
            counts[split][cls] = n
            patient_start += n * 3  # patients never repeat across splits or classes
    return counts


def encode_dicom(stored: np.ndarray, *, bits_stored: int = 8, photometric: str = "MONOCHROME2",
                 window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None,
                 transfer_syntax: str = "1.2.840.10008.1.2.1", patient_id: str = "", patient_name: str = "",
                 preamble: bool = True) -> bytes:
    """A DICOM file (a digital X-ray, for presentation) holding `stored`, the stored values (uint8 or
    uint16): `bits_stored` significant bits, an optional (center, width) window and (slope,
    intercept) rescale, pixel data in `transfer_syntax` (compressed ones through pydicom's encoders:
    RLE Lossless natively, JPEG 2000 Lossless with pylibjpeg-openjpeg)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    sop_class = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID, ds.PatientName = patient_id, patient_name
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if stored.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = stored.tobytes()
    if UID(transfer_syntax) != ExplicitVRLittleEndian:
        ds.compress(UID(transfer_syntax), stored)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data if preamble else data[128 + 4:]
