"""Two models on the same images: is B better than A, and by how much, with an interval.

`compare_evaluations` pairs two evaluations image by image (by location; an image one of them
skipped is left out of both, and counted) and gives, for each metric, A, B, A minus B and the 95%
interval of the difference from one bootstrap over patients that both models share
(`uncertainty.paired_differences`): "B is better" holds when the interval of A - B lies below 0.
`compare_models` is `xraylib compare`: it evaluates both models on the `test/` split of a dataset
and writes `comparison.json` when given `out`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xraylib import storage, uncertainty
from xraylib.errors import DatasetError

COMPARISON_FILENAME = "comparison.json"


@dataclass(frozen=True)
class Comparison:
    models: tuple[str, str]  # A, B
    n_images: int
    n_patients: int
    left_out: int  # images only one of the two evaluations holds
    differences: list[uncertainty.PairedDifference]
    method: str

    def title(self) -> str:
        return (f"A = {self.models[0]}, B = {self.models[1]}: {self.n_images} images of {self.n_patients} patients"
                + (f" ({self.left_out} scored by only one, left out)" if self.left_out else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.models[0], "b": self.models[1], "n_images": self.n_images, "n_patients": self.n_patients,
                "left_out_images": self.left_out, "ci_method": self.method,
                "differences": {d.metric: d.to_dict() for d in self.differences}}

    def to_json(self) -> str:
        from xraylib.evaluate import metrics_json

        return metrics_json(self.to_dict())


def compare_evaluations(a: Any, b: Any, names: tuple[str, str] | None = None) -> Comparison:
    """A (`evaluate.Evaluation`) against B on the images both scored, at each one's own threshold."""
    where_b = {name: i for i, name in enumerate(b.names)}
    rows_a = [i for i, name in enumerate(a.names) if name in where_b]
    rows_b = [where_b[a.names[i]] for i in rows_a]
    if not rows_a:
        raise DatasetError("the two evaluations share no image: evaluate both models on the same data")
    labels = a.labels[rows_a]
    if not np.array_equal(labels, b.labels[rows_b]):
        raise DatasetError("the two evaluations label the same images differently: evaluate both on the same data")
    patients = [a.patient_ids()[i] for i in rows_a]
    differences = uncertainty.paired_differences(
        labels, {"a": (a.probabilities[rows_a], a.metrics["threshold"]), "b": (b.probabilities[rows_b], b.metrics["threshold"])},
        patients)
    names = names or (a.metrics.get("model", "A"), b.metrics.get("model", "B"))
    return Comparison(names, len(rows_a), len(set(patients)), len(a.names) + len(b.names) - 2 * len(rows_a), differences,
                      "paired " + uncertainty.ci_method(len(set(patients))) + "; both models on the same resamples")


def compare_models(model_a: str, model_b: str, data: str, out: str | None = None, *, device: str = "auto",
                   precision: str = "auto", skip_bad: bool = False, log: Callable[[str], None] = print) -> Comparison:
    """Evaluate two models (files or `train --out` locations) on the `test/` split of `data` and
    compare them; with `out`, write `comparison.json` there."""
    from xraylib.evaluate import evaluate_model

    a, b = (evaluate_model(m, data, device=device, precision=precision, skip_bad=skip_bad, log=log) for m in (model_a, model_b))
    comparison = compare_evaluations(a, b, (model_a, model_b))
    if out is not None:
        location = storage.join(out, COMPARISON_FILENAME)
        storage.write_text(location, comparison.to_json())
        log(f"wrote {COMPARISON_FILENAME} to {out}")
    return comparison


def comparison_lines(comparison: Comparison) -> list[str]:
    """The comparison as the CLI prints it: one line per metric."""
    lines = [comparison.title()]
    for d in comparison.differences:
        low, high = d.ci95
        bounds = "n/a" if low is None else f"[{low:+.4f}, {high:+.4f}]"
        lines.append(f"{d.metric:<12} A {d.a:.4f}  B {d.b:.4f}  A-B {d.difference:+.4f}  95% CI {bounds}")
    return lines

