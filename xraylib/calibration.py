"""Whether the probabilities are honest: Brier score, expected calibration error, reliability bins.

- Brier score: the mean of (P(positive) - label)^2, scikit-learn's `brier_score_loss`.
- Expected calibration error (ECE): P(positive) is cut into `config.ECE_BINS` (15) equal-width
  bins of [0, 1]; in each bin, the gap between the mean probability and the share of positive
  images, weighed by the bin's share of the images, summed over the bins. 0 is perfectly
  calibrated. The bootstrap (`uncertainty.weighted_metrics`) holds the one definition, so the
  value and its interval cannot drift apart.
- `reliability_bins` is what the reliability diagram (`plots.reliability_figure`) draws.

(Fitting the calibration itself, temperature and bias on validation, is `evaluate.fit_calibration`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xraylib import config


def ece_method(bins: int = config.ECE_BINS) -> str:
    return (f"{bins} equal-width bins of P(positive) over [0, 1]; sum over bins of the bin's share of images times "
            "|mean P(positive) - share of positive images|")


def brier_score(labels: Sequence[int], probabilities: Sequence[float]) -> float:
    """Mean squared gap between P(positive) and the label (scikit-learn's `brier_score_loss`); NaN for no images."""
    from sklearn.metrics import brier_score_loss

    if not len(labels):
        return float("nan")
    return float(brier_score_loss(np.asarray(labels, dtype=int), np.asarray(probabilities, dtype=float), pos_label=1))


def expected_calibration_error(labels: Sequence[int], probabilities: Sequence[float]) -> float:
    """ECE over `config.ECE_BINS` equal-width bins (see the module's docstring); NaN for no images."""
    from xraylib.uncertainty import point_metrics

    return point_metrics(labels, probabilities, 0.5, metrics=("ece",))["ece"]


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width bin of P(positive) holding any image: its edges, the mean probability, the
    share of positive images, and how many images."""

    low: np.ndarray
    high: np.ndarray
    mean_probability: np.ndarray
    positive_share: np.ndarray
    count: np.ndarray


def reliability_bins(labels: Sequence[int], probabilities: Sequence[float], bins: int = config.ECE_BINS) -> ReliabilityBins:
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    bin_of = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(bin_of, minlength=bins)
    held = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(bin_of, weights=p, minlength=bins) / count
        share = np.bincount(bin_of, weights=y, minlength=bins) / count
    edges = np.linspace(0, 1, bins + 1)
    return ReliabilityBins(edges[:-1][held], edges[1:][held], mean_p[held], share[held], count[held])
