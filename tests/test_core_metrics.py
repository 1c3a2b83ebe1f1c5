"""Metrics as a clinician reads them, a decision threshold that survives rounding, and the
metrics.json that evaluation writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xraylib import dataset
from xraylib.evaluate import choose_threshold, compute_metrics, evaluate_loaded, write_evaluation
from xraylib.model import TrainedModel, build_resnet50, model_metadata


def test_metrics_match_a_confusion_matrix_counted_by_hand():
    # 4 NORMAL (0), 6 PNEUMONIA (1); at 0.5: TN 3, FP 1, FN 2, TP 4.
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    probs = [0.1, 0.2, 0.3, 0.7, 0.4, 0.45, 0.6, 0.8, 0.9, 0.95]
    m = compute_metrics(labels, probs, 0.5)
    assert m["confusion_matrix"]["matrix"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(4 / 6)  # pneumonia found
    assert m["specificity"] == pytest.approx(3 / 4)  # normals cleared
    assert m["precision"] == pytest.approx(4 / 5)
    # ROC AUC: the share of (pneumonia, normal) pairs ranked the right way round: 21 of 24.
    assert m["roc_auc"] == pytest.approx(21 / 24)


def test_chosen_threshold_separates_and_sits_between_two_images():
    labels = [0, 0, 0, 1, 1, 1]
    probs = [0.05, 0.2, 0.41, 0.43, 0.7, 0.9]
    threshold = choose_threshold(labels, probs)
    assert 0.41 < threshold < 0.43
    assert compute_metrics(labels, probs, threshold)["accuracy"] == 1.0
    # Rounding that moves every probability a little (as folding batch norms does) changes nothing.
    for delta in (-1e-6, 1e-6):
        assert compute_metrics(labels, np.add(probs, delta), threshold)["accuracy"] == 1.0


def test_threshold_is_one_half_without_both_classes():
    assert choose_threshold([1, 1, 1], [0.2, 0.6, 0.9]) == 0.5


def _strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _evaluate_into(out, data: dataset.LoadedImages) -> str:
    """The metrics.json of an (untrained) model evaluated on `data`."""
    import torch

    torch.manual_seed(0)
    model = TrainedModel(build_resnet50("none").eval(),
                         model_metadata(class_names=("NORMAL", "PNEUMONIA"), image_size=32, threshold=0.5))
    write_evaluation(evaluate_loaded(model, data, device="cpu"), str(out))
    return (out / "metrics.json").read_text()


def test_metrics_json_is_strict_json_and_says_why_a_metric_is_undefined(tmp_path, tiny_dataset):
    # Only PNEUMONIA images: specificity (the share of NORMAL ones called NORMAL) and the AUCs
    # (PNEUMONIA ranked against NORMAL) have no value. JSON has no NaN: null, and the reason.
    index = dataset.list_images(str(tiny_dataset), split="test")
    data = dataset.load_images(index.subset([r for r in index.records if r.label == 1]), 32)
    metrics = _strict_json(_evaluate_into(tmp_path, data))
    assert metrics["specificity"] is None and metrics["roc_auc"] is None and metrics["pr_auc"] is None
    assert 0 <= metrics["sensitivity"] <= 1 and metrics["n_images"] == len(data)
    assert set(metrics["undefined"]) == {name for name, value in metrics.items() if value is None}
    assert "no NORMAL images" in metrics["undefined"]["specificity"]
    assert "only PNEUMONIA" in metrics["undefined"]["roc_auc"]


def test_confusion_matrix_in_metrics_json_is_labelled_with_the_class_names(tmp_path, tiny_dataset):
    index = dataset.list_images(str(tiny_dataset), split="test")
    metrics = json.loads(_evaluate_into(tmp_path, dataset.load_images(index, 32)))
    matrix = metrics["confusion_matrix"]
    assert matrix["labels"] == ["NORMAL", "PNEUMONIA"]
    # Rows are the true class: each row holds that class's images.
    assert dict(zip(matrix["labels"], map(sum, matrix["matrix"]), strict=True)) == index.counts()
