"""Write notebooks/train_classifier.ipynb, test_classifier.ipynb and sagemaker_training_job.ipynb from the cells below.

The notebooks are committed without outputs. Edit them here and run
`.venv/bin/python tools/build_notebooks.py`; `--check` exits 1 when the committed files differ
(tests/test_notebooks.py runs that check). Every code cell only calls into xraylib and shows the
result; the first code cell, tagged `parameters`, holds every knob (papermill overrides it).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import nbformat

from xraylib import config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"

# The metadata JupyterLab writes into a notebook once its kernel is up: the kernelspec it started
# and the kernel's language_info. The committed files carry exactly that, or JupyterLab marks an
# untouched notebook modified the moment it opens it. ipykernel reports the version of the Python
# it runs; this is the project's (the .venv that `make` creates on the CI machine). Under another
# Python the notebooks open and run all the same, and only the modified mark comes back.
# tests/test_notebooks.py compares the files with what a kernel of the test's environment reports.
PYTHON_VERSION = "3.11.7"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
LANGUAGE_INFO = {
    "name": "python",
    "version": PYTHON_VERSION,
    "mimetype": "text/x-python",
    "codemirror_mode": {"name": "ipython", "version": 3},
    "pygments_lexer": "ipython3",
    "nbconvert_exporter": "python",
    "file_extension": ".py",
}

# The training knobs of a parameters cell, one per TrainConfig field but data, out and resume (each
# notebook says what those mean for it): the train notebook and the SageMaker one share them.
def keyword_arguments(names: list[str], indent: str = "    ", width: int = 116) -> str:
    """`name=name, ...` for every name, wrapped as a call's arguments in a cell."""
    lines, line = [], ""
    for name in names:
        item = f"{name}={name},"
        if line and len(indent) + len(line) + 1 + len(item) > width:
            lines.append(indent + line)
            line = item
        else:
            line = f"{line} {item}" if line else item
    return "\n".join([*lines, indent + line])


# Every training knob passed on by name, in TrainConfig's order: the train and SageMaker notebooks' calls.
TRAIN_ARGUMENTS = keyword_arguments([f.name for f in dataclasses.fields(config.TrainConfig)])

TRAIN_KNOBS = """# None takes the default from xraylib.config, or from the preset.
preset = None  # "cpu" (small, from scratch) or "gpu" (ImageNet weights, 224 px)
epochs = None
image_size = None  # pixels per side
time_budget = None  # e.g. "30m": size image_size and epochs to fill it on this machine (the cpu preset does)
batch_size = None
lr = None  # peak learning rate of the one-cycle schedule
weight_decay = None
weights = None  # "imagenet", "none", or a weights file (local or s3://) when offline
freeze_backbone = None  # True trains only the new two-class head
augment = None  # "none", "geometry", "acquisition" or "collimation" (`xraylib train --help`); True: the default
equalize = None  # "none" or "histogram": contrast normalization, kept in the model file
threshold_policy = None  # "balanced" (0.5), "equal-error", "youden" or "sensitivity-0.95": how the threshold is set
label_smoothing = None
ema_decay = None  # e.g. 0.995 to keep a moving average of the weights; 0 is off
keep_epochs = None  # True also writes every epoch's model to out/epochs/, to choose one later
val_fraction = None  # share of patients held out for validation
seed = None
device = None  # "auto", "cpu" or "cuda"
precision = None  # "auto", "fp32", "bf16" or "fp16"
skip_bad = None  # True skips (and reports) images that cannot be decoded

# Labels from a table instead of class folders: a CSV (local or s3://) naming images below `data`.
# NIH ChestX-ray14's Data_Entry_2017.csv and RSNA's stage_2_train_labels.csv need no more than this.
labels = None
image_column = None  # the column naming each image (a path below `data`, with or without extension)
label_column = None  # the column of labels ("Infiltration|Pneumonia" lists several)
positive = None  # the label of the positive class
patient_column = None  # the column naming the patient (the validation split keeps each on one side)
split_column = None  # a column saying train or test; training reads the train rows
"""

