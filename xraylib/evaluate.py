"""Prediction and metrics: what a model says about images, and how good that is.

`predict_probabilities` runs the network over decoded pixels (training's validation uses it
too). `compute_metrics` gives accuracy, sensitivity (recall of the positive class),
specificity, precision, F1, ROC AUC and PR AUC at a threshold, plus the confusion matrix with
rows true and columns predicted, labelled with the class names. `choose_threshold` picks the
threshold on validation data. `trust_metrics` adds what a reviewer asks next: 95% intervals
resampling patients, calibration, operating points, subgroups and per-patient results (each from
its own module). `evaluate_model` is what the test notebook and the CLI call (`predict_images`,
for unlabelled images, lives in predict.py); `write_evaluation` stores metrics.json
(`metrics_json`: strict JSON, null, not NaN), the predictions, the pictures and the model card.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xraylib import calibration, config, dataset, storage, subgroups, uncertainty
from xraylib.labels import LabelTable, index_images, label_table
from xraylib.model import (
    TrainedModel,
    autocast,
    inference_dtype,
    inference_network,
    load_model,
    precision_name,
    resolve_device,
)
from xraylib.operating_points import operating_points_on, sensitivity_threshold


def predict_logits(
    network: Any,
    pixels: Any,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int | None = None,
    device: Any = None,
    amp_dtype: Any = None,
    tta: bool = False,
) -> np.ndarray:
    """The log-odds of the positive class for each uint8 [H, W] image in `pixels` ([N, H, W]);
    with `tta`, the mean over the views in `config.TTA_VIEWS`. `batch_size` defaults to
    `eval_batch_size`'s. Log-odds, not probabilities, because float32 probabilities saturate at 1.0
    and calibration needs the margin."""
    import torch

    device = torch.device(device) if device is not None else next(network.parameters()).device
    batch_size = batch_size or eval_batch_size(device, pixels.shape[-1] * pixels.shape[-2])
    was_training = network.training
    network.eval()
    out = []
    with torch.inference_mode(), autocast(device, amp_dtype):
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].to(device)
            views = [batch] if not tta else [
                dataset.affine_batch(batch, angle=a, scale=z, shift_x=sx, shift_y=sy) for a, z, sx, sy in config.TTA_VIEWS
            ]
            margins = []
            for view in views:
                logits = network(dataset.to_model_input(view, mean, std)).float()
                margins.append(logits[:, 1] - logits[:, 0])
            out.append(torch.stack(margins).mean(0).cpu())
    network.train(was_training)
    return torch.cat(out).double().numpy() if out else np.zeros(0, dtype=np.float64)


def probabilities_from_logits(logits: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """P(positive class) from log-odds, calibrated: sigmoid(logit / temperature + bias)."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(logits, dtype=np.float64) / temperature + bias)))


def predict_probabilities(network: Any, pixels: Any, *, temperature: float = 1.0, bias: float = 0.0,
                          **kwargs: Any) -> np.ndarray:
    """P(positive class) for each image: `predict_logits` (which takes the other arguments)
    calibrated with the model's `temperature` and `bias` (`fit_calibration`)."""
    return probabilities_from_logits(predict_logits(network, pixels, **kwargs), temperature, bias)


def fit_calibration(labels: Sequence[int], logits: Sequence[float]) -> tuple[float, float]:
    """(temperature, bias) of the calibration sigmoid(logit / temperature + bias) with the lowest log
    loss on these images, the two classes weighed equally, as training weighs them (Platt scaling
    with balanced class weights). Its 0.5 is then the balanced point: where an image is as likely
    either class, whatever their shares on this split. It is fitted to every score, not to the
    edge of the gap an easy split leaves between the classes; a network that ranks well but whose
    log-odds sit off centre (a short run) gets its centre back. (1.0, 0.0) when the images hold
    one class, or when no rising slope fits them (a network that ranks the classes backwards, or
    barely better than chance)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels, dtype=int)
    z = np.asarray(logits, dtype=float).reshape(-1, 1)
    if len(set(y.tolist())) < 2:
        return 1.0, 0.0
    fit = LogisticRegression(C=1e6, class_weight="balanced", max_iter=1000).fit(z, y)
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if slope <= 0:
        return 1.0, 0.0
    return 1.0 / slope, intercept


def eval_batch_size(device: Any, pixels_per_image: int) -> int:
    """`config.EVAL_BATCH_SIZE` on a GPU; on a CPU, as many images as fit `config.CPU_EVAL_BATCH_PIXELS`."""
    if device.type != "cpu":
        return config.EVAL_BATCH_SIZE
    return max(1, min(config.EVAL_BATCH_SIZE, config.CPU_EVAL_BATCH_PIXELS // pixels_per_image))


def compute_metrics(labels: Sequence[int], probabilities: Sequence[float], threshold: float,
                    class_names: Sequence[str] = ("NORMAL", "PNEUMONIA")) -> dict[str, Any]:
    """Metrics of a binary classifier at `threshold`; label 1 is the positive class. `class_names`
    (the negative first) name the confusion matrix's rows and columns. A ratio over no images
    (specificity without negative images, ...) is NaN; `metrics_json` writes it as null."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    both_classes = len(set(y.tolist())) == 2
    return {
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if both_classes else float("nan"),
        "threshold": float(threshold),
        "n_images": len(y),
        "confusion_matrix": {"labels": list(class_names), "matrix": [[tn, fp], [fn, tp]]},
    }


