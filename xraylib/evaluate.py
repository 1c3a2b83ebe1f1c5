"""Prediction and metrics: what a model says about images, and how good that is.

`predict_probabilities` runs the network over decoded pixels (training's validation uses it
too). `compute_metrics` gives accuracy, sensitivity (recall of the positive class),
specificity, precision, F1, ROC AUC and PR AUC at a threshold, plus the confusion matrix with
rows true and columns predicted. `choose_threshold` picks the threshold on validation data.
`evaluate_model` and `predict_images` are what the test notebook and the CLI call.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xraylib import config, dataset, storage
from xraylib.errors import DatasetError
from xraylib.model import TrainedModel, autocast, autocast_dtype, inference_network, load_model, resolve_device


def predict_probabilities(
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
    """P(positive class) for each uint8 [H, W] image in `pixels` ([N, H, W]); with `tta`, the
    mean over the views in `config.TTA_VIEWS`. `batch_size` defaults to `eval_batch_size`'s."""
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
            probs = [torch.softmax(network(dataset.to_model_input(v, mean, std)).float(), dim=1)[:, 1] for v in views]
            out.append(torch.stack(probs).mean(0).cpu())
    network.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def eval_batch_size(device: Any, pixels_per_image: int) -> int:
    """`config.EVAL_BATCH_SIZE` on a GPU; on a CPU, as many images as fit `config.CPU_EVAL_BATCH_PIXELS`."""
    if device.type != "cpu":
        return config.EVAL_BATCH_SIZE
    return max(1, min(config.EVAL_BATCH_SIZE, config.CPU_EVAL_BATCH_PIXELS // pixels_per_image))


def compute_metrics(labels: Sequence[int], probabilities: Sequence[float], threshold: float) -> dict[str, Any]:
    """Metrics of a binary classifier at `threshold`; label 1 is the positive class."""
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
        "confusion_matrix": {"labels": [0, 1], "matrix": [[tn, fp], [fn, tp]]},
    }


def choose_threshold(labels: Sequence[int], probabilities: Sequence[float]) -> float:
    """A threshold that maximizes sensitivity + specificity (Youden's J) on these images,
    halfway between two of their probabilities; 0.5 when they hold only one class."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels, dtype=int)
    if len(set(y.tolist())) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, np.asarray(probabilities, dtype=float), drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    upper = thresholds[best]
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    # Halfway to the next lower probability: the same decisions on these images, but no image sits
    # exactly on the threshold, where rounding (batch norms folded for evaluation) could flip it.
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


def evaluate_loaded(
    model: TrainedModel, data: dataset.LoadedImages, *, device: str = "auto", precision: str = "auto", tta: bool = False
) -> Evaluation:
    torch_device = resolve_device(device)
    network = inference_network(model.network.to(torch_device))
    probs = predict_probabilities(network, data.pixels, mean=model.mean, std=model.std, device=torch_device,
                                  amp_dtype=autocast_dtype(torch_device, precision), tta=tta)
    labels = data.labels.numpy()
    metrics = compute_metrics(labels, probs, model.threshold)
    metrics["tta_views"] = len(config.TTA_VIEWS) if tta else 1
    metrics["class_names"] = list(data.class_names)
    metrics["skipped_images"] = len(data.skipped)
    return Evaluation(metrics, labels, probs, [r.obj.location for r in data.records], data.class_names,
                      data.pixels, data.skipped)


def write_evaluation(evaluation: Evaluation, out: str) -> dict[str, str]:
    """metrics.json, predictions.csv and the three pictures into `out`; returns where each went."""
    from xraylib import plots

    written = {}
    metrics_loc = storage.join(out, "metrics.json")
    storage.write_text(metrics_loc, json.dumps(evaluation.metrics, indent=2) + "\n")
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
        "roc_curve": plots.roc_curve_figure(evaluation.labels, evaluation.probabilities),
        "pr_curve": plots.pr_curve_figure(evaluation.labels, evaluation.probabilities),
    }
    for name, figure in figures.items():
        written[name] = storage.join(out, f"{name}.png")
        storage.write_bytes(written[name], plots.figure_png(figure))
    return written


def evaluate_model(
    model: str | TrainedModel,
    data: str,
    out: str | None = None,
    *,
    skip_bad: bool = False,
    device: str = "auto",
    tta: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """Evaluate a model (file, `train --out` location, or loaded) on the `test/` split of a
    dataset root, or on a folder of class folders; write the results to `out` if given. With
    `tta`, each probability is the mean over the views in `config.TTA_VIEWS` (5x the compute);
    the threshold stays the one chosen at training. Ends with one line to `log`: how many
    images, how long, and which files went where."""
    started = time.perf_counter()
    trained = load_model(model) if isinstance(model, str) else model
    index = dataset.list_images(data, split="test")
    loaded = dataset.load_images(index, trained.image_size, skip_bad=skip_bad, progress=progress)
    evaluation = evaluate_loaded(trained, loaded, device=device, tta=tta)
    written = write_evaluation(evaluation, out) if out is not None else {}
    names = [location.rsplit("/", 1)[-1] for location in written.values()]
    log(f"evaluated {len(evaluation.labels)} images{f' ({len(config.TTA_VIEWS)} views each)' if tta else ''} in "
        f"{time.perf_counter() - started:.1f} s" + (f"; wrote {', '.join(names[:-1])} and {names[-1]} to {out}" if names else ""))
    return evaluation


@dataclass(frozen=True)
class Prediction:
    image: str
    label: str
    probability: float  # of the positive class

    def __str__(self) -> str:
        return f"{self.image}\t{self.label}\t{self.probability:.4f}"


def predict_images(model: str | TrainedModel, images: str | Path | Sequence[str | Path], *, skip_bad: bool = False,
                   log: Callable[[str], None] = print) -> list[Prediction]:
    """Classify images, local or S3: `images` is one location or several, each an image file, or a
    folder or prefix that stands for every image below it. Probability is of the positive class. A
    bad image raises ImageDecodeError naming it, unless `skip_bad`, which leaves it out and reports
    it via `log`."""
    import torch

    locations = [images] if isinstance(images, str | Path) else images  # one string is one location, not its letters
    names, ignored = dataset.find_images([str(i) for i in locations])
    if ignored:
        log(f"ignored {len(ignored)} non-image file(s)")
    if not names:
        return []  # nothing asked for (the test notebook's default)
    trained = load_model(model) if isinstance(model, str) else model
    kept, skipped = dataset.decode_each(
        lambda location: dataset.decode_image(storage.read_bytes(location), trained.image_size, location),
        names, skip_bad=skip_bad)
    dataset.report_skipped(skipped, log)
    if not kept:
        raise DatasetError(f"none of the {len(names)} images could be decoded: the reasons are listed above")
    pixels = torch.from_numpy(np.stack([r for _, r in kept]))
    # Folding the batch norms costs a fraction of a second: worth it for a batch, not for one image.
    network = inference_network(trained.network) if len(kept) >= 16 else trained.network
    probs = predict_probabilities(network, pixels, mean=trained.mean, std=trained.std)
    return [Prediction(name, trained.class_names[int(p >= trained.threshold)], float(p))
            for (name, _), p in zip(kept, probs.tolist(), strict=True)]