TRAIN = [
    ("markdown", """# Train the pneumonia classifier

Trains a ResNet50 to tell NORMAL from PNEUMONIA chest X-rays. The data is the Kaggle
*Chest X-Ray Images (Pneumonia)* layout, `train/<NORMAL|PNEUMONIA>/*.jpeg`, in a local folder or
under an `s3://bucket/prefix`. A validation split is held out from `train/` by patient; the model
of the epoch with the best validation ROC AUC (on a tie, the lower validation loss) is saved to
`out` as `model.pt`, with its decision threshold, next to `checkpoint.pt`, `history.json` and
`training_curves.png`.

Set the parameters below and run all cells, or run the notebook headless:
`xraylib run train -p data s3://BUCKET/chest_xray -p out s3://BUCKET/runs/resnet50 -p epochs 3`.
S3 credentials come from the environment (AWS profile, SageMaker role), never from this notebook."""),
    ("parameters", """# Where the images are and where the results go: a local folder or s3://bucket/prefix.
data = "chest_xray"  # the dataset root, holding train/NORMAL and train/PNEUMONIA
out = "runs/resnet50"  # model.pt, checkpoint.pt, history.json and training_curves.png go here

""" + TRAIN_KNOBS + """resume = None  # True continues the run in `out` from its last finished epoch"""),
    ("code", """%matplotlib inline
from IPython.display import display

from xraylib import config, plots
from xraylib.labels import index_images, label_table
from xraylib.notebooks import class_counts_table, metrics_table, settings_table
from xraylib.training import train"""),
    ("code", "cfg = config.make_train_config(\n" + TRAIN_ARGUMENTS + "\n)\ndisplay(settings_table(cfg))"),
    ("markdown", """## The data

Images per class in the `train/` folder (or the train rows of the `labels` table), and what was
left out: non-image files, and rows and images the table could not pair."""),
    ("code", """index = index_images(cfg.data, split="train", labels=label_table(
    cfg.labels, image_column=cfg.image_column, label_column=cfg.label_column, positive=cfg.positive,
    patient_column=cfg.patient_column, split_column=cfg.split_column))
print(index.describe())
display(class_counts_table({"train/": index}))"""),
    ("markdown", """## Training

A bar for loading the images, then one per epoch, each left with its count and time when done.
After each epoch, a line: the training and validation loss, the validation ROC AUC, and the
validation accuracy at the threshold chosen on validation that epoch, the one its model would be
saved with. Every epoch is checkpointed, so an interrupted run continues with `resume=True`."""),
    ("code", "result = train(cfg, progress=True)"),
    ("markdown", """## Splits

The validation images come from patients who have no image in the training split."""),
    ("code", """display(class_counts_table({"train": result.data.train, "validation": result.data.val}))"""),
    ("markdown", "## Sample training images"),
    ("code", "display(plots.sample_images_figure(result.data.train))"),
    ("markdown", "## Training curves"),
    ("code", "display(plots.training_curves_figure(result.history))"),
    ("markdown", """## The saved model

Validation metrics of the best epoch, at the threshold chosen on validation. Evaluate it on the
`test/` split with `test_classifier.ipynb`."""),
    ("code", """print(f"best epoch {result.best_epoch} of {len(result.history)}; model saved to {result.model_location}")
display(metrics_table(result.val_metrics, title="validation"))"""),
]

