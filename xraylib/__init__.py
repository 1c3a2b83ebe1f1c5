"""xraylib: train and evaluate a chest X-ray pneumonia classifier on images kept in S3.

Importing xraylib does nothing but define names: the heavy modules (torch, boto3) load on first
use of a function that needs them. The public functions, by stage:

- locations: `list_objects`, `read_bytes`, `write_bytes`, `upload_directory`   (storage.py)
- data: `list_images`, `split_by_patient`, `decode_image`, `load_images`       (dataset.py)
- labels from a table: `index_images`, `label_table`, `LabelTable`              (labels.py; DICOM: dicom.py)
- model: `build_resnet50`, `load_model`, `save_model`                          (model.py)
- training: `make_train_config`, `train`                                        (config.py, training.py)
- evaluation: `evaluate_model`, `compute_metrics`                               (evaluate.py)
- prediction: `predict_images`, `predict_to_csv`                                (predict.py)
- trust: `bootstrap_intervals` (uncertainty.py), `compare_models` (compare.py),
  `explain_images`, `grad_cam` (explain.py), `model_card_markdown` (model_card.py)
- pictures: `confusion_matrix_figure`, `roc_curve_figure`, ...                  (plots.py)
"""

from __future__ import annotations

import importlib
from typing import Any

from xraylib.errors import ConfigError, DatasetError, ImageDecodeError, LocationError, ModelFileError, XrayError

__version__ = "0.1.0"

_EXPORTS = {
    "storage": ["list_objects", "read_bytes", "write_bytes", "upload_directory", "fetch_location"],
    "dataset": ["list_images", "split_by_patient", "decode_image", "load_images", "patient_id"],
    "labels": ["index_images", "label_table", "LabelTable"],
    "model": ["build_resnet50", "load_model", "save_model"],
    "config": ["make_train_config", "TrainConfig", "PRESETS"],
    "training": ["train"],
    "evaluate": ["evaluate_model", "compute_metrics", "choose_threshold"],
    "predict": ["predict_images", "predict_to_csv"],
    "uncertainty": ["bootstrap_intervals"],
    "compare": ["compare_models"],
    "explain": ["explain_images", "grad_cam"],
    "model_card": ["model_card_markdown"],
    "plots": ["confusion_matrix_figure", "roc_curve_figure", "pr_curve_figure", "training_curves_figure",
              "sample_images_figure", "confident_mistakes_figure"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"xraylib.{_WHERE[name]}"), name)
    if name in _EXPORTS or name in ("cli", "demo", "notebooks", "locals3", "distributed", "dicom"):
        return importlib.import_module(f"xraylib.{name}")
    raise AttributeError(f"module 'xraylib' has no attribute {name!r}")


__all__ = ["ConfigError", "DatasetError", "ImageDecodeError", "LocationError", "ModelFileError", "XrayError",
           "__version__", *_WHERE]
