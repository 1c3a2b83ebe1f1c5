"""Pictures: confusion matrix, ROC and PR curves, reliability diagram, Grad-CAM overlays, training
curves, image grids.

Each function returns a matplotlib Figure (a notebook shows it; `figure_png` turns it into bytes
to store). Figures are built on matplotlib's object API, so no global pyplot state or display
backend is touched.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_png(figure: Any, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def confusion_matrix_figure(metrics: dict[str, Any], class_names: Sequence[str]) -> Any:
    """Rows true class, columns predicted class, with counts and row percentages."""
    matrix = np.asarray(metrics["confusion_matrix"]["matrix"])
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    row_totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(2):
        for j in range(2):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, f"{matrix[i, j]}\n{100 * matrix[i, j] / row_totals[i, 0]:.1f}%", ha="center", va="center",
                    color=color, fontsize=12)
    ax.set_xticks([0, 1], labels=list(class_names))
    ax.set_yticks([0, 1], labels=list(class_names))
    ci = metrics.get("ci95") or {}
    ax.set_xlabel("predicted" + "".join(
        f"\n{name} {_value(metrics.get(name))} (95% CI {_interval(ci.get(name))})" for name in ("sensitivity", "specificity")
        if name in ci))
    ax.set_ylabel("true")
    accuracy_ci = f" (95% CI {_interval(ci['accuracy'])})" if "accuracy" in ci else ""
    ax.set_title(f"accuracy {_value(metrics['accuracy'])}{accuracy_ci}\nat threshold {metrics['threshold']:.2f}")
    return fig


def _value(value: Any) -> str:
    from xraylib.model_card import number

    return number(value if value is None else float(value), 3)


def _interval(bounds: Sequence[Any] | None) -> str:
    from xraylib.model_card import interval

    return interval(bounds, 3)


def roc_curve_figure(labels: Sequence[int], probabilities: Sequence[float], metrics: dict[str, Any] | None = None) -> Any:
    """The ROC curve; with an evaluation's `metrics`, marked at the model's threshold and at its
    operating points (their sensitivity and specificity on these images)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    if len(set(np.asarray(labels).tolist())) == 2:
        fpr, tpr, _ = roc_curve(labels, probabilities)
        ax.plot(fpr, tpr, label=f"ROC AUC {roc_auc_score(labels, probabilities):.3f}")
        if metrics is not None:
            y, p = np.asarray(labels), np.asarray(probabilities)
            marks = [(f"model threshold {metrics['threshold']:.2f}", metrics["threshold"], "o")]
            marks += [(f"sensitivity {pt['target_sensitivity']:.2f} point ({pt['threshold']:.2f})", pt["threshold"], m)
                      for pt, m in zip(metrics.get("operating_points") or [], "s^Dv", strict=False)]
            for label, threshold, marker in marks:
                called = p >= threshold
                ax.plot([called[y == 0].mean()], [called[y == 1].mean()], marker=marker, linestyle="none", markersize=7,
                        markerfacecolor="none", markeredgewidth=1.5, label=label)
        ax.legend(loc="lower right", fontsize=7)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC curve")
    return fig


def pr_curve_figure(labels: Sequence[int], probabilities: Sequence[float]) -> Any:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    if len(set(np.asarray(labels).tolist())) == 2:
        precision, recall, _ = precision_recall_curve(labels, probabilities)
        ax.plot(recall, precision, label=f"PR AUC {average_precision_score(labels, probabilities):.3f}")
        ax.axhline(float(np.mean(labels)), linestyle="--", color="grey", linewidth=1, label="chance")
        ax.legend(loc="lower left")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall curve")
    return fig


def reliability_figure(labels: Sequence[int], probabilities: Sequence[float], metrics: dict[str, Any] | None = None) -> Any:
    """Reliability diagram: per equal-width bin of P(positive), the share of positive images against
    the mean probability (the diagonal is perfect calibration), the bins' image counts below; the
    title gives the ECE and Brier score (with intervals, from an evaluation's `metrics`)."""
    from xraylib import calibration

    bins = calibration.reliability_bins(labels, probabilities)
    fig = _figure(4.6, 4.6)
    curve_ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve_ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    curve_ax.bar(bins.low, bins.positive_share, width=bins.high - bins.low, align="edge", alpha=0.3, edgecolor="C0",
                 label="share positive per bin")
    curve_ax.plot(bins.mean_probability, bins.positive_share, marker="o", color="C0", label="at the bin's mean probability")
    curve_ax.set_ylim(0, 1.02)
    curve_ax.set_ylabel("share of positive images")
    curve_ax.legend(loc="upper left", fontsize=7)
    ci = (metrics or {}).get("ci95") or {}
    ece = metrics.get("ece") if metrics else calibration.expected_calibration_error(labels, probabilities)
    brier = metrics.get("brier") if metrics else calibration.brier_score(labels, probabilities)
    curve_ax.set_title(f"ECE {_value(ece)}" + (f" ({_interval(ci['ece'])})" if "ece" in ci else "")
                       + f", Brier {_value(brier)}" + (f" ({_interval(ci['brier'])})" if "brier" in ci else ""), fontsize=9)
    count_ax.bar(bins.low, bins.count, width=bins.high - bins.low, align="edge", color="grey")
    count_ax.set_xlim(0, 1)
    count_ax.set_xlabel("predicted probability of the positive class")
    count_ax.set_ylabel("images")
    return fig