TEST = [
    ("markdown", """# Evaluate the pneumonia classifier

Evaluates a trained model on the `test/` split (images it has never seen) at the decision
threshold chosen on validation. Every metric comes with a 95% interval from a bootstrap that
resamples patients (a patient's images are not independent). Then: calibration, the operating
points stored in the model file, sensitivity per subgroup, a paired comparison with a second model,
Grad-CAM heat maps of what the network looks at, and the model card. Writes `metrics.json`,
`predictions.csv`, `confusion_matrix.png`, `roc_curve.png`, `pr_curve.png`, `calibration.png` and
`model_card.md` to `out`.

Then classifies the images of `new_images`, which need no class folders: new scans, or
Kaggle's `val/` split of 16 images (`chest_xray/val`).

Headless:

```sh
xraylib run test -p model s3://BUCKET/runs/resnet50 -p data s3://BUCKET/chest_xray \\
    -p out s3://BUCKET/runs/resnet50/evaluation -p new_images s3://BUCKET/chest_xray/val
```"""),
    ("parameters", """model = "runs/resnet50"  # a model file, or the `out` of a training run (local or s3://)
data = "chest_xray"  # the dataset root holding test/, or a folder of class folders
out = "runs/resnet50/evaluation"  # where metrics.json, predictions.csv, the pictures and model_card.md go
tta = False  # True averages over slightly rotated and zoomed views: 5x the compute
adapt_batchnorm = False  # True adapts the batch norms to these images first (a new scanner or site; README)
compare_with = None  # a second model (file or training `out`) to compare with on the same images; None: the model itself
new_images = []  # an image, a folder or s3:// prefix of images, or a list of those; [] for none

# Labels from a table instead of class folders (as in training); with a split column, its test rows.
labels = None  # a CSV (local or s3://) naming images below `data`
image_column = None
label_column = None
positive = None
patient_column = None
split_column = None"""),
    ("code", """%matplotlib inline
from IPython.display import Markdown, display

from xraylib import plots
from xraylib.compare import compare_evaluations
from xraylib.evaluate import evaluate_model
from xraylib.explain import explain_rows, rows_to_explain
from xraylib.labels import label_table
from xraylib.model import load_model
from xraylib.model_card import model_card_markdown
from xraylib.notebooks import (
    class_counts_table,
    comparison_table,
    metrics_table,
    operating_points_table,
    predictions_table,
    subgroups_table,
)
from xraylib.predict import predict_images"""),
    ("code", """trained = load_model(model)
table = label_table(labels, image_column=image_column, label_column=label_column, positive=positive,
                    patient_column=patient_column, split_column=split_column)
evaluation = evaluate_model(trained, data, out, tta=tta, adapt_batchnorm=adapt_batchnorm, progress=True,
                            labels=table)"""),
    ("code", """display(class_counts_table({"test": evaluation}))"""),
    ("markdown", """## Metrics

With 95% intervals: 2,000 bootstrap resamples of the patients (`metrics.json`'s `ci_method`). Then
the same per patient: a patient is positive when any of its images is, and its score is its
images' highest probability."""),
    ("code", """display(metrics_table(evaluation.metrics, title="test images"))
display(metrics_table(evaluation.metrics["per_patient"], title="test patients"))"""),
    ("markdown", "## Confusion matrix\n\nRows: the true class; columns: what the model said."),
    ("code", "display(plots.confusion_matrix_figure(evaluation.metrics, evaluation.class_names))"),
    ("markdown", """## ROC and precision-recall curves

The ROC curve marks the model's threshold and the operating points for target sensitivities,
chosen on validation and stored in the model file; the table gives what they reach on the test images."""),
    ("code", "display(plots.roc_curve_figure(evaluation.labels, evaluation.probabilities, evaluation.metrics))"),
    ("code", "display(operating_points_table(evaluation.metrics))"),
    ("code", "display(plots.pr_curve_figure(evaluation.labels, evaluation.probabilities))"),
    ("markdown", """## Calibration

Are the probabilities honest? Per bin of predicted probability, the share that was pneumonia; on
the diagonal, a probability of 0.8 is right 80% of the time."""),
    ("code", "display(plots.reliability_figure(evaluation.labels, evaluation.probabilities, evaluation.metrics))"),
    ("markdown", "## Subgroups\n\nSensitivity per kind of pneumonia, as the file names say."),
    ("code", "display(subgroups_table(evaluation.metrics))"),
    ("markdown", """## Comparison

`compare_with`'s model against this one on the same images: each metric's difference with a 95%
interval from the same patient resamples for both (`xraylib compare` on the command line). Without
`compare_with`, the model is compared with itself, and every difference is 0."""),
    ("code", """other = (evaluate_model(compare_with, data, tta=tta, adapt_batchnorm=adapt_batchnorm, labels=table)
         if compare_with else None)
comparison = compare_evaluations(evaluation, other or evaluation)
display(comparison_table(comparison))"""),
    ("markdown", "## The most confidently wrong images"),
    ("code", "display(plots.confident_mistakes_figure(evaluation))"),
    ("markdown", """## What the network looks at

Grad-CAM of the last convolutional stage: where the evidence for the class the model gave lies,
for the most confident mistakes and the most confidently right images of each class
(`xraylib explain` draws them for any image)."""),
    ("code", "display(plots.grad_cam_figure(explain_rows(trained, evaluation, rows_to_explain(evaluation))))"),
    ("markdown", "## Model card\n\nAlso written to `out` as `model_card.md`."),
    ("code", "display(Markdown(model_card_markdown(evaluation.metrics, trained.metadata)))"),
    ("markdown", "## New images\n\nThe class the model gives each image of `new_images`, at the same threshold."),
    ("code", """predictions = predict_images(trained, new_images)
display(predictions_table(predictions))"""),
]

