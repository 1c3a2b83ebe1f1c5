"""DICOM images made with pydicom: decoded as a viewer shows them (rescale, window, MONOCHROME1),
in 8, 12 and 16 bits, uncompressed and compressed; found without an extension; and trained and
evaluated on without any patient-identifying tag reaching an output."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xraylib import cli, dataset, dicom, storage, synthetic
from xraylib.errors import ImageDecodeError

EXPLICIT_LE = "1.2.840.10008.1.2.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
SECRET_ID, SECRET_NAME = "SECRET-PID-4711", "Doe^Secretname"


def expected_display(stored: np.ndarray, *, photometric: str, window: tuple[float, float] | None,
                     rescale: tuple[float, float] | None) -> np.ndarray:
    """What DICOM says a viewer shows, written out from the standard (PS3.3 C.11.1 and C.11.2.1.2):
    value = stored * slope + intercept; the LINEAR window maps c - 0.5 -+ (w - 1) / 2 to black and white;
    without a window, the image's own range; MONOCHROME1 shows high values dark."""
    slope, intercept = rescale or (1.0, 0.0)
    value = stored.astype(np.float64) * slope + intercept
    if window is not None:
        c, w = window
        share = np.clip((value - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    else:
        share = (value - value.min()) / (value.max() - value.min())
    shown = np.round(share * 255)
    return (255 - shown if photometric == "MONOCHROME1" else shown).astype(np.int64)


@pytest.mark.parametrize(
    ("bits", "photometric", "window", "rescale", "syntax"),
    [
        (8, "MONOCHROME2", None, None, EXPLICIT_LE),
        (8, "MONOCHROME1", (100, 81), None, RLE_LOSSLESS),
        (12, "MONOCHROME2", (1800, 1200), None, EXPLICIT_LE),
        (12, "MONOCHROME1", None, None, JPEG2000_LOSSLESS),
        (16, "MONOCHROME2", (-200, 30000), (1.0, -1024.0), RLE_LOSSLESS),
        (16, "MONOCHROME1", (30000, 20000), None, EXPLICIT_LE),
        (16, "MONOCHROME2", None, (2.0, 0.0), JPEG2000_LOSSLESS),
    ],
)
def test_dicom_pixels_are_shown_as_a_viewer_shows_them(bits, photometric, window, rescale, syntax):
    rng = np.random.default_rng(bits)
    stored = rng.integers(0, 2**bits, size=(48, 40)).astype(np.uint8 if bits == 8 else np.uint16)
    data = synthetic.encode_dicom(stored, bits_stored=bits, photometric=photometric, window=window, rescale=rescale,
                                  transfer_syntax=syntax)
    shown = dicom.decode_dicom(data, "scan.dcm").astype(np.int64)
    expected = expected_display(stored, photometric=photometric, window=window, rescale=rescale)
    assert shown.shape == (48, 40)
    assert np.abs(shown - expected).max() <= 1  # rounding of the window's ends
    assert (np.abs(shown - expected) == 0).mean() > 0.95
    assert 0 < shown.mean() < 255  # neither all black nor all white: the test images do span a range


def test_a_dicom_is_resized_like_any_image_and_the_preamble_is_optional():
    stored = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    with_preamble = synthetic.encode_dicom(stored, bits_stored=12)
    square = dataset.decode_image(with_preamble, 16, "s3://b/NORMAL/a.dcm")
    assert square.shape == (16, 16) and square.dtype == np.uint8
    assert square[:, 0].mean() < 20 and square[:, -1].mean() > 235  # dark on the left, bright on the right
    # An extensionless file is recognised by its DICM mark; a `.dcm` without a preamble by its name.
    assert np.array_equal(dataset.decode_image(with_preamble, 16, "s3://b/NORMAL/IM0001"), square)
    assert np.array_equal(dataset.decode_image(synthetic.encode_dicom(stored, bits_stored=12, preamble=False), 16, "old.dcm"),
                          square)


def test_an_unsupported_transfer_syntax_is_one_line_naming_it():
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(synthetic.encode_dicom(np.zeros((8, 8), np.uint8))))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder for it
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ImageDecodeError) as caught:
        dataset.decode_image(buffer.getvalue(), 16, "s3://b/x/video.dcm")
    message = str(caught.value)
    assert "\n" not in message
    assert "s3://b/x/video.dcm" in message and "MPEG2 Main Profile / Main Level" in message
    assert "1.2.840.10008.1.2.4.100" in message and "not supported" in message


