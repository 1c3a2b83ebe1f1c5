"""Labels from a table, over generated images in the loopback S3 server: NIH ChestX-ray14's and RSNA's
own files read without flags, a custom table with flags and a split column, and what they leave out
counted. Then the decoded-image file those runs read from: made once, reused, never a full copy."""

from __future__ import annotations

import csv
import io
import threading

import numpy as np
import pytest

from tests.s3proxy import S3Proxy
from xraylib import cli, dataset, labels, storage, synthetic
from xraylib.errors import ConfigError, DatasetError
from xraylib.evaluate import evaluate_model
from xraylib.training import load_data


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A counting proxy in front of the S3 server; boto3 goes through it for this test."""
    with S3Proxy(s3_server.endpoint_url) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def png(rng: np.random.Generator, pneumonia: bool) -> bytes:
    return synthetic.encode(synthetic.chest_image(rng, pneumonia, 48, 48), fmt="PNG")


NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
NIH_FINDINGS = ["No Finding", "Pneumonia", "Infiltration|Pneumonia", "Effusion", "Atelectasis|Effusion", "Pneumonia|Mass"]


@pytest.fixture
def nih(bucket):
    """NIH ChestX-ray14's layout: PNGs in images_001/images/ and images_002/images/, named in the table
    by file name alone; patients numbered in their own column (not the file names' prefix here)."""
    rng = np.random.default_rng(0)
    root = f"s3://{bucket}/nih"
    rows, expected = [], {}
    for i in range(36):
        name = f"{i:08d}_000.png"
        finding = NIH_FINDINGS[i % len(NIH_FINDINGS)]
        folder = "images_001" if i < 18 else "images_002"
        storage.write_bytes(f"{root}/{folder}/images/{name}", png(rng, "Pneumonia" in finding))
        rows.append([name, finding, "0", str(500 + i // 3), "50", "M", "PA"])
        expected[f"{folder}/images/{name}"] = ("Pneumonia" in finding.split("|"), str(500 + i // 3))
    for i in range(3):  # images with no row
        storage.write_bytes(f"{root}/images_002/images/{90000 + i:08d}_000.png", png(rng, False))
    for folder in ("images_001", "images_002"):  # one file name twice: the row naming it is ambiguous
        storage.write_bytes(f"{root}/{folder}/images/twice.png", png(rng, False))
    rows += [["twice.png", "No Finding", "0", "900", "40", "F", "PA"],
             ["77777777_000.png", "Pneumonia", "0", "901", "40", "F", "PA"],  # rows with no image
             ["77777778_000.png", "No Finding", "0", "902", "40", "F", "PA"],
             ["00000001_000.png", "", "0", "501", "40", "F", "PA"]]  # an empty label
    storage.write_text(f"{root}/Data_Entry_2017.csv", csv_text(NIH_HEADER, rows))
    storage.write_text(f"{root}/README_CHESTXRAY.pdf", "not an image")
    return root, expected


def test_an_nih_table_is_read_without_flags(nih):
    root, expected = nih
    index = labels.index_images(root, split="train", labels=labels.label_table(f"{root}/Data_Entry_2017.csv"))
    assert {r.name: (bool(r.label), r.patient) for r in index.records} == expected
    assert index.class_names == ("NO PNEUMONIA", "PNEUMONIA")
    assert index.counts() == {"NO PNEUMONIA": 18, "PNEUMONIA": 18}
    assert index.unmatched_counts() == {labels.ROWS_WITHOUT_IMAGE: 2, labels.AMBIGUOUS_ROWS: 1,
                                        labels.ROWS_WITHOUT_LABEL: 1, labels.IMAGES_WITHOUT_ROW: 5}
    assert index.ignored == ("README_CHESTXRAY.pdf",)
    described = index.describe()
    for part in ("36 images", "2 row(s) name no image", "77777777_000.png", "1 row(s) name a file name that several",
                 "twice.png (2 files)", "1 row(s) have an empty label", "5 image(s) have no row", "ignored 1 non-image"):
        assert part in described, described
    # The patient column drives the split: no patient on both sides, although each file name is its own.
    train, val = dataset.split_by_patient(index, 0.3, seed=0)
    assert {r.patient for r in train.records}.isdisjoint({r.patient for r in val.records})
    assert len({r.patient for r in index.records}) == 12


def rsna_dicom(rng: np.random.Generator, pneumonia: bool, patient: str) -> bytes:
    picture = synthetic.chest_image(rng, pneumonia, 48, 48).astype(np.uint16) * 16
    return synthetic.encode_dicom(picture, bits_stored=12, patient_id=patient, transfer_syntax="1.2.840.10008.1.2.5")


def test_an_rsna_table_with_several_rows_per_image_is_read_without_flags(bucket):
    rng = np.random.default_rng(1)
    root = f"s3://{bucket}/rsna"
    rows, expected = [], {}
    for i in range(12):
        patient = f"{i:04x}-uuid-{i}"
        pneumonia = i % 3 == 0
        storage.write_bytes(f"{root}/stage_2_train_images/{patient}.dcm", rsna_dicom(rng, pneumonia, patient))
        boxes = [["264", "152", "213", "379"], ["562", "152", "256", "453"]] if pneumonia else [["", "", "", ""]]
        rows += [[patient, *box, str(int(pneumonia))] for box in boxes]
        expected[f"stage_2_train_images/{patient}.dcm"] = (int(pneumonia), patient)
    storage.write_bytes(f"{root}/stage_2_train_images/extra-uuid.dcm", rsna_dicom(rng, False, "extra"))
    rows.append(["missing-uuid", "", "", "", "", "0"])
    storage.write_text(f"{root}/stage_2_train_labels.csv", csv_text(["patientId", "x", "y", "width", "height", "Target"], rows))

    index = labels.index_images(root, labels=labels.label_table(f"{root}/stage_2_train_labels.csv"))
    assert {r.name: (r.label, r.patient) for r in index.records} == expected  # one record per image, not per box
    assert index.counts() == {"NO PNEUMONIA": 8, "PNEUMONIA": 4}
    assert index.unmatched_counts() == {labels.ROWS_WITHOUT_IMAGE: 1, labels.IMAGES_WITHOUT_ROW: 1}
    loaded = dataset.load_images(index, 32)
    assert loaded.pixels.shape == (12, 32, 32) and loaded.labels.tolist() == [r.label for r in index.records]


def test_a_table_with_other_columns_needs_flags_and_says_which(tmp_path):
    (tmp_path / "a.png").write_bytes(png(np.random.default_rng(0), False))
    (tmp_path / "t.csv").write_text(csv_text(["file", "finding"], [["a.png", "x"]]))
    with pytest.raises(DatasetError, match=r"t\.csv matches no known layout .*pass --image-column .*'file', 'finding'"):
        labels.index_images(str(tmp_path), labels=labels.label_table(str(tmp_path / "t.csv")))
    with pytest.raises(DatasetError, match=r"pass --positive TEXT"):
        labels.index_images(str(tmp_path), labels=labels.label_table(str(tmp_path / "t.csv"), image_column="file",
                                                                     label_column="finding"))
    with pytest.raises(DatasetError, match=r"no column 'subject' \(--patient-column\)"):
        labels.index_images(str(tmp_path), labels=labels.label_table(str(tmp_path / "t.csv"), image_column="file",
                                                                     label_column="finding", positive="x",
                                                                     patient_column="subject"))
    with pytest.raises(ConfigError, match=r"--positive describe\(s\) a labels table: pass --labels"):
        labels.label_table(None, positive="x")


def custom_table(root: str, rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    """Images in one folder, named with their extension stripped; a finding column, a subject column
    and a fold column marking a third of the subjects test."""
    rows, test_labels = [], {}
    for i in range(72):
        positive = i % 2 == 1
        subject, fold = f"s{i // 2}", "test" if (i // 2) % 3 == 0 else "train"
        storage.write_bytes(f"{root}/scans/scan{i:03d}.png", png(rng, positive))
        rows.append([f"scans/scan{i:03d}", "consolidation" if positive else "clear", subject, fold])
        if fold == "test":
            test_labels[f"scan{i:03d}.png"] = int(positive)
    table = f"{root}/folds.csv"
    storage.write_text(table, csv_text(["path", "finding", "subject", "fold"], rows))
    return table, test_labels


@pytest.mark.timeout(300)
def test_training_and_evaluation_from_a_table_with_a_split_column(bucket, tmp_path, capsys):
    root = f"s3://{bucket}/custom"
    table, test_labels = custom_table(root, np.random.default_rng(2))
    flags = ["--labels", table, "--image-column", "path", "--label-column", "finding", "--positive", "consolidation",
             "--patient-column", "subject", "--split-column", "fold"]
    out, evaluation = tmp_path / "run", tmp_path / "evaluation"
    assert cli.main(["train", "--data", root, "--out", str(out), "--epochs", "1", "--image-size", "32", "--batch-size",
                     "16", "--weights", "none", "--device", "cpu", *flags]) == 0
    printed = capsys.readouterr().out
    assert "48 images in" in printed and "24 image(s) of another split" in printed  # the train rows only
    assert cli.main(["evaluate", "--model", str(out), "--data", root, "--out", str(evaluation), "--device", "cpu",
                     *flags]) == 0
    predictions = list(csv.DictReader((evaluation / "predictions.csv").open()))
    names = {row["image"].rsplit("/", 1)[-1]: row["true"] for row in predictions}
    assert names == {name: ("CONSOLIDATION" if label else "NOT CONSOLIDATION") for name, label in test_labels.items()}


def test_an_evaluation_from_an_nih_table_names_the_table_rows(nih, tmp_path):
    from xraylib.model import build_resnet50, model_metadata, model_to_bytes

    root, expected = nih
    metadata = model_metadata(class_names=("NO PNEUMONIA", "PNEUMONIA"), image_size=32, equalize="none", threshold=0.5)
    (tmp_path / "model.pt").write_bytes(model_to_bytes(build_resnet50("none"), metadata))
    lines: list[str] = []
    result = evaluate_model(str(tmp_path / "model.pt"), root, labels=f"{root}/Data_Entry_2017.csv", device="cpu",
                            log=lines.append)
    assert sorted(result.names) == sorted(f"{root}/{name}" for name in expected)
    assert result.labels.tolist() == [int(expected[n.removeprefix(root + "/")][0]) for n in result.names]
    assert "2 row(s) name no image" in lines[0]


# ---------------------------------------------------------------------------------------------
# The decoded-image file


def test_a_second_load_opens_the_decoded_file_without_decoding(bucket, proxy, cache_dir, tiny_dataset):
    data = f"s3://{bucket}/chest_xray"
    storage.upload_directory(tiny_dataset / "train", f"{data}/train")
    index = dataset.list_images(data, split="train")
    first = load_data(data, image_size=32, val_fraction=0.2, seed=0, skip_bad=False, index=index, progress=False,
                      log=lambda _: None)
    [decoded] = (cache_dir / "decoded").glob("*.u8")
    assert decoded.stat().st_size == len(index) * 32 * 32
    made = decoded.stat().st_mtime_ns, decoded.stat().st_ino
    # Neither side of the split holds its own pixels: both are rows of the one file.
    assert first.train.pixels.file is first.val.pixels.file
    assert len(first.train.pixels) + len(first.val.pixels) == len(index)
    assert first.train.pixels[[0, 3]].shape == (2, 32, 32)  # a batch reads just its rows

    # Without the objects cached, any decoding would have to fetch: none does.
    for entry in (cache_dir / "objects").rglob("*"):
        if entry.is_file():
            entry.unlink()
    proxy.reset_counts()
    again = load_data(data, image_size=32, val_fraction=0.2, seed=0, skip_bad=False, index=index, progress=False,
                      log=lambda _: None)
    assert proxy.count("GET", f"/{bucket}/chest_xray/") == 0
    assert (decoded.stat().st_mtime_ns, decoded.stat().st_ino) == made
    assert np.array_equal(again.train.pixels.numpy(), first.train.pixels.numpy())
    assert [r.name for r in again.val.records] == [r.name for r in first.val.records]


def test_two_loads_at_once_make_the_file_once(bucket, proxy, cache_dir, tiny_dataset):
    data = f"s3://{bucket}/test"
    storage.upload_directory(tiny_dataset / "test", data)
    index = dataset.list_images(data)
    proxy.reset_counts()
    results: list[dataset.LoadedImages] = []
    loaders = [threading.Thread(target=lambda: results.append(dataset.load_images(index, 24))) for _ in range(2)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join()
    assert len(results) == 2
    assert proxy.count("GET", f"/{bucket}/test/") == len(index)  # each object fetched (and decoded) by one of them
    assert len(list((cache_dir / "decoded").glob("*.u8"))) == 1
    assert np.array_equal(results[0].pixels.numpy(), results[1].pixels.numpy())