SAGEMAKER = [
    ("markdown", """# Train on SageMaker

Runs the training of `train_classifier.ipynb` as a SageMaker Training Job: on `instance_count`
instances of `instance_type`, under torchrun on every GPU of each, on spot capacity if `spot`.
The job reads the images from `data` and writes `model.pt`, `history.json` and
`training_curves.png` to `out`. Its checkpoints go to `out`/checkpoints after every epoch, and a
job that is interrupted (spot) or launched again with the same `out` resumes from there.

Needs the SageMaker Python SDK (`pip install 'xraylib[sagemaker]'`), AWS credentials and a
region, and a role SageMaker may assume: `role`, or in SageMaker Studio the notebook's execution
role. Headless: `xraylib run sagemaker -p data s3://BUCKET/chest_xray -p out s3://BUCKET/runs/job`,
or from a shell `xraylib sagemaker train --data ... --out ... --instance-type ml.g5.xlarge`."""),
    ("parameters", """# Where the images are and where the results go: s3://bucket/prefix (a job reads and writes S3).
data = "s3://my-bucket/chest_xray"  # the dataset root, holding train/NORMAL and train/PNEUMONIA
out = "s3://my-bucket/runs/job"  # model.pt, history.json, training_curves.png; checkpoints in out/checkpoints

# The job. None takes the default from xraylib.config.
instance_type = "ml.g5.xlarge"  # one NVIDIA A10G; ml.g5.12xlarge has four
instance_count = 1  # instances, one torchrun node each
spot = False  # True: spot capacity, cheaper but may be interrupted; the job then resumes from its checkpoint
max_run = None  # e.g. "4h": the longest the job may train
max_wait = None  # with spot: the longest the job may take, waits for capacity included
role = None  # an IAM role ARN; None: the caller's own (in SageMaker Studio, the notebook's execution role)
image_uri = None  # None: AWS's prebuilt PyTorch training container for the installed torch

""" + TRAIN_KNOBS + """resume = None  # changes nothing: a job always resumes from out/checkpoints"""),
    ("code", """%matplotlib inline
from IPython.display import display

from xraylib import config, plots
from xraylib.notebooks import metrics_table, settings_table
from xraylib.sagemaker import launch_training_job, read_job_results"""),
    ("code", "train_values = dict(\n" + TRAIN_ARGUMENTS
     + "\n)\ndisplay(settings_table(config.make_train_config(**train_values)))"),
    ("markdown", """## The job

Its name and console link, then its log as it comes (SageMaker's, then the training's: one line
per epoch), and at the end its status, billable seconds and, on spot, the savings."""),
    ("code", """job = launch_training_job(train_values, instance_type=instance_type, instance_count=instance_count, spot=spot,
                          max_run=max_run, max_wait=max_wait, role=role, image_uri=image_uri)"""),
    ("markdown", "## Training curves\n\nRead from `out`, where the job left them."),
    ("code", """results = read_job_results(out)
display(plots.training_curves_figure(results.history))"""),
    ("markdown", """## The saved model

Validation metrics of the best epoch, at the threshold chosen on validation. Evaluate it on the
`test/` split with `test_classifier.ipynb` (`model` = `out`)."""),
    ("code", """print(f"best epoch {results.best_epoch} of {len(results.history)}; model saved to {results.model_location}")
display(metrics_table(results.val_metrics, title="validation"))"""),
]


def build(cells: list[tuple[str, str]], prefix: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": copy.deepcopy(LANGUAGE_INFO)}
    for i, (kind, source) in enumerate(cells):
        cell_id = f"{prefix}-{i:02d}"
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source, id=cell_id))
        else:
            cell = nbformat.v4.new_code_cell(source, id=cell_id)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


NOTEBOOKS = {"train_classifier.ipynb": (TRAIN, "train"), "test_classifier.ipynb": (TEST, "test"),
             "sagemaker_training_job.ipynb": (SAGEMAKER, "sagemaker")}


def rendered() -> dict[Path, str]:
    """Each notebook's text as jupyter_server saves it (`nbformat.write`: nbformat 4.5, keys sorted,
    one-space indents, a final newline)."""
    return {NOTEBOOK_DIR / name: nbformat.writes(build(cells, prefix)) + "\n" for name, (cells, prefix) in NOTEBOOKS.items()}


def main(argv: list[str]) -> int:
    stale = [path for path, text in rendered().items() if not path.exists() or path.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} differs from tools/build_notebooks.py: run it to rebuild", file=sys.stderr)
        return 1 if stale else 0
    for path, text in rendered().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
