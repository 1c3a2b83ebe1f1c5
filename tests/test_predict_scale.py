"""`xraylib predict` at scale: a prefix of any size in bounded memory, its CSV written as it goes
(local or S3), a re-run that scores nothing twice, and torchrun's ranks writing one CSV."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import scratch_dir
from xraylib import storage, synthetic
from xraylib.model import build_resnet50, model_metadata, save_model

IMAGE_SIZE = 32  # the model's; the files are 32-48 px


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    """(model file, a folder of 500 images, a folder of 5,000 images that holds those 500 too)."""
    with scratch_dir(tmp_path_factory, "scale") as root:
        yield _write_images(root)


def _write_images(root: Path) -> tuple[Path, Path, Path]:
    big, small = root / "big", root / "small"
    big.mkdir()
    small.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5000):
        side = int(rng.integers(32, 49))
        data = synthetic.encode(synthetic.chest_image(rng, bool(i % 2), side, side))
        (big / f"IM-{i:05d}-0001.jpeg").write_bytes(data)
        if i < 500:
            (small / f"IM-{i:05d}-0001.jpeg").write_bytes(data)
    model = root / "model.pt"
    save_model(str(model), build_resnet50("none"),
               model_metadata(class_names=("NORMAL", "PNEUMONIA"), image_size=IMAGE_SIZE, threshold=0.5))
    return model, small, big


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# The child scores into a CSV and reports how far its peak resident memory rose while scoring.
# The peak is reset (Linux's /proc/self/clear_refs) after the model is loaded and has scored once:
# loading a ResNet50 file moves ~300 MB, far more than the images, and its peak varies by tens of MB.
_MEASURE = """
import re, sys
from pathlib import Path
from xraylib import predict
from xraylib.model import load_model

def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

trained = load_model(sys.argv[1])
predict.predict_images(trained, sorted(Path(sys.argv[2]).iterdir())[:64], log=lambda _: None)
Path("/proc/self/clear_refs").write_text("5")
before = peak_mb()
report = predict.predict_to_csv(trained, sys.argv[2], sys.argv[3], precision="fp32", log=lambda _: None)
print(f"rise {peak_mb() - before:.1f} MB; {report}")
"""


def _start_scoring(model: Path, folder: Path, out: Path) -> subprocess.Popen:
    """A child that scores `folder` into `out` and reports the rise of its own peak memory: children
    run side by side (one thread each) measure their own peaks."""
    return subprocess.Popen([sys.executable, "-c", _MEASURE, str(model), str(folder), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _scoring_peak_rise_mb(child: subprocess.Popen) -> tuple[float, str]:
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr
    match = re.search(r"rise ([\d.]+) MB; (.*)", stdout)
    return float(match.group(1)), match.group(2)


@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is reset through Linux's /proc")
def test_predict_over_5000_images_peaks_no_higher_than_over_500_and_a_rerun_scores_nothing_twice(images, tmp_path):
    model, small, big = images
    over_500, over_5000 = _start_scoring(model, small, tmp_path / "small.csv"), _start_scoring(model, big, tmp_path / "big.csv")
    rise_500, report_500 = _scoring_peak_rise_mb(over_500)
    rise_5000, report_5000 = _scoring_peak_rise_mb(over_5000)
    assert report_500 == f"scored 500 image(s), 0 already in {tmp_path / 'small.csv'}"
    assert report_5000 == f"scored 5000 image(s), 0 already in {tmp_path / 'big.csv'}"
    # Margin: 20 MB. Holding every decoded image until the end (as predict did before it streamed)
    # rose 49 MB more over 5,000 of these images than over 500 on this machine; streamed, the two
    # rises differ by the allocator's noise (under 10 MB).
    assert rise_5000 <= rise_500 + 20, (rise_500, rise_5000)
    print(f"peak rise while scoring: {rise_500} MB over 500 images, {rise_5000} MB over 5,000")
    rows = _rows((tmp_path / "big.csv").read_text())
    assert len(rows) == 5000 and {r["image"] for r in rows} == {str(p) for p in big.iterdir()}
    assert {r["label"] for r in rows} <= {"NORMAL", "PNEUMONIA"}
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)

    # A run stopped part way (here: cut after 123 rows, in the middle of the next one) goes on where it stopped.
    csv_path = tmp_path / "small.csv"
    rows = _rows(csv_path.read_text())
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:124]) + lines[124][:20])
    rerun = _xraylib("predict", "--model", str(model), str(small), "--csv", str(csv_path))
    assert rerun.returncode == 0, rerun.stderr
    assert f"500 image(s): 123 already in {csv_path}, 377 to score" in rerun.stderr
    assert f"scored 377 image(s), 123 already in {csv_path}" in rerun.stderr
    again = _rows(csv_path.read_text())
    assert len(again) == 500 and len({r["image"] for r in again}) == 500  # every image once
    assert again[:123] == rows[:123]


def _xraylib(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable, "-m"]), "xraylib", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(300)
def test_predict_csv_on_s3_is_one_object_and_a_rerun_scores_only_what_it_lacks(images, bucket, tmp_path):
    model, small, _ = images
    folder = tmp_path / "incoming"
    folder.mkdir()
    names = sorted(p.name for p in small.iterdir())
    for name in names[:300]:
        shutil.copy(small / name, folder / name)
    location = f"s3://{bucket}/scores/predictions.csv"
    first = _xraylib("predict", "--model", str(model), str(folder), "--csv", location)
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""  # predictions go to the CSV only
    assert [o.relpath for o in storage.list_objects(f"s3://{bucket}/scores")] == ["predictions.csv"]
    assert len(_rows(storage.read_bytes(location).decode())) == 300

    for name in names[300:]:  # more images arrive
        shutil.copy(small / name, folder / name)
    second = _xraylib("predict", "--model", str(model), str(folder), "--csv", location)
    assert second.returncode == 0, second.stderr
    assert f"scored 200 image(s), 300 already in {location}" in second.stderr
    rows = _rows(storage.read_bytes(location).decode())
    assert sorted(r["image"] for r in rows) == sorted(str(folder / name) for name in names)

    # The same images on standard output, one tab-separated line each, as predict has always printed them.
    printed = _xraylib("predict", "--model", str(model), str(folder))
    assert printed.returncode == 0, printed.stderr
    by_image = {r["image"]: r for r in rows}
    lines = printed.stdout.splitlines()
    assert len(lines) == 500
    for line in lines:
        image, label, probability = line.split("\t")
        assert by_image[image]["label"] == label
        assert float(by_image[image]["probability"]) == pytest.approx(float(probability), abs=1e-4)


@pytest.mark.timeout(300)
def test_predict_under_torchrun_writes_one_csv_with_every_image_once(images, tmp_path):
    model, small, _ = images
    out = tmp_path / "ranks.csv"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    result = _xraylib("predict", "--model", str(model), str(small), "--csv", str(out), launcher=torchrun)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("scored 500 image(s), 0 already in") == 1  # rank 0 alone reports
    rows = _rows(out.read_text())
    assert [r["image"] for r in rows] == sorted(str(p) for p in small.iterdir())  # one CSV, in the images' order
    alone = _xraylib("predict", "--model", str(model), str(small), "--csv", str(tmp_path / "alone.csv"))
    assert alone.returncode == 0, alone.stderr
    expected = {r["image"]: r for r in _rows((tmp_path / "alone.csv").read_text())}
    for row in rows:  # each image scored by one rank as one process scores it
        assert row["label"] == expected[row["image"]]["label"]
        assert float(row["probability"]) == pytest.approx(float(expected[row["image"]]["probability"]), abs=1e-4)
