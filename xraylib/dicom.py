"""DICOM images: recognising them, turning their pixel data into 8-bit grayscale, and a patient
key that identifies no one.

pydicom (imported on first use) reads the file; its pixel decoders and the pylibjpeg plugins
decode the pixel data. What a radiograph's numbers mean is applied in DICOM's order: the modality
LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI LUT (the window a
radiologist would view it with, or a VOI LUT Sequence), then MONOCHROME1 (where a high value is
dark) is inverted, so that every image reaches the network bright-bone-on-dark-field, as a JPEG
radiograph does.

No tag value that identifies a patient (Patient ID, Patient's Name, ...) ever leaves this module:
`patient_key` gives a one-way hash of the Patient ID, and error messages name the file and its
transfer syntax only.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

from xraylib import config
from xraylib.errors import ImageDecodeError

_PREAMBLE_END = 132  # 128 bytes of preamble, then b"DICM"


def is_dicom(data: bytes, name: str = "") -> bool:
    """Whether `data` (the file's bytes, or at least its first 132) is DICOM: the `DICM` mark after the
    preamble, or a `.dcm` name (some old files were written without the preamble)."""
    return data[128:_PREAMBLE_END] == b"DICM" or name.lower().endswith(".dcm")


def has_no_extension(name: str) -> bool:
    """A file name without a dot (hidden files and `README.txt` have one): DICOM archives often store
    images so, and only the file's first bytes (`is_dicom`) tell whether it is one."""
    return "." not in name.rsplit("/", 1)[-1]


def _read(data: bytes, name: str, **kwargs: Any) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # force: a `.dcm` without its preamble is still read (its first element tells what it is).
        return pydicom.dcmread(io.BytesIO(data), force=True, **kwargs)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ImageDecodeError(f"cannot read DICOM file {name}: {type(exc).__name__}: {first}; "
                               "replace or remove it (or pass --skip-bad to skip bad images)") from None


def patient_key(patient_tag: str) -> str:
    """A stable stand-in for a Patient ID: `p-` and 12 hex digits of its SHA-256. Images of one
    patient share it (which is what the split by patient needs); the ID itself is never kept."""
    return "p-" + hashlib.sha256(patient_tag.strip().encode("utf-8")).hexdigest()[:12]


def read_patient(data: bytes, name: str) -> str | None:
    """`patient_key` of the file's Patient ID tag; None when the tag is absent or empty."""
    ds = _read(data, name, stop_before_pixels=True, specific_tags=["PatientID"])
    value = str(ds.get("PatientID", "") or "").strip()
    return patient_key(value) if value else None


def supported_transfer_syntaxes() -> list[str]:
    """The names of the transfer syntaxes whose pixel data this installation decodes."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS

    return [uid.name for uid in _PIXEL_DATA_DECODERS if get_decoder(uid).is_available]


def _check_decodable(ds: Any, name: str) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = UID(str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))) if meta is not None else UID("1.2.840.10008.1.2")
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageDecodeError(
            f"cannot decode DICOM file {name}: its transfer syntax {uid.name} ({uid}) is not supported "
            "(README: DICOM); convert it to an uncompressed or JPEG/JPEG 2000/RLE syntax, e.g. `gdcmconv --raw`")


def _to_gray(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """The first frame, one channel: a colour image (rare for radiographs) by its luminance."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    if samples > 1:
        pixels = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return pixels


def to_display(ds: Any, pixels: np.ndarray) -> np.ndarray:
    """Stored values to uint8 as a viewer shows them: modality LUT, then the VOI LUT (window) when the
    file has one, scaled over the range that window maps to; without one, over the image's own
    range (radiographs store 10 to 16 significant bits in 16). MONOCHROME1 is inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if ("WindowCenter" in ds and "WindowWidth" in ds) or ds.get("VOILUTSequence"):
        values = apply_voi_lut(values, ds)
        # The window maps every value into one output range; its ends are where the two extremes land.
        low, high = (float(v) for v in apply_voi_lut(np.array([-1e15, 1e15]), ds))
    else:
        low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros(values.shape, np.float64)
    gray = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray
    return gray


def decode_dicom(data: bytes, name: str) -> np.ndarray:
    """DICOM file bytes to a uint8 grayscale array at the file's own size (`to_display`).

    Raises ImageDecodeError naming `name` (and, for pixel data it cannot decode, the transfer syntax)."""
    ds = _read(data, name)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageDecodeError(f"DICOM file {name} holds no image (no Pixel Data): it is not a radiograph; remove it "
                               "(or pass --skip-bad)")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns > config.MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"{name} claims {columns}x{rows} pixels, over the limit of {config.MAX_IMAGE_PIXELS:,}: "
                               "it is corrupt or a decompression bomb; remove it (or pass --skip-bad)")
    _check_decodable(ds, name)
    try:
        pixels = _to_gray(ds.pixel_array, ds)
        return to_display(ds, pixels)
    except ImageDecodeError:
        raise
    except (ValueError, RuntimeError, NotImplementedError, KeyError, AttributeError, TypeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ImageDecodeError(f"cannot decode DICOM file {name}: {type(exc).__name__}: {first}; "
                               "replace or remove it (or pass --skip-bad to skip bad images)") from None


__all__ = ["decode_dicom", "has_no_extension", "is_dicom", "patient_key", "read_patient", "supported_transfer_syntaxes",
           "to_display"]