def _why_undefined(metrics: dict[str, Any]) -> dict[str, str]:
    """For each metric of `compute_metrics` that can have no value on some images, why it has none
    on these (only those that have none)."""
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
    negative, positive = metrics["confusion_matrix"]["labels"]
    reasons = {}
    if tp + fn == 0:
        reasons["sensitivity"] = f"no {positive} images were evaluated, and it is the share of them found"
    if tn + fp == 0:
        reasons["specificity"] = f"no {negative} images were evaluated, and it is the share of them called {negative}"
    if tp + fp == 0:
        reasons["precision"] = f"no image was called {positive}, and it is the share of those that are {positive}"
    if tp + fp + fn == 0:
        reasons["f1"] = f"no image was {positive} or called {positive}"
    if tp + fn == 0 or tn + fp == 0:
        only = negative if tp + fn == 0 else positive
        for name in ("roc_auc", "pr_auc"):
            reasons[name] = f"the images are only {only} ones, and it ranks {positive} images against {negative} ones"
    if tn + fp + fn + tp == 0:
        reasons["accuracy"] = "no images were evaluated"
    return reasons


def _nan_to_null(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_null(v) for v in value]
    return value


def metrics_json(metrics: dict[str, Any]) -> str:
    """`metrics` as strict JSON, which has no NaN: a metric with no value on these images (say
    specificity when no NORMAL image was evaluated) is null, and `undefined` says why."""
    reasons = _why_undefined(metrics) if "confusion_matrix" in metrics else {}
    undefined = {name: reasons.get(name, "it has no value on these images")
                 for name, value in metrics.items() if isinstance(value, float) and not np.isfinite(value)}
    out = _nan_to_null(metrics)
    if undefined:
        out["undefined"] = undefined
    return json.dumps(out, indent=2, allow_nan=False) + "\n"


