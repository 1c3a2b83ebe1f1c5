"""The model card: what a model is for, what it was trained on, how good it is and how sure that is.

`model_card_markdown` writes, from an evaluation's metrics (metrics.json's content) and the model
file's metadata, a Markdown page: intended and not-intended use, the training data and its split,
preprocessing, training parameters, the metrics with their 95% intervals, calibration, operating
points, subgroups, results per patient, and the known limits. `evaluate` writes it as
`model_card.md` beside metrics.json; the test notebook renders it. Every number on it is read from
those two sources, so the card and metrics.json cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from xraylib.adaptation import describe

HEADLINE = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc", "brier", "ece")


def number(value: Any, digits: int = 4) -> str:
    """A metric as the card (and the notebook's tables) print it: 4 decimals; n/a for no value."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def interval(bounds: Sequence[Any] | None, digits: int = 4) -> str:
    """'0.8123 – 0.9011', or n/a."""
    if not bounds or bounds[0] is None or bounds[1] is None:
        return "n/a"
    return f"{number(bounds[0], digits)} – {number(bounds[1], digits)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows), ""]


def model_card_markdown(metrics: Mapping[str, Any], metadata: Mapping[str, Any] | None) -> str:
    """The model card of a model (`metadata`, its model file's; None when unknown) evaluated with
    `metrics` (an `evaluate.Evaluation`'s metrics, or metrics.json read back)."""
    metadata = metadata or {}
    train = metadata.get("train_config") or {}
    negative, positive = metrics.get("class_names") or metadata.get("class_names") or ("NORMAL", "PNEUMONIA")
    prep = metadata.get("preprocessing") or {}
    counts = metadata.get("data_counts") or {}
    ci = metrics.get("ci95") or {}
    undefined = metrics.get("undefined") or {}
    lines = [f"# Model card: ResNet50 {negative} / {positive} chest X-ray classifier", ""]
    lines += [f"- Model file: `{metrics.get('model') or 'not recorded (a model passed in memory)'}`",
              f"- Created: {metadata.get('created', 'not recorded')}; library versions: "
              + (", ".join(f"{k} {v}" for k, v in (metadata.get("versions") or {}).items()) or "not recorded"),
              f"- Evaluated on: `{metrics.get('data', 'not recorded')}` ({metrics.get('n_images')} images"
              + (f", {metrics['per_patient']['n_patients']} patients" if metrics.get("per_patient") else "") + ")", ""]

    lines += ["## Intended use", "",
              f"Research and teaching: ranking frontal paediatric chest X-rays by the probability of {positive}, "
              "to study how such a classifier behaves, as a second reader whose output a qualified person checks, on "
              "images like those it was trained on (the Kaggle *Chest X-Ray Images (Pneumonia)* layout: frontal films "
              "of children).", "",
              "## Not intended use", "",
              "- Diagnosis, triage or any clinical decision without a radiologist: it is not a medical device and "
              "has not been validated prospectively.",
              "- Adults, lateral views, CT, or images from a scanner, hospital or protocol it has not been evaluated on "
              "(see the limits below).",
              f"- Telling bacterial from viral pneumonia: it gives one {positive} probability; the subgroups below "
              "only report how often each is found.", ""]

    lines += ["## Training data and split", ""]
    if train:
        lines += [f"- Training data: `{train.get('data')}`, its `train/` split.",
                  f"- Validation: {100 * float(train.get('val_fraction', 0)):.0f}% of the patients held out of `train/` "
                  "by patient "
                  f"(seed {train.get('seed')}); {counts.get('train', '?')} training and {counts.get('val', '?')} "
                  "validation images. The epoch (best validation ROC AUC), the calibration, the threshold "
                  f"(policy `{metadata.get('threshold_policy', '?')}`) and the operating points were chosen there.", ""]
    else:
        lines += ["Not recorded: this model file carries no training configuration.", ""]

    lines += ["## Preprocessing", ""]
    lines += [f"Decoded to grayscale, resized ({prep.get('resize', '?')}) to {prep.get('image_size', '?')} x "
              f"{prep.get('image_size', '?')} px, contrast normalization `{prep.get('equalize', 'none')}`, repeated on "
              f"three channels and normalized with mean {prep.get('mean')} and std {prep.get('std')}. Probabilities are "
              f"calibrated: sigmoid(log-odds / {number(float(metadata.get('temperature', 1.0)))} + "
              f"{number(float(metadata.get('calibration_bias', 0.0)))}).", ""]

    lines += ["## Training parameters", ""]
    lines += _table(("parameter", "value"), [(k, f"`{v}`") for k, v in train.items()]) if train else ["Not recorded.", ""]

    lines += ["## Metrics on the evaluation images", "",
              f"At the model's threshold {number(metrics.get('threshold'))} (computed in "
              f"{metrics.get('compute_precision', '?')}). 95% intervals: {metrics.get('ci_method', 'not computed')}.", ""]
    adapted = metrics.get("batchnorm_adaptation")
    if adapted and "images_location" in adapted:
        lines += [f"The model's batch norms were adapted to {adapted['images']} images of "
                  f"{', '.join(f'`{where}`' for where in adapted['images_location'])} without their labels before this "
                  f"evaluation (`xraylib adapt`, {adapted['adapted']}: {describe(adapted)}); each film is scored alone. "
                  "Where those are the evaluation's own images, the numbers are those of `--adapt-batchnorm`.", ""]
    elif adapted:
        lines += [f"Scored with the batch norms adapted to these {adapted['images']} images, without their labels "
                  f"(`--adapt-batchnorm`: {describe(adapted)}): each probability depends on the images "
                  "scored with it, so a single film scored alone gets another one.", ""]
    rows = [(name, number(metrics.get(name)), interval(ci.get(name)), undefined.get(name, ""))
            for name in HEADLINE if name in metrics]
    lines += _table(("metric", "value", "95% interval", "note"), rows)
    matrix = (metrics.get("confusion_matrix") or {}).get("matrix")
    if matrix:
        (tn, fp), (fn, tp) = matrix
        lines += [f"Confusion matrix: {tp} {positive} found, {fn} missed; {tn} {negative} cleared, {fp} false alarms.", ""]

    lines += ["## Calibration", "",
              f"Brier score {number(metrics.get('brier'))} ({interval(ci.get('brier'))}); expected calibration error "
              f"{number(metrics.get('ece'))} ({interval(ci.get('ece'))}), {metrics.get('ece_method', '')}. "
              "The reliability diagram is `calibration.png`.", ""]

    points = metrics.get("operating_points") or []
    lines += ["## Operating points", ""]
    if points:
        where = {p.get("chosen_on") for p in points}
        lines += [f"Thresholds chosen on {', '.join(sorted(w for w in where if w))} for each target sensitivity; "
                  "sensitivity and specificity measured on the evaluation images.", ""]
        lines += _table(("target sensitivity", "threshold", "sensitivity", "95% interval", "specificity", "95% interval"),
                        [(number(p["target_sensitivity"], 2), number(p["threshold"]), number(p.get("sensitivity")),
                          interval(p["ci95"].get("sensitivity")), number(p.get("specificity")),
                          interval(p["ci95"].get("specificity"))) for p in points])
    else:
        lines += ["None.", ""]

    groups = metrics.get("subgroups") or {}
    lines += ["## Subgroups", "", f"Sensitivity per kind of {positive}, as the file names say:", ""]
    lines += _table(("subgroup", "images", "patients", "sensitivity", "95% interval", "note"),
                    [(k, v["n_images"], v["n_patients"], number(v.get("sensitivity")), interval(v.get("ci95")),
                      v.get("undefined", "")) for k, v in groups.items()])
    patient = metrics.get("per_patient")
    if patient:
        lines += ["## Per patient", "",
                  f"A patient is {positive} when any of its images is, and its score is its images' highest probability "
                  f"({patient['n_patients']} patients, {patient['positive_patients']} {positive}).", ""]
        lines += _table(("metric", "value", "95% interval"),
                        [(k, number(patient.get(k)), interval(patient["ci95"].get(k))) for k in patient["ci95"]])

    lines += ["## Known limits", "",
              "- **Held-out patients of `train/` overstate results on a new cohort.** A validation split, or a test "
              "folder carved from `train/`, holds other children of the same hospital, scanner and period; on the "
              "dataset's official test split (a later cohort) the same cpu-preset recipe fell from 0.971 accuracy and "
              "0.970 specificity on held-out patients to 0.803 and 0.483 (README, *Results on real chest X-rays* and "
              "its shift benchmark). Measure on images of the site it is meant for before trusting these numbers there; "
              "`xraylib evaluate --adapt-batchnorm` scores such a cohort with the network's statistics adapted to it.",
              "- The intervals count the luck of which patients were drawn, not a change of scanner, protocol or "
              "population, nor the choices made on this same data. Where no error of a kind was seen (a specificity "
              "of 1.0), the interval shrinks to a point: no such error among these patients, not none possible "
              "(with n such patients, up to about 3/n would go unseen 95% of the time).",
              "- The probabilities are calibrated for as many normal as pneumonia films (the weighting training uses); "
              "at another prevalence the same probability means correspondingly more or less, and the calibration "
              "error above is measured at this evaluation's prevalence.",
              "- The labels are those of the dataset's folders, one reading per film; the subgroups come from file "
              "names, not from laboratory confirmation.",
              "- Heat maps (`xraylib explain`) show where the network's evidence lies, not why; a map on the film's "
              "edge or markers is a warning sign, not an explanation.", ""]
    return "\n".join(lines)
