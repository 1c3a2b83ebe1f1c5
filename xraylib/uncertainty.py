"""How sure a metric is: 95% intervals from a bootstrap over patients, and paired differences.

A patient's images are not independent (the same lungs, often the same day), so the bootstrap
resamples *patients*, with replacement, and a drawn patient brings all of its images. Each
resample is a row of patient multiplicities (a multinomial draw: `resample_counts`); every metric
is then computed for all 2,000 rows at once from per-patient sums with matrix products
(`weighted_metrics`): the confusion counts, the Brier score and the calibration error directly,
ROC AUC as the weighted share of (positive, negative) pairs ranked right (ties count half) and PR
AUC as the weighted average precision over the distinct scores, both from one sort of the scores.
The row of ones is the metric on the images as they are, so the point estimates and the resamples
are the same code; tests check them against scikit-learn.

The interval is the percentile interval (2.5th and 97.5th percentiles of the resampled values);
resamples in which a metric has no value (no positive patient drawn, say) are left out of its
percentiles. `paired_differences` draws the same patients for two models scored on the same
images, so the interval of the difference accounts for their shared luck.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xraylib import config

# Metrics the bootstrap computes, in the order metrics.json lists them.
BOOTSTRAPPED = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc", "brier", "ece")
_RANKED = ("roc_auc", "pr_auc")


def ci_method(n_groups: int, unit: str = "patients", resamples: int = config.BOOTSTRAP_RESAMPLES,
              seed: int = config.BOOTSTRAP_SEED) -> str:
    """How the intervals were made, in words, for metrics.json and the model card."""
    return (f"percentile bootstrap over {unit}: {resamples} resamples of the {n_groups} {unit} with replacement "
            f"(seed {seed}); a drawn patient brings all of its images; 95% interval = 2.5th to 97.5th percentile")


def group_codes(groups: Sequence[str]) -> np.ndarray:
    """An integer 0..G-1 for each image's group (patient), equal for equal groups."""
    return np.unique(np.asarray(list(groups), dtype=str), return_inverse=True)[1].reshape(-1)


