"""Who the model misses: sensitivity per subgroup of the positive class, and results per patient.

- Subgroups: Kaggle's file names say more than the class, `person1_bacteria_1.jpeg` and
  `person1_virus_6.jpeg`; `subgroup_of` reads that (`config.SUBGROUPS`). `subgroup_results` gives
  each subgroup's sensitivity with its 95% patient-bootstrap interval. A subgroup no test image
  carries is listed with a null sensitivity and the reason, never left out silently.
- Per patient: a patient counts as positive when any of its images is, and its score is the
  highest probability among its images (one image called positive calls the patient positive);
  `patient_results` gives the metrics on patients, beside the per-image ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from xraylib import config

PATIENT_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc")
_SUBGROUP_PATTERN = re.compile(r"_(" + "|".join(config.SUBGROUPS) + r")_", re.IGNORECASE)


def subgroup_of(name: str) -> str | None:
    """'bacteria' for `.../person1_bacteria_1.jpeg`, 'virus' for `person1_virus_6.jpeg`, else None."""
    match = _SUBGROUP_PATTERN.search(name.rsplit("/", 1)[-1])
    return match.group(1).lower() if match else None


def subgroup_results(labels: Sequence[int], probabilities: Sequence[float], threshold: float, names: Sequence[str],
                     patients: Sequence[str], positive: str = "PNEUMONIA") -> dict[str, dict[str, Any]]:
    """{subgroup: {n_images, n_patients, sensitivity, ci95}} over the positive images whose file
    names carry the subgroup; sensitivity null (with `undefined`, the reason) for one without images."""
    from xraylib.uncertainty import bootstrap_intervals, point_metrics

    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    kinds = np.array([subgroup_of(n) or "" for n in names])
    patient_of = np.asarray(list(patients), dtype=str)
    out: dict[str, dict[str, Any]] = {}
    for kind in config.SUBGROUPS:
        rows = np.flatnonzero((y == 1) & (kinds == kind))
        entry: dict[str, Any] = {"n_images": len(rows), "n_patients": len(set(patient_of[rows].tolist()))}
        if len(rows):
            entry["sensitivity"] = point_metrics(y[rows], p[rows], threshold, ("sensitivity",))["sensitivity"]
            entry["ci95"] = bootstrap_intervals(y[rows], p[rows], threshold, patient_of[rows],
                                                metrics=("sensitivity",))["sensitivity"]
        else:
            entry.update(sensitivity=None, ci95=[None, None],
                         undefined=f"no {positive} test image's file name carries '{kind}'")
        out[kind] = entry
    return out


def by_patient(labels: Sequence[int], probabilities: Sequence[float],
               patients: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(patients, label, score): a patient's label is the highest of its images' (positive when any
    image is), its score the highest probability among its images."""
    codes, index = np.unique(np.asarray(list(patients), dtype=str), return_inverse=True)
    index = index.reshape(-1)
    label = np.zeros(len(codes), dtype=int)
    score = np.full(len(codes), -np.inf)
    np.maximum.at(label, index, np.asarray(labels, dtype=int))
    np.maximum.at(score, index, np.asarray(probabilities, dtype=float))
    return codes.tolist(), label, score


def patient_results(labels: Sequence[int], probabilities: Sequence[float], threshold: float,
                    patients: Sequence[str]) -> dict[str, Any]:
    """The metrics on patients (see `by_patient`) at `threshold`, with 95% intervals resampling
    patients; a metric without a value is null, and `undefined` says why."""
    from xraylib.uncertainty import bootstrap_intervals, point_metrics

    names, label, score = by_patient(labels, probabilities, patients)
    values = point_metrics(label, score, threshold, PATIENT_METRICS)
    out: dict[str, Any] = {"n_patients": len(names), "positive_patients": int(label.sum()),
                           **{k: (v if np.isfinite(v) else None) for k, v in values.items()},
                           "ci95": bootstrap_intervals(label, score, threshold, names, metrics=PATIENT_METRICS)}
    undefined = {k: "no patient of one of the classes, or none called positive, among the test images"
                 for k, v in values.items() if not np.isfinite(v)}
    if undefined:
        out["undefined"] = undefined
    return out
