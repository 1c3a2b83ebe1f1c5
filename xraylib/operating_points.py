"""Operating points: thresholds for target sensitivities, chosen on validation, read on the test images.

A screening reader asks "if it must find 95% of the pneumonias, how many normal films does it
clear?". Training picks, on its validation split, the threshold of each sensitivity in
`config.OPERATING_POINT_SENSITIVITIES` (0.90, 0.95, 0.99; `choose_operating_points`) and stores
them in the model file (`metadata["operating_points"]`). Evaluation reads sensitivity and
specificity at each of them on the test images, with 95% patient-bootstrap intervals
(`operating_points_on`). On a new cohort the sensitivity reached there can fall short of the target:
that gap is what the test images show.

A model file from before they were stored has none; evaluation then picks them on the test images
themselves and says so (`chosen_on: "test images"`): their sensitivity meets the target by
construction, and only the specificity there is informative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from xraylib import config


def sensitivity_threshold(labels: Sequence[int], probabilities: Sequence[float], target: float) -> float:
    """The highest threshold at which at least `target` of the positive images score at or above it,
    halfway down to the next lower score of any image (so that rounding cannot flip the image on
    it); 0.5 without positive images."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    positives = np.sort(p[y == 1])[::-1]
    if not len(positives):
        return 0.5
    needed = math.ceil(target * len(positives) - 1e-9)
    if needed <= 0:
        return 1.0
    upper = positives[min(needed, len(positives)) - 1]
    below = p[p < upper]
    lower = below.max() if len(below) else 0.0
    return float(min(max((upper + lower) / 2, 0.0), 1.0))


def choose_operating_points(labels: Sequence[int], probabilities: Sequence[float],
                            targets: Sequence[float] = config.OPERATING_POINT_SENSITIVITIES) -> list[dict[str, float]]:
    """[{target_sensitivity, threshold}] for each target, chosen on these (validation) images."""
    return [{"target_sensitivity": float(t), "threshold": sensitivity_threshold(labels, probabilities, t)} for t in targets]


def operating_points_on(labels: Sequence[int], probabilities: Sequence[float], groups: Sequence[str],
                        chosen: Sequence[dict[str, float]] | None, *, chosen_on: str = "validation") -> list[dict[str, Any]]:
    """Sensitivity and specificity, with 95% intervals resampling `groups` (patients), at each
    operating point of `chosen` on these images. Without `chosen` (a model file that has none),
    the points are chosen on these very images and `chosen_on` says 'test images'."""
    from xraylib.uncertainty import bootstrap_intervals, point_metrics

    if not chosen:
        chosen, chosen_on = choose_operating_points(labels, probabilities), "test images"
    out = []
    for point in chosen:
        threshold = float(point["threshold"])
        values = point_metrics(labels, probabilities, threshold, metrics=("sensitivity", "specificity"))
        intervals = bootstrap_intervals(labels, probabilities, threshold, groups, metrics=("sensitivity", "specificity"))
        out.append({"target_sensitivity": float(point["target_sensitivity"]), "threshold": threshold, "chosen_on": chosen_on,
                    **values, "ci95": intervals})
    return out