def training_curves_figure(history: Sequence[dict[str, Any]]) -> Any:
    """Training and validation loss per epoch; validation ROC AUC and accuracy. The accuracy is at
    the threshold chosen on validation that epoch, the one its model is saved with (at 0.5 for a
    history written before that was recorded, and labelled so)."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = _figure(9, 3.5)
    loss_ax, metric_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    loss_ax.set_title("loss")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.legend()
    metric_ax.plot(epochs, [h["val_roc_auc"] for h in history], marker="o", label="ROC AUC")
    at_threshold = all("val_accuracy_at_threshold" in h for h in history)
    metric_ax.plot(epochs, [h["val_accuracy_at_threshold" if at_threshold else "val_accuracy"] for h in history], marker="o",
                   label="accuracy at the chosen threshold" if at_threshold else "accuracy at threshold 0.5")
    metric_ax.set_ylim(0, 1.02)
    metric_ax.set_title("validation")
    metric_ax.set_ylabel("ROC AUC, accuracy")
    metric_ax.legend(loc="lower right")
    for ax in (loss_ax, metric_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.2, 1.4, ...
    return fig


def _fitting_fontsize(titles: Sequence[str], width_in: float, largest: float = 9, smallest: float = 6) -> float:
    """The largest font size (points) at which every line of `titles` fits `width_in` inches."""
    from matplotlib.textpath import TextPath

    lines = [line for title in titles for line in title.split("\n") if line]
    if not lines:
        return largest
    widest = max(TextPath((0, 0), line, size=1).get_extents().width for line in lines)  # points per point of size
    return max(smallest, min(largest, 0.92 * width_in * 72 / widest))


def image_grid_figure(pixels: Any, titles: Sequence[str], columns: int = 4) -> Any:
    """Grayscale images (uint8 [N, H, W]) in a grid, each with its title, whole: the font shrinks
    (down to 6 pt) until the longest title line fits its column."""
    n = len(titles)
    rows = max(1, -(-n // columns))
    width = 2.4
    fig = _figure(width * columns, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    fontsize = _fitting_fontsize(titles, width)
    for ax in axes:
        ax.axis("off")
    for ax, image, title in zip(axes, pixels, titles, strict=False):
        ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=fontsize)
    return fig


def _file_name(location: str) -> str:
    return location.rsplit("/", 1)[-1]


def sample_images_figure(data: Any, per_class: int = 4, seed: int = 0) -> Any:
    """A few images of each class with their labels and file names (`data`: dataset.LoadedImages)."""
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    rows = [int(i) for label in (0, 1) for i in rng.permutation(np.flatnonzero(labels == label))[:per_class]]
    titles = [f"{data.class_names[labels[i]]}\n{_file_name(data.records[i].obj.relpath)}" for i in rows]
    return image_grid_figure(data.pixels[rows], titles, columns=per_class)


def confident_mistakes_figure(evaluation: Any, n: int = 8) -> Any:
    """The images the model got wrong with the most confidence (`evaluation`: evaluate.Evaluation)."""
    rows = evaluation.most_confident_mistakes(n)
    names = evaluation.class_names
    titles = [
        f"{_file_name(evaluation.names[i])}\ntrue {names[evaluation.labels[i]]}\np({names[1]})={evaluation.probabilities[i]:.2f}"
        for i in rows
    ]
    if not rows:
        fig = _figure(4, 1)
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return fig
    return image_grid_figure(evaluation.images[rows], titles)


def grad_cam_figure(explanations: Sequence[Any], columns: int = 4, *, with_image: bool = False) -> Any:
    """Each image (`explain.Explanation`) with its Grad-CAM heat map laid over it, titled with its
    file name, the class the model gave, P(positive) and, when known, the true class; with
    `with_image`, the plain image beside each overlay."""
    n = len(explanations)
    if not n:
        fig = _figure(4, 1)
        fig.text(0.5, 0.5, "no images to explain", ha="center", va="center")
        return fig
    panels = [(e, plain) for e in explanations for plain in ((True, False) if with_image else (False,))]
    columns = max(1, min(columns * (2 if with_image else 1), len(panels)))
    rows = -(-len(panels) // columns)
    width = 2.8
    fig = _figure(width * columns + 1.2, 3.1 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    titles = [f"{_file_name(e.name)}\n" + ("the image" if plain else f"said {e.predicted}, p={e.probability:.2f}")
              + (f"\ntrue {e.true}" if e.true and not plain else "") for e, plain in panels]
    fontsize = _fitting_fontsize(titles, width)
    for ax in axes:
        ax.axis("off")
    shown = None
    for ax, (explanation, plain), title in zip(axes, panels, titles, strict=False):
        ax.imshow(explanation.pixels, cmap="gray", vmin=0, vmax=255)
        if not plain:
            shown = ax.imshow(explanation.heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(title, fontsize=fontsize)
    side = explanations[0].heat.shape[-1]
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=shown.norm, cmap=shown.cmap), ax=list(axes[:len(panels)]), shrink=0.7,
                 label=f"Grad-CAM: evidence for the class given\n(one cell per 32 px: {max(1, side // 32)} x "
                       f"{max(1, side // 32)} at {side} px)")
    return fig