def write_dicom_dataset(root: Path, per_class: int, seed: int) -> None:
    """`<split>/<NORMAL|PNEUMONIA>/` of DICOMs of generated chest pictures: 12-bit, half of them
    MONOCHROME1 (stored inverted, so they look the same), some RLE-compressed, some without an
    extension; two images per patient, whose ID and name are secrets no output may show."""
    rng = np.random.default_rng(seed)
    patient = 0
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for cls in ("NORMAL", "PNEUMONIA"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                patient += i % 2
                picture = synthetic.chest_image(rng, cls == "PNEUMONIA", 64, 64).astype(np.uint16) * 16
                inverted = i % 2 == 1
                data = synthetic.encode_dicom(4095 - picture if inverted else picture, bits_stored=12,
                                              photometric="MONOCHROME1" if inverted else "MONOCHROME2",
                                              transfer_syntax=RLE_LOSSLESS if i % 3 == 0 else EXPLICIT_LE,
                                              patient_id=f"{SECRET_ID}-{patient}", patient_name=f"{SECRET_NAME}{patient}")
                (folder / (f"img{i:03d}" if i % 4 == 0 else f"img{i:03d}.dcm")).write_bytes(data)
    (root / "train" / "NORMAL" / "LICENSE").write_text("not an image, and no extension either")


def test_dicom_folders_are_listed_with_hashed_patients(tmp_path):
    write_dicom_dataset(tmp_path, per_class=8, seed=0)
    index = dataset.list_images(str(tmp_path), split="train")
    assert len(index) == 16 and index.counts() == {"NORMAL": 8, "PNEUMONIA": 8}
    assert index.ignored == ("NORMAL/LICENSE",)
    assert sum(1 for r in index.records if "." not in r.name) == 4  # the extensionless ones are found by their mark
    patients = {r.patient for r in index.records}
    assert all(p.startswith("p-") and len(p) == 14 for p in patients)
    assert len(patients) < len(index)  # two images of one patient share the key
    assert dicom.patient_key(f"{SECRET_ID}-1") in patients
    loaded = dataset.load_images(index, 32)
    assert loaded.pixels.shape == (16, 32, 32)
    # MONOCHROME1 images were stored inverted: decoded, both kinds are bright lungs on a dark field.
    means = loaded.pixels.numpy().reshape(16, -1).mean(axis=1)
    assert means.max() - means.min() < 40


@pytest.mark.timeout(300)
def test_training_and_evaluation_on_dicoms_in_s3_show_no_patient_tag(tmp_path, bucket, capfd):
    write_dicom_dataset(tmp_path / "dicoms", per_class=24, seed=1)
    data = f"s3://{bucket}/dicoms"
    storage.upload_directory(tmp_path / "dicoms", data)
    assert len(storage.list_objects(data)) == 24 * 2 + 12 * 2  # .dcm, and the extensionless (no LICENSE: not an image)
    out, evaluation = tmp_path / "run", tmp_path / "evaluation"
    assert cli.main(["train", "--data", data, "--out", str(out), "--epochs", "1", "--image-size", "32", "--batch-size", "16",
                     "--weights", "none", "--device", "cpu"]) == 0
    assert cli.main(["evaluate", "--model", str(out), "--data", data, "--out", str(evaluation), "--device", "cpu"]) == 0
    printed = capfd.readouterr()
    assert "24 images" in printed.out
    written = [p for p in [*out.rglob("*"), *evaluation.rglob("*")] if p.is_file()]
    assert {p.name for p in written} >= {"model.pt", "metrics.json", "predictions.csv"}
    for text in [printed.out, printed.err, *(p.read_bytes().decode("latin-1") for p in written)]:
        assert SECRET_ID not in text and "Secretname" not in text
    assert "img" in (evaluation / "predictions.csv").read_text()  # the images are named, by their files


def test_pydicom_is_not_imported_until_a_dicom_is_met():
    code = ("import sys; from xraylib import dataset, labels, evaluate, training; "
            "print('pydicom' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
