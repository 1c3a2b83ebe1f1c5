"""Every default in xraylib, and the one frozen training configuration built from them.

`TrainConfig` is built once, from the notebook's parameters cell or the command line, through
`make_train_config`: preset values first, then whatever the caller set explicitly. Library
functions take the named values they need, never the whole config.
"""

from __future__ import annotations

import dataclasses
import os
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

# A header claiming more pixels than this is refused before decoding: the largest real
# radiograph in the dataset is about 3,000 x 3,000 (9 million pixels).
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

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
# On a CPU, inference runs fastest when a batch's activations stay in the caches. Measured with
# the folded ResNet50 on 2 cores: the best batch was about 32 at 96 px, 16-24 at 128 px and 8 at
# 224 px (13.7 against 11.2 img/s for batch 64), so a CPU batch holds about this many pixels.
CPU_EVAL_BATCH_PIXELS = 400_000
# Test-time augmentation: (degrees, zoom, shift x, shift y) of each view whose probabilities are
# averaged; the identity plus mild versions of what training augmentation does.
TTA_VIEWS = ((0.0, 1.0, 0.0, 0.0), (0.0, 1.05, 0.0, 0.0), (0.0, 0.95, 0.0, 0.0), (5.0, 1.0, 0.0, 0.0), (-5.0, 1.0, 0.0, 0.0))


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
    augment: bool = True
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    resume: bool = False
    skip_bad: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (16 <= self.image_size <= 1024, f"image_size must be 16..1024 pixels, got {self.image_size}"),
            (self.batch_size >= 2, f"batch_size must be at least 2, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 < self.val_fraction < 1, f"val_fraction must be between 0 and 1, got {self.val_fraction}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 turns it off), got {self.ema_decay}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"),
             f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}"),
            (bool(self.data), "data location is empty: pass --data LOCATION"),
            (bool(self.out), "output location is empty: pass --out LOCATION"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named recipes; explicit arguments override them. Numbers and how they were chosen: README.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"weights": "none", "image_size": 96, "epochs": 5, "batch_size": 32, "lr": 1e-3},
    "gpu": {"weights": "imagenet", "image_size": 224, "epochs": 12, "batch_size": 64, "lr": 3e-4},
}


def make_train_config(*, preset: str | None = None, **values: Any) -> TrainConfig:
    """Defaults, then the preset's values, then every value given that is not None."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown training parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    merged: dict[str, Any] = dict(PRESETS.get(preset or "", {}))
    merged.update({k: v for k, v in values.items() if v is not None})
    for key in ("data", "out"):
        if key not in merged:
            raise ConfigError(f"missing training parameter {key!r}")
    return TrainConfig(preset=preset, **merged)