def choose_threshold(labels: Sequence[int], probabilities: Sequence[float], policy: str = "youden") -> float:
    """The decision threshold a `policy` picks on these (validation) images; 0.5 when they hold
    only one class.

    - 'balanced': 0.5 on probabilities calibrated with the classes weighed equally
      (`fit_calibration`): the balanced point, where either error costs the same. It comes from a
      fit to every validation score, so an easy split cannot push it to the edge of its gap.
    - 'equal-error': where sensitivity equals specificity on these images.
    - 'youden': the highest sensitivity + specificity (Youden's J). On a split the model separates
      almost perfectly, every threshold in the gap ties and this lands at its edge.
    - 'sensitivity-0.95': the highest threshold that still finds 95% of the positives.

    A fitted threshold lies halfway between two of the images' probabilities, so that no image sits
    exactly on it, where rounding (batch norms folded for evaluation) could flip it."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    if policy not in config.THRESHOLD_POLICIES:
        raise ValueError(f"unknown threshold policy {policy!r}: choose one of {', '.join(config.THRESHOLD_POLICIES)}")
    if policy == "balanced" or len(set(y.tolist())) < 2:
        return 0.5
    from sklearn.metrics import roc_curve

    if policy.startswith("sensitivity-"):
        return sensitivity_threshold(y, p, float(policy.split("-")[1]))
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr)) if policy == "youden" else int(np.argmin(np.abs(tpr - (1 - fpr))))
    upper = thresholds[best]
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    threshold = (upper + lower) / 2 if np.isfinite(upper) else 1.0
    return float(min(max(threshold, 0.0), 1.0))


@dataclass
class Evaluation:
    """What `evaluate_model` found: metrics, per-image results, and the data behind them."""

    metrics: dict[str, Any]
    labels: np.ndarray
    probabilities: np.ndarray
    names: list[str]
    class_names: tuple[str, str]
    images: Any  # the decoded pixels, for showing mistakes
    skipped: list[tuple[str, str]]
    patients: list[str] | None = None  # each image's patient; None: read from the file names
    model_metadata: dict[str, Any] | None = None  # the evaluated model's, for the model card

    def patient_ids(self) -> list[str]:
        return list(self.patients) if self.patients is not None else [dataset.patient_id(n) for n in self.names]

    def predictions_table(self) -> list[dict[str, Any]]:
        threshold = self.metrics["threshold"]
        return [
            {"image": name, "true": self.class_names[label], "predicted": self.class_names[int(prob >= threshold)],
             "probability": round(float(prob), 6), "correct": int(prob >= threshold) == label}
            for name, label, prob in zip(self.names, self.labels.tolist(), self.probabilities.tolist(), strict=True)
        ]

    def most_confident_mistakes(self, n: int = 8) -> list[int]:
        """Rows of the wrongly classified images, the most confidently wrong first."""
        pred = (self.probabilities >= self.metrics["threshold"]).astype(int)
        wrong = np.flatnonzero(pred != self.labels)
        confidence = np.abs(self.probabilities[wrong] - self.metrics["threshold"])
        return wrong[np.argsort(-confidence)][:n].tolist()


def trust_metrics(labels: Sequence[int], probabilities: Sequence[float], threshold: float, names: Sequence[str],
                  patients: Sequence[str], *, operating_points: Sequence[dict[str, float]] | None = None,
                  positive: str = "PNEUMONIA") -> dict[str, Any]:
    """What a reviewer asks after the metrics: their 95% intervals resampling patients
    (`uncertainty`), calibration (`calibration`), sensitivity and specificity at the model's
    operating points (`operating_points`; chosen on these images when the model file has none),
    sensitivity per subgroup and the metrics per patient (`subgroups`)."""
    return {
        "brier": calibration.brier_score(labels, probabilities),
        "ece": calibration.expected_calibration_error(labels, probabilities),
        "ece_method": calibration.ece_method(),
        "ci95": uncertainty.bootstrap_intervals(labels, probabilities, threshold, patients),
        "ci_method": uncertainty.ci_method(len(set(patients))),
        "operating_points": operating_points_on(labels, probabilities, patients, operating_points),
        "subgroups": subgroups.subgroup_results(labels, probabilities, threshold, names, patients, positive),
        "per_patient": subgroups.patient_results(labels, probabilities, threshold, patients),
    }


def evaluate_loaded(
    model: TrainedModel, data: dataset.LoadedImages, *, device: str = "auto", precision: str = "auto", tta: bool = False,
    adapt_batchnorm: bool = False,
) -> Evaluation:
    """Score decoded images with `model` in `precision` (see `model.inference_dtype`) and compute
    the metrics at the model's threshold, with `trust_metrics`; they record the precision computed
    in (`compute_precision`) and the validation's. With `adapt_batchnorm`, the network's batch
    norms are first adapted to these images (`adaptation.adapt_to_cohort`). metrics.json's
    `batchnorm_adapted` says whether the statistics scored with were adapted, here or by `xraylib
    adapt` before (the model file's record), and `batchnorm_adaptation` how."""
    torch_device = resolve_device(device)
    amp_dtype = inference_dtype(model, torch_device, precision)
    adaptation = probs = None
    if adapt_batchnorm:
        from xraylib.adaptation import adapt_to_cohort

        network, probs, adaptation = adapt_to_cohort(model, data.pixels, device=torch_device, amp_dtype=amp_dtype)
    else:
        network = inference_network(model.network.to(torch_device))
    if probs is None or tta:  # adapting scored the single view already
        probs = predict_probabilities(network, data.pixels, mean=model.mean, std=model.std, device=torch_device,
                                      amp_dtype=amp_dtype, tta=tta, temperature=model.temperature,
                                      bias=model.calibration_bias)
    labels = data.labels.numpy()
    names = [r.obj.location for r in data.records]
    patients = [r.patient for r in data.records]
    metrics = compute_metrics(labels, probs, model.threshold, class_names=data.class_names)
    metrics.update(trust_metrics(labels, probs, model.threshold, names, patients, operating_points=model.operating_points,
                                 positive=data.class_names[1]))
    metrics["compute_precision"] = precision_name(amp_dtype)
    if model.validation_precision is not None:  # model files from before it was recorded say nothing
        metrics["validation_precision"] = model.validation_precision
    metrics["tta_views"] = len(config.TTA_VIEWS) if tta else 1
    # What set the statistics these images were scored with: this evaluation, or `xraylib adapt` before it.
    record = model.metadata.get("batchnorm_adaptation")
    if adaptation is not None:
        from xraylib.adaptation import adaptation_record

        record = adaptation_record(adaptation, record)
    metrics["batchnorm_adapted"] = record is not None
    if record is not None:
        metrics["batchnorm_adaptation"] = record
    metrics["class_names"] = list(data.class_names)
    metrics["skipped_images"] = len(data.skipped)
    if model.location is not None:
        metrics["model"] = model.location
    return Evaluation(metrics, labels, probs, names, data.class_names, data.pixels, data.skipped, patients, model.metadata)


def write_evaluation(evaluation: Evaluation, out: str) -> dict[str, str]:
    """metrics.json, predictions.csv, the four pictures and model_card.md into `out`; returns where each went."""
    from xraylib import model_card, plots

    written = {}
    metrics_loc = storage.join(out, "metrics.json")
    storage.write_text(metrics_loc, metrics_json(evaluation.metrics))
    written["metrics"] = metrics_loc

    rows = evaluation.predictions_table()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "true", "predicted", "probability", "correct"])
    writer.writeheader()
    writer.writerows(rows)
    written["predictions"] = storage.join(out, "predictions.csv")
    storage.write_text(written["predictions"], buffer.getvalue())

    figures = {
        "confusion_matrix": plots.confusion_matrix_figure(evaluation.metrics, evaluation.class_names),
        "roc_curve": plots.roc_curve_figure(evaluation.labels, evaluation.probabilities, evaluation.metrics),
        "pr_curve": plots.pr_curve_figure(evaluation.labels, evaluation.probabilities),
        "calibration": plots.reliability_figure(evaluation.labels, evaluation.probabilities, evaluation.metrics),
    }
    for name, figure in figures.items():
        written[name] = storage.join(out, f"{name}.png")
        storage.write_bytes(written[name], plots.figure_png(figure))
    written["model_card"] = storage.join(out, config.MODEL_CARD_FILENAME)
    storage.write_text(written["model_card"], model_card.model_card_markdown(evaluation.metrics, evaluation.model_metadata))
    return written


