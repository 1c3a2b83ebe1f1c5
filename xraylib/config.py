"""Every default in xraylib, and the one frozen training configuration built from them.

`TrainConfig` is built once, from the notebook's parameters cell or the command line, through
`make_train_config`: preset values first, then whatever the caller set explicitly. Library
functions take the named values they need, never the whole config.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xraylib.errors import ConfigError

# ImageNet statistics: the grayscale image is repeated on three channels, so pretrained
# weights and weights trained from scratch see the same kind of input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODEL_FILENAME = "model.pt"
CHECKPOINT_FILENAME = "checkpoint.pt"
HISTORY_FILENAME = "history.json"
CURVES_FILENAME = "training_curves.png"
# With keep_epochs, every epoch's model too, below the run's out (epoch 1 is epochs/model_epoch001.pt).
EPOCH_MODEL_FILENAME = "epochs/model_epoch{epoch:03d}.pt"

# A header claiming more pixels than this is refused before decoding: the largest real
# radiograph in the dataset is about 3,000 x 3,000 (9 million pixels).
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")

# Labels from a table (labels.py). A table whose header holds a layout's image column is read with
# that layout's columns, unless the caller names others: the public sets' own files need no flags.
# NIH ChestX-ray14's Data_Entry_2017.csv lists findings as "Infiltration|Pneumonia"; RSNA's
# stage_2_train_labels.csv has one row per box, several for one image, and names images without .dcm.
LABEL_LAYOUTS: dict[str, dict[str, str]] = {
    "NIH ChestX-ray14": {"image_column": "Image Index", "label_column": "Finding Labels", "positive": "Pneumonia",
                         "patient_column": "Patient ID"},
    "RSNA Pneumonia Detection": {"image_column": "patientId", "label_column": "Target", "positive": "1",
                                 "patient_column": "patientId"},
}
LABEL_SEPARATOR = "|"  # between the findings of a multi-label cell
# What a split column's values mean: training reads the first (and holds out its own validation
# split by patient from them), evaluation the second; a row of any other value is counted and left out.
LABEL_SPLIT_VALUES = {"train": ("train", "training", "val", "validation", "trainval", "train_val"),
                      "test": ("test", "testing")}

S3_WORKERS = 16
# One retry policy. botocore retries a request (connection failures, 5xx answers, throttling such
# as SlowDown) with its backoff; xraylib reads a body again only when it arrives cut short or
# damaged, which botocore cannot see. All tries of one object, by either, count against one budget:
# S3_MAX_ATTEMPTS tries, and a deadline of S3_RETRY_SECONDS plus the time its size takes at
# S3_MIN_BYTES_PER_SECOND (a 300 MB checkpoint over a slow link is not cut off), which also ends a
# read in progress. "adaptive" mode would also slow the client down while S3 throttles.
S3_MAX_ATTEMPTS = 10
S3_RETRY_MODE = "standard"
S3_RETRY_SECONDS = 60.0
S3_MIN_BYTES_PER_SECOND = 1_000_000
S3_CONNECT_TIMEOUT = 10.0
S3_READ_TIMEOUT = 30.0  # botocore's wait for the next bytes of an answer
EVAL_BATCH_SIZE = 64
# Under torchrun: how long a rank waits in a collective (a barrier, a gradient exchange) for a peer
# that is alive but does not come, before the job fails. A dead peer ends the job at once (torchrun
# stops the others); this covers a stuck one, and must exceed the time one process per node takes
# to download and decode every image while the others wait.
DISTRIBUTED_TIMEOUT_S = 1800
# A training stopped by SIGTERM (a spot interruption) after saving its checkpoint exits with this
# status, the one a shell reports for a process ended by SIGTERM; `--resume` continues it.
STOPPED_EXIT_STATUS = 143
# `predict` fetches, decodes and scores this many images (per process) before the next: its memory
# holds one chunk's pixels whatever the number of images. A multiple of EVAL_BATCH_SIZE, so a chunk
# is scored in the batches one pass over every image would use.
PREDICT_CHUNK_IMAGES = 512
# `predict --csv` to S3: the CSV grows in a local file and is uploaded whole at least this often,
# and at the end; a re-run reads the uploaded CSV and scores only the images it lacks.
PREDICT_UPLOAD_EVERY_S = 300.0
# On a CPU, inference runs fastest when a batch's activations stay in the caches. Measured with
# the folded ResNet50 on 2 cores (README, Performance): the best batch was about 32 at 96 px, 16-24
# at 128 px and 8 at 224 px, so a CPU batch holds about this many pixels.
CPU_EVAL_BATCH_PIXELS = 400_000
# Test-time augmentation: (degrees, zoom, shift x, shift y) of each view whose probabilities are
# averaged; the identity plus mild versions of what training augmentation does.
TTA_VIEWS = ((0.0, 1.0, 0.0, 0.0), (0.0, 1.05, 0.0, 0.0), (0.0, 0.95, 0.0, 0.0), (5.0, 1.0, 0.0, 0.0), (-5.0, 1.0, 0.0, 0.0))
# Test-time batch-norm adaptation (adaptation.py): images per batch while the statistics are
# gathered (as many as training's batches, so each batch's variance is as noisy), and how many
# images the training statistics count as when blended with a new cohort's (32 until
# benchmarks/bench_adapt_stability.py: README, "Adapting to a new cohort").
ADAPT_BATCH_SIZE = 32
ADAPT_PRIOR_IMAGES = 8
# How many times the cohort's class mix is judged (by the network adapted the round before) and
# the statistics gathered again.
ADAPT_ROUNDS = 2
# `xraylib adapt` draws at most this many of a site's images, so that its memory does not grow with
# the prefix (on the shift benchmark a few hundred films already sufficed: README).
ADAPT_MAX_IMAGES = 4096


# Compute precisions: auto picks per device (model.autocast_dtype).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Training augmentation (dataset.augment_batch says what each adds); True means the default level.
AUGMENT_LEVELS = ("none", "geometry", "acquisition", "collimation")
# Contrast normalization applied to every decoded image (dataset.equalize) and recorded in the model.
EQUALIZE_MODES = ("none", "histogram")
# How the decision threshold is chosen on validation (evaluate.choose_threshold says what each does).
THRESHOLD_POLICIES = ("balanced", "equal-error", "youden", "sensitivity-0.95")


# Evaluation a reviewer can trust (uncertainty.py, calibration.py, operating_points.py, subgroups.py).
BOOTSTRAP_RESAMPLES = 2000  # patient resamples behind every 95% interval
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
ECE_BINS = 15  # equal-width bins of P(positive) for the expected calibration error and the reliability diagram
# Target sensitivities whose thresholds training picks on validation and stores in the model file.
OPERATING_POINT_SENSITIVITIES = (0.90, 0.95, 0.99)
# Subgroups of the positive class that Kaggle's file names carry (person1_bacteria_1.jpeg, person1_virus_6.jpeg).
SUBGROUPS = ("bacteria", "virus")
MODEL_CARD_FILENAME = "model_card.md"


# --time-budget (budget.py) walks up this ladder of (image size, epochs) to the largest rung whose
# predicted run fits: pixels and epochs grow together, since on the official test split both
# helped (96 px x 5 epochs: ROC AUC 0.947; 160 px x 8: 0.961).
BUDGET_LADDER = ((64, 4), (80, 4), (96, 5), (112, 6), (128, 7), (144, 8), (160, 8), (176, 9), (192, 10), (224, 10))
BUDGET_PROBE_SIZES = (96, 160)  # the two sizes whose training speed is timed
BUDGET_FIXED_S = 60.0  # decoding, validation set-up, writing files: not proportional to the pixels
BUDGET_SAFETY = 0.9  # share of the budget the predicted run may fill; the rest absorbs a slower machine minute


# The TrainConfig fields (and flags, and notebook parameters) that describe a labels table.
LABEL_OPTIONS = ("labels", "image_column", "label_column", "positive", "patient_column", "split_column")

# SageMaker Training Jobs (sagemaker.py launches them, sagemaker_entry.py runs inside them).
# --max-run is a cap, not a reservation: a job is billed for the time it runs; the cap bounds what
# a job that hangs can cost. A spot job may wait for capacity (and through interruptions) up to
# --max-wait, by default this many times --max-run.
SAGEMAKER_MAX_RUN = "8h"
SAGEMAKER_SPOT_WAIT_FACTOR = 2
SAGEMAKER_INSTANCE_COUNT = 1
SAGEMAKER_BASE_JOB_NAME = "xraylib-train"
SAGEMAKER_LOG_POLL_S = 5.0  # how often a waiting launcher asks for the job's status and new log lines
# AWS's prebuilt PyTorch training containers, as the SDK's image_uris names them: the newer
# Amazon Linux 2023 line first, then the older one; the first whose version is the installed
# torch's major.minor is the job's image.
SAGEMAKER_IMAGE_FRAMEWORKS = ("pytorch-amzn2023", "pytorch")
# The prebuilt container brings these (matched to its CUDA); the job installs the rest of
# xraylib's dependencies, less what only the notebooks need.
SAGEMAKER_IMAGE_PROVIDES = ("torch", "torchvision")
SAGEMAKER_NOTEBOOK_ONLY = ("papermill", "ipykernel", "jupyterlab", "ipywidgets")
# The container's side: the folder SageMaker syncs with <out>/checkpoints (XRAYLIB_CHECKPOINT_DIR
# moves it, for tests), and its model folder when SM_MODEL_DIR is not set.
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"
SAGEMAKER_MODEL_DIR = "/opt/ml/model"


def parse_duration(text: str) -> float:
    """'30m', '1h30m', '90s', '1.5h' or plain seconds ('1800') to seconds."""
    cleaned = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        seconds = float(cleaned)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", cleaned)
        if not parts or "".join(n + u for n, u in parts) != cleaned:
            raise ConfigError(f"cannot read the duration {text!r}: write it like 30m, 1h30m, 90s or 1800")
        seconds = sum(float(n) * {"s": 1.0, "m": 60.0, "h": 3600.0}[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"the duration {text!r} must be longer than zero")
    return seconds


def default_cache_dir() -> Path:
    """`XRAYLIB_CACHE_DIR`, or `~/.cache/xraylib`."""
    return Path(os.environ.get("XRAYLIB_CACHE_DIR") or Path.home() / ".cache" / "xraylib")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in the model file and the checkpoint."""

    data: str
    out: str
    epochs: int = 10
    image_size: int = 224
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    weights: str = "imagenet"
    freeze_backbone: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    val_fraction: float = 0.15
    augment: str = "collimation"
    equalize: str = "histogram"
    threshold_policy: str = "balanced"
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    keep_epochs: bool = False  # also write every epoch's model (EPOCH_MODEL_FILENAME), to choose one later
    time_budget: str | None = None
    resume: bool = False
    skip_bad: bool = False
    preset: str | None = None
    # Labels from a table instead of class folders (labels.py); None: the folders, or the columns
    # of the layout the table's header matches (LABEL_LAYOUTS).
    labels: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    positive: str | None = None
    patient_column: str | None = None
    split_column: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # notebooks and older model files say True / False
            object.__setattr__(self, "augment", TrainConfig.augment if self.augment else "none")
        checks = [
            (self.augment in AUGMENT_LEVELS, f"augment must be one of {', '.join(AUGMENT_LEVELS)}, got {self.augment!r}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (16 <= self.image_size <= 1024, f"image_size must be 16..1024 pixels, got {self.image_size}"),
            (self.batch_size >= 2, f"batch_size must be at least 2, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 < self.val_fraction < 1, f"val_fraction must be between 0 and 1, got {self.val_fraction}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 turns it off), got {self.ema_decay}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.equalize in EQUALIZE_MODES, f"equalize must be one of {', '.join(EQUALIZE_MODES)}, got {self.equalize!r}"),
            (self.threshold_policy in THRESHOLD_POLICIES,
             f"threshold_policy must be one of {', '.join(THRESHOLD_POLICIES)}, got {self.threshold_policy!r}"),
            (bool(self.data), "data location is empty: pass --data LOCATION"),
            (bool(self.out), "output location is empty: pass --out LOCATION"),
            (self.labels is not None or all(getattr(self, name) is None for name in LABEL_OPTIONS[1:]),
             "--image-column, --label-column, --positive, --patient-column and --split-column describe a labels table: "
             "pass --labels LOCATION too"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.time_budget is not None:
            parse_duration(self.time_budget)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named recipes; explicit arguments override them. Numbers and how they were chosen: README.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"weights": "none", "image_size": 96, "epochs": 5, "batch_size": 32, "lr": 1e-3, "time_budget": "30m"},
    "gpu": {"weights": "imagenet", "image_size": 224, "epochs": 12, "batch_size": 64, "lr": 3e-4},
}


def make_train_config(*, preset: str | None = None, **values: Any) -> TrainConfig:
    """Defaults, then the preset's values, then every value given that is not None. An explicit
    image size or number of epochs turns a preset's time budget off: the run is then exactly
    what the flags say."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown training parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    merged: dict[str, Any] = dict(PRESETS.get(preset or "", {}))
    explicit = {k for k, v in values.items() if v is not None}
    sized = sorted(explicit & {"image_size", "epochs"})
    if sized and "time_budget" in explicit:
        raise ConfigError(f"a time budget chooses the image size and the epochs itself: pass either --time-budget or "
                          f"{' and '.join('--' + k.replace('_', '-') for k in sized)}")
    if sized:
        merged.pop("time_budget", None)
    merged.update({k: v for k, v in values.items() if v is not None})
    for key in ("data", "out"):
        if key not in merged:
            raise ConfigError(f"missing training parameter {key!r}")
    return TrainConfig(preset=preset, **merged)
