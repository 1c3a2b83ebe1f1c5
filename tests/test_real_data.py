"""On the real chest X-rays in ../shared/data (slow: `make test-slow`; skipped where absent).

A patient-level hold-out of the training folder stands in for the official test split, which is
kept away from this project: train from S3 with one short epoch, then evaluate on patients the
run never saw."""

from __future__ import annotations

import pytest

from tests.realdata import NOT_FOUND, REAL_DATA
from xraylib import config, dataset, storage
from xraylib.evaluate import evaluate_model
from xraylib.training import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REAL_DATA.is_dir(), reason=NOT_FOUND),
]


@pytest.mark.timeout(3600)
def test_one_short_epoch_from_s3_separates_held_out_patients(bucket, tmp_path):
    index = dataset.list_images(str(REAL_DATA))
    assert index.counts() == {"NORMAL": 1341, "PNEUMONIA": 3875}
    train_part, held_out = dataset.split_by_patient(index, 0.15, seed=1234)
    for split, part in (("train", train_part), ("test", held_out)):
        for record in part.records:
            link = tmp_path / "chest_xray" / split / record.obj.relpath
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(record.obj.location)
    data = f"s3://{bucket}/chest_xray"
    report = storage.upload_directory(tmp_path / "chest_xray", data)
    assert report.uploaded == 5216

    cfg = config.make_train_config(data=data, out=f"s3://{bucket}/runs/real", epochs=1, image_size=64, weights="none")
    result = train(cfg, progress=False)
    assert {r.patient for r in result.data.train.records}.isdisjoint({r.patient for r in held_out.records})

    evaluation = evaluate_model(result.model_location, data, f"s3://{bucket}/eval/real")
    assert evaluation.metrics["n_images"] == len(held_out)
    assert evaluation.metrics["roc_auc"] > 0.8, evaluation.metrics