def resample_counts(n_groups: int, resamples: int = config.BOOTSTRAP_RESAMPLES,
                    seed: int = config.BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples, n_groups]: how many times each group is drawn in each resample (each row sums to
    n_groups); the same for the same seed."""
    rng = np.random.default_rng(seed)
    if n_groups == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples).astype(np.float64)


@dataclass(frozen=True)
class GroupSums:
    """Per-group (patient) sums of what the metrics need, for one set of scores and a threshold."""

    positives: np.ndarray  # [G] images of the positive class
    negatives: np.ndarray
    true_positives: np.ndarray  # [G] positives at or above the threshold
    false_positives: np.ndarray
    squared_error: np.ndarray  # [G] sum of (p - y)^2
    calibration_gap: np.ndarray  # [G, bins] sum of (p - y) per probability bin
    positives_at: np.ndarray  # [G, U] positives at each distinct score, ascending
    negatives_at: np.ndarray

    @property
    def n_groups(self) -> int:
        return len(self.positives)


def group_sums(labels: Sequence[int], probabilities: Sequence[float], threshold: float, groups: np.ndarray,
               bins: int = config.ECE_BINS, ranked: bool = True) -> GroupSums:
    """The per-group sums of images with `labels` (1 positive), `probabilities` of the positive class
    and group codes `groups` (`group_codes`). Without `ranked`, the AUCs' score tables are left empty."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    g = np.asarray(groups, dtype=np.int64)
    n_groups = int(g.max()) + 1 if len(g) else 0

    def per_group(values: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=values, minlength=n_groups)

    called = (p >= threshold).astype(np.float64)
    bin_of = np.minimum((p * bins).astype(np.int64), bins - 1)  # equal-width bins of [0, 1]; 1.0 in the last
    gap = np.zeros((n_groups, bins))
    np.add.at(gap, (g, bin_of), p - y)
    if ranked:
        scores, at = np.unique(p, return_inverse=True)
        positives_at = np.zeros((n_groups, len(scores)))
        negatives_at = np.zeros((n_groups, len(scores)))
        np.add.at(positives_at, (g, at.reshape(-1)), y)
        np.add.at(negatives_at, (g, at.reshape(-1)), 1 - y)
    else:
        positives_at = negatives_at = np.zeros((n_groups, 0))
    return GroupSums(per_group(y), per_group(1 - y), per_group(y * called), per_group((1 - y) * called),
                     per_group((p - y) ** 2), gap, positives_at, negatives_at)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def weighted_metrics(sums: GroupSums, weights: np.ndarray, metrics: Sequence[str] = BOOTSTRAPPED) -> dict[str, np.ndarray]:
    """Each of `metrics` for every row of `weights` ([R, G] group multiplicities): [R] values, NaN
    where a metric has no value on that row. A row of ones gives the metrics of the images as
    they are."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    pos, neg = w @ sums.positives, w @ sums.negatives
    tp, fp = w @ sums.true_positives, w @ sums.false_positives
    fn, tn = pos - tp, neg - fp
    n = pos + neg
    out: dict[str, np.ndarray] = {}
    simple = {
        "accuracy": lambda: _ratio(tp + tn, n),
        "sensitivity": lambda: _ratio(tp, pos),
        "specificity": lambda: _ratio(tn, neg),
        "precision": lambda: _ratio(tp, tp + fp),
        "f1": lambda: _ratio(2 * tp, 2 * tp + fp + fn),
        "brier": lambda: _ratio(w @ sums.squared_error, n),
        "ece": lambda: _ratio(np.abs(w @ sums.calibration_gap).sum(axis=1), n),
    }
    for name in metrics:
        if name in simple:
            out[name] = simple[name]()
    if any(name in _RANKED for name in metrics):
        pos_at, neg_at = w @ sums.positives_at, w @ sums.negatives_at  # [R, U], scores ascending
        if "roc_auc" in metrics:
            below = np.cumsum(neg_at, axis=1) - neg_at
            out["roc_auc"] = _ratio((pos_at * (below + 0.5 * neg_at)).sum(axis=1), pos * neg)
        if "pr_auc" in metrics:
            found, false = np.cumsum(pos_at[:, ::-1], axis=1), np.cumsum(neg_at[:, ::-1], axis=1)
            precision = np.nan_to_num(_ratio(found, found + false))
            out["pr_auc"] = np.where(neg > 0, _ratio((pos_at[:, ::-1] * precision).sum(axis=1), pos), np.nan)
    return out


def percentile_interval(values: np.ndarray, level: float = config.CI_LEVEL) -> list[float | None]:
    """[low, high] of the resampled values that have one; [None, None] when none has."""
    kept = np.asarray(values, dtype=np.float64)
    kept = kept[np.isfinite(kept)]
    if not len(kept):
        return [None, None]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(kept, [tail, 100 - tail])
    return [float(low), float(high)]


def bootstrap_intervals(labels: Sequence[int], probabilities: Sequence[float], threshold: float, groups: Sequence[str], *,
                        metrics: Sequence[str] = BOOTSTRAPPED, resamples: int = config.BOOTSTRAP_RESAMPLES,
                        seed: int = config.BOOTSTRAP_SEED) -> dict[str, list[float | None]]:
    """{metric: [low, high]}: 95% intervals of `metrics` at `threshold`, resampling `groups` (each
    image's patient; pass the image names to resample images)."""
    codes = group_codes(groups)
    sums = group_sums(labels, probabilities, threshold, codes, ranked=any(m in _RANKED for m in metrics))
    values = weighted_metrics(sums, resample_counts(sums.n_groups, resamples, seed), metrics)
    return {name: percentile_interval(values[name]) for name in metrics}


def point_metrics(labels: Sequence[int], probabilities: Sequence[float], threshold: float,
                  metrics: Sequence[str] = BOOTSTRAPPED) -> dict[str, float]:
    """The metrics of the images as they are (the bootstrap's row of ones), NaN where undefined."""
    codes = np.arange(len(np.asarray(labels)))
    sums = group_sums(labels, probabilities, threshold, codes, ranked=any(m in _RANKED for m in metrics))
    return {name: float(v[0]) for name, v in weighted_metrics(sums, np.ones((1, sums.n_groups)), metrics).items()}


@dataclass(frozen=True)
class PairedDifference:
    """A metric of model A minus the same metric of model B on the same images, with its interval."""

    metric: str
    a: float
    b: float
    difference: float
    ci95: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "difference": self.difference, "ci95": self.ci95}


def paired_differences(labels: Sequence[int], scored: Mapping[str, tuple[Sequence[float], float]], groups: Sequence[str], *,
                       metrics: Sequence[str] = BOOTSTRAPPED, resamples: int = config.BOOTSTRAP_RESAMPLES,
                       seed: int = config.BOOTSTRAP_SEED) -> list[PairedDifference]:
    """A minus B for each metric: `scored` maps two names (A first) to (probabilities, threshold) on
    the same images, in the same order, with these `labels` and `groups` (patients). Both models see
    the same patient resamples, so what the patients drawn do to both cancels out of the interval."""
    (_, (probs_a, threshold_a)), (_, (probs_b, threshold_b)) = list(scored.items())
    codes = group_codes(groups)
    counts = resample_counts(int(codes.max()) + 1 if len(codes) else 0, resamples, seed)
    ones = np.ones((1, counts.shape[1]))
    sums_a = group_sums(labels, probs_a, threshold_a, codes)
    sums_b = group_sums(labels, probs_b, threshold_b, codes)
    point_a, point_b = weighted_metrics(sums_a, ones, metrics), weighted_metrics(sums_b, ones, metrics)
    drawn_a, drawn_b = weighted_metrics(sums_a, counts, metrics), weighted_metrics(sums_b, counts, metrics)
    return [PairedDifference(name, float(point_a[name][0]), float(point_b[name][0]),
                             float(point_a[name][0] - point_b[name][0]), percentile_interval(drawn_a[name] - drawn_b[name]))
            for name in metrics]
