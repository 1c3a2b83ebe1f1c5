"""Time of the patient bootstrap behind metrics.json's 95% intervals (issue 15's target: well under 5 s).

    python benchmarks/bench_bootstrap.py [--images 624] [--repeats 5]

Simulates a test split the size of Kaggle's (624 images; about two per patient, ties in the
probabilities as a bf16 network makes them) and times `uncertainty.bootstrap_intervals` (2,000
resamples of the patients, every metric) and the whole `evaluate.trust_metrics` (intervals,
calibration, operating points, subgroups, per patient), best of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xraylib import config
from xraylib.evaluate import trust_metrics
from xraylib.uncertainty import bootstrap_intervals


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=624)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    patients = [f"person{i // 2}" for i in range(args.images)]
    labels = np.array([int((i // 2) % 8 < 5) for i in range(args.images)])  # about 62% pneumonia, as Kaggle's test split
    probs = np.round(1 / (1 + np.exp(-rng.normal(2.5 * labels - 1.2, 1.0))), 3)
    names = [f"{p}_{'bacteria' if i % 3 else 'virus'}_{i}.jpeg" for i, p in enumerate(patients)]
    intervals = best_of(args.repeats, lambda: bootstrap_intervals(labels, probs, 0.5, patients))
    everything = best_of(args.repeats, lambda: trust_metrics(labels, probs, 0.5, names, patients))
    print(f"{args.images} images, {len(set(patients))} patients, {config.BOOTSTRAP_RESAMPLES} resamples")
    print(f"bootstrap_intervals (9 metrics): {intervals:.3f} s (best of {args.repeats})")
    print(f"trust_metrics (intervals, calibration, 3 operating points, subgroups, per patient): {everything:.3f} s")


if __name__ == "__main__":
    main()