def evaluate_model(
    model: str | TrainedModel,
    data: str,
    out: str | None = None,
    *,
    skip_bad: bool = False,
    device: str = "auto",
    precision: str = "auto",
    tta: bool = False,
    adapt_batchnorm: bool = False,
    progress: bool = False,
    labels: str | LabelTable | None = None,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """Evaluate a model (file, `train --out` location, or loaded) on the `test/` split of a
    dataset root, or on a folder of class folders, or on the images below `data` that the table
    `labels` labels (a location, read with its layout's columns, or a `LabelTable`; with a split column,
    its test rows); write the results to `out` if given. With
    `tta`, each probability is the mean over the views in `config.TTA_VIEWS` (5x the compute);
    the threshold stays the one chosen at training. With `adapt_batchnorm`, the batch norms are
    first adapted to the images evaluated (`adaptation.adapt_to_cohort`): each probability then
    depends on the cohort it was scored with. `precision` 'auto' scores in the precision
    training validated in (`model.inference_dtype`). Ends with one line to `log`: how many
    images, how long, and which files went where."""
    started = time.perf_counter()
    trained = load_model(model) if isinstance(model, str) else model
    index = index_images(data, split="test", labels=label_table(labels))
    if index.unmatched or index.ignored:
        log(f"found {index.describe()}")
    loaded = dataset.load_images(index, trained.image_size, equalize_mode=trained.equalize, skip_bad=skip_bad,
                                 progress=progress)
    evaluation = evaluate_loaded(trained, loaded, device=device, precision=precision, tta=tta,
                                 adapt_batchnorm=adapt_batchnorm)
    evaluation.metrics["data"] = index.root
    written = write_evaluation(evaluation, out) if out is not None else {}
    names = [location.rsplit("/", 1)[-1] for location in written.values()]
    adapted = evaluation.metrics.get("batchnorm_adaptation")
    if adapt_batchnorm:
        from xraylib.adaptation import describe

        log(f"batch norms adapted to the {adapted['images']} images ({describe(adapted)})")
    elif adapted is not None:
        log(f"the model's batch norms were adapted before, to {adapted['images']} images of "
            f"{', '.join(adapted['images_location'])} (xraylib adapt)")
    log(f"evaluated {len(evaluation.labels)} images{f' ({len(config.TTA_VIEWS)} views each)' if tta else ''} in "
        f"{time.perf_counter() - started:.1f} s" + (f"; wrote {', '.join(names[:-1])} and {names[-1]} to {out}" if names else ""))
    return evaluation

