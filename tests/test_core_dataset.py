"""Indexing, labels, patients, decoding and batching."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from xraylib import dataset, storage
from xraylib.errors import DatasetError, ImageDecodeError
from xraylib.synthetic import chest_image, encode


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _encode(im: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    return buffer.getvalue()


def test_jpeg_bytes_are_decoded_as_an_image_not_read_as_pixels():
    # The prototype reshaped the compressed bytes into pixels. A decoded gradient must come back.
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    decoded = dataset.decode_image(encode(gradient, "L", "JPEG"), 64, "gradient.jpeg").astype(int)
    assert np.abs(decoded - gradient.astype(int)).mean() < 3
    assert decoded[:, :8].mean() < 20 and decoded[:, -8:].mean() > 235


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "JPEG"), ("RGB", "JPEG"), ("CMYK", "JPEG"),
     ("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("P", "PNG"), ("LA", "PNG")],
)
def test_every_mode_decodes_to_the_same_grayscale(mode, fmt):
    gray = chest_image(np.random.default_rng(0), True, 90, 120)
    gray[0, 0] = 255  # full range, so a 16-bit image's own maximum is white
    if mode == "I;16":
        im = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode in ("RGBA", "LA"):
        im = Image.fromarray(gray).convert(mode)
        im.putalpha(255)
    else:
        im = Image.fromarray(gray).convert(mode)
    decoded = dataset.decode_image(_encode(im, fmt), 48, f"x.{fmt.lower()}")
    reference = np.asarray(Image.fromarray(gray).resize((48, 48), Image.Resampling.BILINEAR)).astype(int)
    assert decoded.shape == (48, 48) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - reference).mean() < 6, mode


def test_any_size_is_resized_to_the_square_asked_for():
    for h, w in [(30, 500), (1500, 900), (224, 224)]:
        data = encode(np.full((h, w), 128, np.uint8))
        assert dataset.decode_image(data, 64, "x.jpeg").shape == (64, 64)


def test_corrupt_and_truncated_images_name_their_key():
    good = encode(chest_image(np.random.default_rng(0), False, 200, 200))
    with pytest.raises(ImageDecodeError, match=r"s3://bkt/train/NORMAL/cut\.jpeg"):
        dataset.decode_image(good[: len(good) // 2], 64, "s3://bkt/train/NORMAL/cut.jpeg")
    with pytest.raises(ImageDecodeError, match=r"junk\.jpeg: its bytes are not an image format xraylib reads.*--skip-bad"):
        dataset.decode_image(b"this is not an image at all", 64, "junk.jpeg")


def test_decompression_bomb_header_is_refused_before_decoding():
    # A PNG whose header claims 30,000 x 30,000 pixels but whose data is tiny.
    im = Image.new("L", (30_000, 30_000))
    bomb = _encode(im, "PNG")
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageDecodeError, match=r"bomb\.png .*decompression bomb"):
        dataset.decode_image(bomb, 64, "bomb.png")
    # Below PIL's own guard, but over ours (the largest real radiograph has about 9 million pixels).
    with pytest.raises(ImageDecodeError, match=r"big\.png claims 9000x9000 pixels"):
        dataset.decode_image(_encode(Image.new("L", (9000, 9000)), "PNG"), 64, "big.png")


def test_labels_stay_with_their_images_through_shuffling_and_batching(tmp_path):
    # Each image's pixels encode its label: NORMAL images are dark, PNEUMONIA bright.
    for i in range(37):
        _write(tmp_path / "NORMAL" / f"IM-{i:04d}-0001.png", encode(np.full((20, 20), 10, np.uint8), fmt="PNG"))
    for i in range(53):
        _write(tmp_path / "PNEUMONIA" / f"person{i}_virus_{i}.png", encode(np.full((20, 20), 240, np.uint8), fmt="PNG"))
    loaded = dataset.load_images(dataset.list_images(str(tmp_path)), 16)
    generator = torch.Generator().manual_seed(3)
    seen = 0
    for pixels, labels, rows in dataset.iter_batches(loaded, 8, shuffle=True, generator=generator):
        brightness_says = (pixels.float().mean(dim=(1, 2)) > 128).long()
        assert torch.equal(brightness_says, labels)
        assert torch.equal(labels, loaded.labels[rows])
        seen += len(labels)
    assert seen == 90


@pytest.mark.parametrize("level", ["geometry", "acquisition", "collimation"])
def test_augmentation_varies_each_image_a_little_never_flips_and_runs_where_the_pixels_are(level):
    # A bright patch on the left of a dark image, as the heart is on the left of a radiograph.
    pixels = torch.zeros(16, 64, 64, dtype=torch.uint8)
    pixels[:, 24:40, 8:24] = 200
    views = dataset.augment_batch(pixels, torch.Generator().manual_seed(0), level)
    assert views.shape == (16, 1, 64, 64) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 1
    assert len({tuple(v.flatten()[::97].tolist()) for v in views}) == 16  # each image its own draw
    assert torch.equal(views, dataset.augment_batch(pixels, torch.Generator().manual_seed(0), level))  # the seed fixes them
    columns = torch.arange(64, dtype=torch.float32)
    top = views[:, 0].amax(dim=(1, 2), keepdim=True)
    weight = (views[:, 0] - top / 2).clamp(min=0)  # the patch: well above the background and its noise
    centre = (weight.sum(dim=1) * columns).sum(dim=1) / weight.sum(dim=(1, 2))
    assert ((centre > 8) & (centre < 24)).all(), centre  # at x=15.5 before: moved a few pixels, never mirrored to 48.5
    # Every tensor it makes follows the pixels' device (meta here, a GPU in use), none stays on the CPU.
    assert dataset.augment_batch(pixels.to("meta"), torch.Generator().manual_seed(0), level).device.type == "meta"


def test_acquisition_augmentation_makes_sharpness_and_dark_frames_useless_as_a_class_cue():
    # Sharp stripes (a NORMAL film's fine detail): the acquisition level softens some images and
    # roughens others, so a batch's sharpness spreads widely; geometry alone keeps it nearly fixed.
    stripes = ((torch.arange(64) % 4 < 2).to(torch.uint8) * 120 + 60).view(1, 1, 64).expand(64, 64, 64).contiguous()

    def sharpness(views: torch.Tensor) -> torch.Tensor:
        return (views[:, 0, :, 1:] - views[:, 0, :, :-1]).abs().mean(dim=(1, 2))

    plain = sharpness(dataset.augment_batch(stripes, torch.Generator().manual_seed(1), "geometry"))
    varied = sharpness(dataset.augment_batch(stripes, torch.Generator().manual_seed(1), "acquisition"))
    assert varied.min() < 0.5 * plain.median()  # blurred well below any geometry-only view
    assert varied.std() > 2 * plain.std()
    framed = dataset.augment_batch(torch.full((64, 64, 64), 150, dtype=torch.uint8), torch.Generator().manual_seed(2),
                                   "acquisition")
    dark_edges = (framed[:, 0, 0, 32] == 0) & (framed[:, 0, 32, 32] > 0.2)
    assert 3 <= int(dark_edges.sum()) <= 30  # some films get a black frame, most do not
    with pytest.raises(ValueError, match="geometry"):
        dataset.augment_batch(stripes, None, "heavy")


def test_a_cut_side_is_what_a_film_cropped_there_and_squashed_to_the_square_looks_like():
    # Horizontal bands, so that where each row of the film lands is plain to see.
    film = (np.arange(64) * 4 % 256).astype(np.uint8)[:, None].repeat(64, axis=1)
    cut = dataset.affine_batch(torch.from_numpy(film)[None], angle=0.0, scale=1.0, shift_x=0.0, shift_y=0.0,
                               cuts=torch.tensor([[0.0, 0.0, 0.125, 0.0]]))[0, 0].numpy() * 255
    cropped = np.asarray(Image.fromarray(film[8:]).resize((64, 64), Image.BILINEAR), dtype=np.float64)
    # The benchmark's cropped top, made by PIL; the same rows, up to PIL's and grid_sample's edges.
    assert np.abs(cut[2:-2] - cropped[2:-2]).max() < 3
    assert np.abs(cut[2:-2] - film[2:-2]).max() > 20  # and not the film as it was


def test_collimation_cuts_one_side_of_some_films_and_not_of_others():
    # A bright square in the middle: a cut on one side stretches it and moves it away from that side.
    pixels = torch.zeros(256, 64, 64, dtype=torch.uint8)
    pixels[:, 24:40, 24:40] = 200

    def extents(views: torch.Tensor) -> torch.Tensor:
        bright = views[:, 0] > 0.3
        return torch.stack([bright.any(dim=2).sum(dim=1), bright.any(dim=1).sum(dim=1)], 1).float()  # height, width

    def aspect(level: str) -> torch.Tensor:
        h_w = extents(dataset.augment_batch(pixels, torch.Generator().manual_seed(3), level))
        return h_w[:, 0] / h_w[:, 1]

    # Rotations and noise move the extents by a pixel or two; a cut of up to 10% by up to 7.
    assert (aspect("acquisition") - 1).abs().max() < 0.12
    stretched = ((aspect("collimation") - 1).abs() > 0.12).float().mean()
    assert 0.05 < stretched < 0.6, stretched


def test_index_reads_the_train_split_and_ignores_non_images(tiny_dataset):
    index = dataset.list_images(str(tiny_dataset), split="train")
    assert index.class_names == ("NORMAL", "PNEUMONIA")
    assert index.counts() == {"NORMAL": 40, "PNEUMONIA": 40}
    assert index.ignored == ("NORMAL/.DS_Store",)
    assert all(r.label == (0 if r.name.startswith("NORMAL/") else 1) for r in index.records)
    # A folder of class folders works as well.
    assert len(dataset.list_images(str(tiny_dataset / "test"), split="test")) == 40


def test_positive_class_takes_the_folder_spelling_and_normal_any_case(tmp_path):
    img = encode(np.zeros((8, 8), np.uint8))
    _write(tmp_path / "normal" / "IM-0001-0001.jpeg", img)
    _write(tmp_path / "PNUEMONIA" / "person1_bacteria_1.jpeg", img)
    index = dataset.list_images(str(tmp_path))
    assert index.class_names == ("normal", "PNUEMONIA")
    assert {r.name: r.label for r in index.records} == {"normal/IM-0001-0001.jpeg": 0, "PNUEMONIA/person1_bacteria_1.jpeg": 1}


def test_wrong_number_of_classes_is_a_clear_error(tmp_path):
    img = encode(np.zeros((8, 8), np.uint8))
    _write(tmp_path / "one" / "NORMAL" / "a.jpeg", img)
    with pytest.raises(DatasetError, match="found 1: NORMAL"):
        dataset.list_images(str(tmp_path / "one"))
    for cls in ("NORMAL", "BACTERIA", "VIRUS"):
        _write(tmp_path / "three" / cls / "a.jpeg", img)
    with pytest.raises(DatasetError, match="found 3: BACTERIA, NORMAL, VIRUS"):
        dataset.list_images(str(tmp_path / "three"))
    with pytest.raises(DatasetError, match="no train/ folder"):
        _write(tmp_path / "splits" / "test" / "NORMAL" / "a.jpeg", img)
        dataset.list_images(str(tmp_path / "splits"), split="train")
    # Pointed one level too deep, at a class folder: told where to point instead.
    with pytest.raises(DatasetError, match=r"one/NORMAL; it holds 1 image\(s\) outside class folders: point at the "
                                           r"folder that holds NORMAL/ and PNEUMONIA/ \(to classify unlabelled images, "
                                           r"use predict; for labels in a table, pass --labels\)"):
        dataset.list_images(str(tmp_path / "one" / "NORMAL"))


def test_empty_s3_prefix_is_a_clear_error(bucket):
    with pytest.raises(DatasetError, match=rf"no files found in s3://{bucket}/empty"):
        dataset.list_images(f"s3://{bucket}/empty")


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1234_bacteria_5678.jpeg", "PERSON1234"),
        ("PNEUMONIA/person12_virus_39.jpeg", "PERSON12"),
        ("IM-0001-0001.jpeg", "IM-0001"),
        ("NORMAL2-IM-0001-0002.jpeg", "NORMAL2-IM-0001"),
        ("scan.jpeg", "scan"),
    ],
)
def test_patient_id_from_file_names(name, patient):
    assert dataset.patient_id(name) == patient


def test_validation_split_keeps_every_patient_on_one_side(tiny_dataset):
    index = dataset.list_images(str(tiny_dataset), split="train")
    train, val = dataset.split_by_patient(index, 0.25, seed=7)
    assert {r.patient for r in train.records}.isdisjoint({r.patient for r in val.records})
    assert len(train) + len(val) == len(index)
    for label in (0, 1):
        share = sum(r.label == label for r in val.records) / sum(r.label == label for r in index.records)
        assert 0.15 <= share <= 0.35
    again = dataset.split_by_patient(index, 0.25, seed=7)[1]
    assert [r.name for r in again.records] == [r.name for r in val.records]
    other = dataset.split_by_patient(index, 0.25, seed=8)[1]
    assert [r.name for r in other.records] != [r.name for r in val.records]


def test_bad_image_stops_loading_with_its_name_or_is_skipped_and_counted(bucket, tiny_dataset):
    dest = f"s3://{bucket}/data"
    storage.upload_directory(tiny_dataset / "test", dest)
    storage.write_bytes(f"{dest}/NORMAL/IM-9999-0001.jpeg", b"\xff\xd8\xff\xe0 truncated")
    index = dataset.list_images(dest)
    with pytest.raises(ImageDecodeError, match=rf"s3://{bucket}/data/NORMAL/IM-9999-0001\.jpeg"):
        dataset.load_images(index, 32)
    loaded = dataset.load_images(index, 32, skip_bad=True)
    assert len(loaded) == len(index) - 1
    assert [name for name, _ in loaded.skipped] == [f"s3://{bucket}/data/NORMAL/IM-9999-0001.jpeg"]


def test_a_decoded_file_damaged_on_disk_is_decoded_again(tiny_dataset, cache_dir):
    index = dataset.list_images(str(tiny_dataset), split="test")
    first = dataset.load_images(index, 32)
    [decoded] = (cache_dir / "decoded").glob("*.u8")
    assert decoded.stat().st_size == len(index) * 32 * 32
    damaged = bytearray(decoded.read_bytes())  # a disk error or a stray write: the size stays, the pixels change
    for row in range(len(index)):
        damaged[row * 32 * 32:row * 32 * 32 + 64] = bytes(255 - b for b in damaged[row * 32 * 32:row * 32 * 32 + 64])
    decoded.write_bytes(bytes(damaged))
    again = dataset.load_images(index, 32)
    assert torch.equal(again.pixels[:], first.pixels[:])


def test_model_input_is_normalized_three_channel():
    pixels = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    x = dataset.to_model_input(pixels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, 2.0))
