"""Training, top to bottom: `train_one_epoch`, `validate`, `load_data`, `is_better_epoch`,
`ema_update`, `set_up_training`, then `train`, the run.

A run reads the `train/` split, holds out a validation split by patient, trains a ResNet50 with
a class-weighted loss, AdamW and a one-cycle schedule, validates every epoch, keeps the epoch
with the best validation ROC AUC (on a tie, the lower validation loss) and picks the decision
threshold on validation. With `ema_decay`, an exponential moving average of the weights (its
decay ramped up from the first step: `ema_update`) is what gets validated and kept. It writes
into the output location:

- `model.pt`: the best model so far, with its metadata (see `model.py`);
- `checkpoint.pt`: the state after the last finished epoch, or at the step where SIGTERM (a
  spot interruption) stopped the run, for `resume` (which refuses settings that would change
  what is learned: `check_resume_config`);
- `history.json` (written first, so that an output location that cannot be written to fails
  at once) and `training_curves.png`;
- with `keep_epochs`, every epoch's model as well (`config.EPOCH_MODEL_FILENAME`), each with
  its own threshold and calibration from validation, so that an epoch can be chosen afterwards
  on other images (its metadata's `best_epoch` is that epoch).

Every file is written whole or not at all, so a run killed at any moment resumes cleanly.
Started by torchrun, every process runs `train` and they train one model together
(`distributed.py`: shards, gathered validation); rank 0 alone writes these files and logs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xraylib import budget, config, dataset, distributed, labels, storage
from xraylib.config import TrainConfig
from xraylib.errors import ConfigError, ModelFileError, TrainingStopped
from xraylib.evaluate import choose_threshold, compute_metrics, fit_calibration, predict_logits, probabilities_from_logits
from xraylib.model import (
    autocast,
    autocast_dtype,
    build_resnet50,
    inference_network,
    model_metadata,
    model_to_bytes,
    precision_name,
)
from xraylib.operating_points import choose_operating_points

Log = Callable[[str], None]


class _StepBoundaryStop(Exception):
    """Raised by `train_one_epoch` at a step boundary after a stop was asked for."""

    def __init__(self, steps_done: int, loss_sum: float, seen: int) -> None:
        super().__init__(steps_done)
        self.steps_done, self.loss_sum, self.seen = steps_done, loss_sum, seen


def train_one_epoch(
    network: Any,
    optimizer: Any,
    scheduler: Any,
    loss_fn: Any,
    data: dataset.LoadedImages,
    *,
    batch_size: int,
    device: Any,
    amp_dtype: Any,
    augment: str,
    generator: Any,
    ema: Any = None,
    scaler: Any = None,
    progress: str | None = None,
    order: Any = None,
    topology: distributed.Topology = distributed.SINGLE,
    first_step: int = 0,
    carried: tuple[float, int] = (0.0, 0),
    stop: distributed.StopSignal | None = None,
) -> float:
    """One pass over `data` in a random order, augmented at level `augment` (`config.AUGMENT_LEVELS`);
    returns the mean training loss. `ema`, a
    `torch.optim.swa_utils.AveragedModel` of `network`, is updated after every step; `scaler`,
    a `torch.amp.GradScaler`, scales the loss (needed with float16).

    `order` is the epoch's permutation (drawn from `generator` when not given), which `topology`
    shares out among torchrun's ranks (`distributed.step_rows`); `network` is then the
    DistributedDataParallel one. A resumed epoch starts at `first_step`, its loss so far `carried`
    as (sum, images). When `stop` is asked for, the ranks stop together at the next step boundary
    and raise `_StepBoundaryStop` with the steps done and the loss so far."""
    import torch

    network.train()
    # Summed where the loss is: reading it back makes the CPU wait for a GPU, so that happens rarely.
    total, seen = torch.zeros((), device=device), 0
    order = torch.randperm(len(data), generator=generator) if order is None else order
    steps = distributed.step_rows(order, batch_size, topology)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), initial=first_step, desc=progress, unit="batch", leave=True)

    def loss_so_far() -> tuple[float, int]:
        loss_sum, images = distributed.sum_over_ranks([float(total), float(seen)], topology, device)
        return carried[0] + loss_sum, carried[1] + int(images)

    with warnings.catch_warnings():
        # The scaler skips the first steps while it finds its scale; the schedule counts them all
        # the same, so PyTorch's warning that the optimizer has not stepped yet is moot.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for step in range(first_step, len(steps)):
            if stop is not None and distributed.agree(stop.requested, topology, device):
                raise _StepBoundaryStop(step, *loss_so_far())
            rows = steps[step]
            if distributed.smallest_part(len(order), batch_size, topology, step) < 2:
                continue  # BatchNorm cannot train on a batch of one
            pixels, labels = data.pixels[rows], data.labels[rows]
            x = pixels.to(device, non_blocking=True)  # uint8, 4x smaller to move than floats; augmented there
            x = dataset.augment_batch(x, generator, augment) if augment != "none" else x
            x = dataset.to_model_input(x, config.IMAGENET_MEAN, config.IMAGENET_STD)
            labels = labels.to(device)
            with autocast(device, amp_dtype):
                loss = loss_fn(network(x).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(network.module if topology.is_distributed else network)
            total += loss.detach() * len(labels)
            seen += len(labels)
            if bar is not None:
                bar.update(1)
                if bar.n % 10 == 0 or bar.n == len(steps):
                    bar.set_postfix(loss=f"{float(total) / max(seen, 1):.4f}")
    if bar is not None:
        bar.close()
    loss_sum, images = loss_so_far()
    mean_loss = loss_sum / max(images, 1)
    if not math.isfinite(mean_loss):
        raise ConfigError("training loss became NaN or infinite: lower the learning rate (--lr)")
    return mean_loss


def validate(network: Any, loss_fn: Any, data: dataset.LoadedImages, *, device: Any, amp_dtype: Any,
             threshold_policy: str, topology: distributed.Topology = distributed.SINGLE) -> dict[str, Any]:
    """Validation loss, the calibration (temperature and bias) fitted here, and metrics at threshold 0.5 and
    at the threshold `threshold_policy` picks on these images (on calibrated probabilities).

    Scored with the batch norms folded, as `evaluate` and `predict` score: faster, and the
    threshold is chosen on the very numbers those will compute. Under torchrun each rank scores
    its share of the images and every rank computes the metrics from all of them (in `logits`)."""
    import torch

    folded = inference_network(network)
    if topology.is_distributed:
        rows = distributed.rows_of_rank(len(data), topology)
        mine = predict_logits(folded, data.pixels[rows], mean=config.IMAGENET_MEAN, std=config.IMAGENET_STD,
                              device=device, amp_dtype=amp_dtype)
        logits = distributed.gather_rows(mine, rows.numpy(), len(data), topology, device)
    else:
        logits = predict_logits(folded, data.pixels, mean=config.IMAGENET_MEAN, std=config.IMAGENET_STD,
                                device=device, amp_dtype=amp_dtype)
    labels = data.labels.numpy()
    margins = torch.from_numpy(logits).float()
    val_loss = float(loss_fn(torch.stack([torch.zeros_like(margins), margins], dim=1).to(device), data.labels.to(device)))
    temperature, bias = fit_calibration(labels, logits)
    probs = probabilities_from_logits(logits, temperature, bias)
    threshold = choose_threshold(labels, probs, threshold_policy)
    return {"loss": val_loss, "temperature": temperature, "bias": bias,
            "operating_points": choose_operating_points(labels, probs),
            "at_half": compute_metrics(labels, probs, 0.5, data.class_names),
            "chosen": compute_metrics(labels, probs, threshold, data.class_names)}


@dataclass
class TrainingData:
    train: dataset.LoadedImages
    val: dataset.LoadedImages
    index: dataset.ImageIndex


def load_data(data: str, *, image_size: int, val_fraction: float, seed: int, skip_bad: bool, equalize: str = "none",
              index: dataset.ImageIndex | None = None, label_table: labels.LabelTable | None = None, log: Log = print,
              progress: bool = True) -> TrainingData:
    """Index the `train/` split (or the train rows of `label_table`) unless its `index` is given, split it
    by patient, and decode (and `equalize`) both sides. The two sides are row numbers into one decoded
    file (`dataset.take_rows`): neither is a copy of the pixels."""
    index = index or labels.index_images(data, split="train", labels=label_table)
    log(f"found {index.describe()}")
    train_index, val_index = dataset.split_by_patient(index, val_fraction, seed)
    loaded = dataset.load_images(index.subset(train_index.records + val_index.records), image_size,
                                 equalize_mode=equalize, skip_bad=skip_bad, progress=progress)
    dataset.report_skipped(loaded.skipped, log)
    in_val = {r.obj.location for r in val_index.records}
    is_val = [r.obj.location in in_val for r in loaded.records]
    train_rows = [i for i, v in enumerate(is_val) if not v]
    val_rows = [i for i, v in enumerate(is_val) if v]

    train_data, val_data = dataset.take_rows(loaded, train_rows), dataset.take_rows(loaded, val_rows)
    patients = len({r.patient for r in train_data.records}), len({r.patient for r in val_data.records})
    log(f"train {len(train_data)} images ({patients[0]} patients), validation {len(val_data)} images "
        f"({patients[1]} patients), split by patient")
    return TrainingData(train_data, val_data, index)


@dataclass
class TrainResult:
    model_location: str
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, Any]
    data: TrainingData


def _class_weights(labels: Any) -> Any:
    """Inverse class frequency, so that NORMAL (1,341) counts as much as PNEUMONIA (3,875)."""
    import torch

    counts = torch.bincount(labels, minlength=2).float().clamp(min=1)
    return counts.sum() / (2 * counts)


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "generator", "epoch", "history_json", "best_json", "config_json")


def _load_checkpoint(location: str) -> dict[str, Any] | None:
    """The checkpoint at `location`, None when there is none; one that cannot be read (cut short,
    overwritten, another program's) raises ModelFileError naming it, as a damaged model file does."""
    import pickle

    import torch

    if not storage.exists(location):
        return None
    try:
        checkpoint = torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu", weights_only=True)
        missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        for key in ("history_json", "best_json", "config_json"):
            json.loads(checkpoint[key])
    except (RuntimeError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
        raise ModelFileError(
            f"{location} is damaged or not an xraylib checkpoint ({type(exc).__name__}: {reason}); "
            "delete it to train again from the first epoch (model.pt keeps the best epoch so far), or use a new --out"
        ) from None
    return checkpoint


# What a resumed run may change: where its output lives, how it runs, how bad images are handled
# (a run that met none is the same either way) and the preset (only the values it set count).
_MAY_CHANGE_ON_RESUME = frozenset({"out", "resume", "skip_bad", "device", "precision", "preset", "keep_epochs"})


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, out: str) -> None:
    """Refuse, in one line naming them, settings in `cfg` that differ from `saved` (the
    configuration in the checkpoint in `out`) and would change what the resumed run learns.

    Refused: the data; the seed and the validation fraction (another validation split would
    validate on trained images and flatter the ROC AUC that picks the epoch and the threshold);
    epochs, batch size and learning rate (the one-cycle schedule restored from the checkpoint is
    built on them: a run cannot be made longer without changing the epochs already trained, so
    more epochs is a new run); and the model, loss, augmentation and optimizer settings (the
    files would record settings the weights were not trained with). Allowed: out, device and
    precision (a run interrupted on one machine may finish on another), skip_bad, resume,
    preset. A setting the checkpoint does not know, added to xraylib since, counts as its
    default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    if isinstance(saved.get("augment"), bool):  # checkpoints from before the augmentation levels
        saved = {**saved, "augment": "geometry" if saved["augment"] else "none"}
    now = cfg.to_dict()
    changed = [(name, saved.get(name, defaults.get(name)), value) for name, value in now.items()
               if name not in _MAY_CHANGE_ON_RESUME and saved.get(name, defaults.get(name)) != value]
    if changed:
        listed = ", ".join(f"--{name.replace('_', '-')} {old!r} -> {new!r}" for name, old, new in changed)
        raise ConfigError(f"cannot resume {out} with other settings than its checkpoint's ({listed}): resume with the "
                          "checkpoint's values, or start a new run with a new --out (or without --resume, replacing this one)")


def is_better_epoch(row: dict[str, Any], best: dict[str, Any]) -> bool:
    """Whether an epoch's history `row` beats the `best` kept so far: the higher validation ROC AUC,
    or on a tie the lower validation loss. Small or easy validation sets reach an AUC of 1.0 in
    an early epoch; the loss then tells the still unsure model from the sure one."""
    return (row["val_roc_auc"], -row["val_loss"]) > (best["roc_auc"], -best.get("val_loss", math.inf))


def ema_update(decay: float) -> Callable[[list[Any], list[Any], Any], None]:
    """`AveragedModel`'s update for an exponential moving average of the weights whose decay ramps
    up as (1 + n) / (10 + n) towards `decay`, n the updates so far (TensorFlow's
    `ExponentialMovingAverage` with `num_updates`). A constant decay starts the average from the
    first step's weights, nearly the random initialization, and keeps decay**n of them to the end
    (README, "Weight averaging"). Ramped, they fade within a few dozen steps, whatever the decay."""
    import torch

    @torch.no_grad()
    def update(averaged: list[Any], current: list[Any], num_averaged: Any) -> None:
        if not averaged[0].is_floating_point():  # batch norm's step counters: the latest
            torch._foreach_copy_(averaged, current)
            return
        n = int(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def set_up_training(network: Any, *, device: Any, precision: str, lr: float, weight_decay: float) -> tuple[Any, Any, Any]:
    """Move `network` to `device` in channels-last memory; return the optimizer, the autocast
    dtype (None for fp32) and the loss scaler (None unless fp16) that `train` steps with."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has one shape: time cuDNN's kernels once, keep the fastest
    network.to(device).to(memory_format=torch.channels_last)
    params = [p for p in network.parameters() if p.requires_grad]
    # One fused kernel for the whole update: on 2 CPU cores 16 ms a step instead of 52 ms.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))
    amp_dtype = autocast_dtype(device, precision)
    # float16 gradients underflow to zero unless the loss is scaled up; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return optimizer, amp_dtype, scaler


def precision_candidates(device: Any, precision: str) -> dict[str, Any]:
    """The precisions a run may train in, by name, each with its autocast dtype: with 'auto' on a
    CPU that claims native bf16, bf16 and fp32 (only timing tells which is faster there); else
    the one `autocast_dtype` gives."""
    amp_dtype = autocast_dtype(device, precision)
    candidates = {precision_name(amp_dtype): amp_dtype}
    if precision == "auto" and device.type == "cpu" and amp_dtype is not None:
        candidates["fp32"] = None
    return candidates


def _probe_set_up(cfg: TrainConfig, device: Any) -> Callable[[], tuple[Any, Any]]:
    """A fresh (network, optimizer) as the run trains them, for timing steps."""

    def set_up() -> tuple[Any, Any]:
        network = build_resnet50("none")
        return network, set_up_training(network, device=device, precision=cfg.precision, lr=cfg.lr,
                                        weight_decay=cfg.weight_decay)[0]

    return set_up


def size_training_run(cfg: TrainConfig, *, n_images: int, device: Any, elapsed_s: float) -> budget.Sizing:
    """The image size and epochs that fill `cfg.time_budget` on this machine, timed with the
    network and optimizer this run will train with. With `--precision auto` on a CPU that claims
    native bf16, bf16 and fp32 are both timed and the faster trains (`Sizing.precision`)."""
    n_val = round(n_images * cfg.val_fraction)
    return budget.size_for_budget(config.parse_duration(cfg.time_budget), n_train=n_images - n_val, n_val=n_val,
                                  batch_size=cfg.batch_size, device=device,
                                  precisions=precision_candidates(device, cfg.precision),
                                  set_up=_probe_set_up(cfg, device), elapsed_s=elapsed_s)


def race_precision(cfg: TrainConfig, *, device: Any) -> budget.PrecisionRace | None:
    """Without a time budget, `--precision auto` on a CPU that claims native bf16: bf16 and fp32
    each timed for a few steps at the run's image size (at most the budget's first probe size:
    which is faster does not change with it) and the faster chosen. None where there is one
    candidate."""
    candidates = precision_candidates(device, cfg.precision)
    if len(candidates) < 2:
        return None
    return budget.race_precisions(candidates, image_size=min(cfg.image_size, config.BUDGET_PROBE_SIZES[0]),
                                  batch_size=cfg.batch_size, device=device, set_up=_probe_set_up(cfg, device))


def train(cfg: TrainConfig, *, log: Log = print, progress: bool = True) -> TrainResult:
    """Run a whole training as `cfg` says; with `cfg.resume`, continue from the last checkpoint (an
    epoch's end, or the step where SIGTERM stopped it). With `cfg.time_budget`, the image size and
    epochs are first sized to fill it (`budget.py`). Started by torchrun, every process trains one
    model together (`distributed.py`); only rank 0 writes files and logs.

    SIGTERM (a spot interruption) stops the run at the next step boundary with its checkpoint
    saved, and raises TrainingStopped."""
    with distributed.process_group(cfg.device) as (topology, device):
        return _train(cfg, topology, device, log=log if topology.is_main else _quiet, progress=progress and topology.is_main)


def _quiet(line: str) -> None:
    """The log of every rank but 0: one run prints one set of lines."""


def _train(cfg: TrainConfig, topology: distributed.Topology, device: Any, *, log: Log, progress: bool) -> TrainResult:
    import torch

    run_started = time.perf_counter()
    out = cfg.out
    model_loc = storage.join(out, config.MODEL_FILENAME)
    checkpoint_loc = storage.join(out, config.CHECKPOINT_FILENAME)
    checkpoint = _load_checkpoint(checkpoint_loc) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        log(f"no checkpoint in {out}: starting from the first epoch")
    if checkpoint is not None:
        saved = json.loads(checkpoint["config_json"])
        # Keep what was measured when the run began: the budget's size, and the precision a race chose.
        measured = {"image_size": saved["image_size"], "epochs": saved["epochs"]} if cfg.time_budget is not None else {}
        if cfg.precision == "auto":
            measured["precision"] = saved["precision"]
        cfg = dataclasses.replace(cfg, **measured)
        check_resume_config(saved, cfg, out)
        trained_on = int(checkpoint.get("world_size", 1))
        if trained_on != topology.world_size:
            # The one-cycle schedule counts global steps, and a step is one batch from every process.
            raise ConfigError(f"the checkpoint in {out} was trained on {trained_on} process(es), this run has "
                              f"{topology.world_size}: resume with the same number (torchrun --nnodes x --nproc_per_node), "
                              "or start a new run with a new --out")
    elif cfg.time_budget is not None and topology.is_distributed:
        raise ConfigError("a time budget is measured on one process: under torchrun pass --image-size and --epochs instead "
                          "of --time-budget (or --preset cpu)")
    history: list[dict[str, Any]] = json.loads(checkpoint["history_json"]) if checkpoint is not None else []
    # Written first, so that an --out that cannot be written to fails before any decoding or training.
    if topology.is_main:
        _write_history_json(out, history)

    label_table = labels.label_table(cfg.labels, **{name: getattr(cfg, name) for name in config.LABEL_OPTIONS[1:]})
    index = distributed.broadcast_object(
        labels.index_images(cfg.data, split="train", labels=label_table) if topology.is_main else None, topology)
    sizing = None
    if cfg.time_budget is not None and checkpoint is None:
        sizing = size_training_run(cfg, n_images=len(index), device=device, elapsed_s=time.perf_counter() - run_started)
        cfg = dataclasses.replace(cfg, image_size=sizing.image_size, epochs=sizing.epochs,
                                  precision=sizing.precision or cfg.precision)
        log(sizing.describe())
    elif checkpoint is None and cfg.precision == "auto":
        race = distributed.broadcast_object(race_precision(cfg, device=device) if topology.is_main else None, topology)
        if race is not None:
            cfg = dataclasses.replace(cfg, precision=race.chosen)
            log(race.describe())

    torch.manual_seed(cfg.seed)
    # One process per node downloads and decodes (and fetches pretrained weights); the others then read its caches.
    with distributed.local_main_first(topology):
        data = load_data(cfg.data, image_size=cfg.image_size, val_fraction=cfg.val_fraction, seed=cfg.seed,
                         skip_bad=cfg.skip_bad, equalize=cfg.equalize, index=index, log=log, progress=progress)
        network = build_resnet50(cfg.weights, freeze_backbone=cfg.freeze_backbone)
    optimizer, amp_dtype, scaler = set_up_training(network, device=device, precision=cfg.precision, lr=cfg.lr,
                                                   weight_decay=cfg.weight_decay)
    trained_network = distributed.wrap(network, topology, device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=_class_weights(data.train.labels).to(device),
                                        label_smoothing=cfg.label_smoothing)
    steps_per_epoch = -(-len(data.train) // (cfg.batch_size * topology.world_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                    pct_start=0.15)
    generator = torch.Generator().manual_seed(cfg.seed)
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(network, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)
    best = {"epoch": 0, "roc_auc": -1.0, "val_loss": math.inf, "metrics": {}}
    first_epoch, first_step, carried, interrupted_epoch_state = 1, 0, (0.0, 0), None
    if checkpoint is not None:
        network.load_state_dict(checkpoint["model"])
        if ema is not None:
            if "ema" not in checkpoint:
                raise ConfigError(f"the checkpoint in {out} was trained without --ema-decay: "
                                  "resume without it, or use a new --out")
            ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        generator.set_state(checkpoint["generator"])
        best = json.loads(checkpoint["best_json"])
        first_epoch = int(checkpoint["epoch"]) + 1
        first_step = int(checkpoint.get("step", 0))
        if first_step:
            interrupted_epoch_state = checkpoint["epoch_generator"]
            carried = (float(checkpoint["epoch_loss_sum"]), int(checkpoint["epoch_loss_images"]))
            log(f"resuming {out} at step {first_step} of {steps_per_epoch} of epoch {first_epoch}")
        else:
            log(f"resuming {out} after epoch {first_epoch - 1}")
    start = {"none": "from scratch", "imagenet": "from ImageNet weights"}.get(cfg.weights, f"from the weights in {cfg.weights}")
    batch = (f"batch {cfg.batch_size} per process x {topology.world_size} processes = global batch "
             f"{cfg.batch_size * topology.world_size}" if topology.is_distributed else f"batch {cfg.batch_size}")
    log(f"training ResNet50 {start} on {device.type}"
        f"{' with ' + str(amp_dtype).removeprefix('torch.') if amp_dtype else ''}"
        f"{' and loss scaling' if scaler is not None else ''}, {cfg.epochs} epochs, "
        f"{cfg.image_size}px, {batch}")

    def save_checkpoint(epoch: int, **extra: Any) -> None:
        if topology.is_main:
            _save_checkpoint(checkpoint_loc, network, ema, scaler, optimizer, scheduler, generator, epoch, history, best,
                             cfg, world_size=topology.world_size, **extra)

    def stopped_by_sigterm(when: str) -> TrainingStopped:
        """Once every rank has its checkpoint saved: the log line, and the error that ends the run."""
        distributed.barrier(topology)
        log(f"stopped by SIGTERM {when}; checkpoint saved to {checkpoint_loc}")
        return TrainingStopped(f"stopped by SIGTERM {when}, checkpoint saved to {checkpoint_loc}: "
                               "run again with --resume to continue from there")

    # SIGTERM is noted from here on, and acted on at a step boundary; before, there is nothing to save
    # and it ends the process at once.
    with distributed.StopSignal() as stop:
        for epoch in range(first_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            resumed_state = generator.get_state()
            if first_step:  # resumed inside this epoch: draw its permutation again
                generator.set_state(interrupted_epoch_state)
            epoch_start_state = generator.get_state()
            order = torch.randperm(len(data.train), generator=generator)
            # One process augments with the generator that drew the permutation, as it always has; under torchrun
            # every rank draws the same permutations and its own augmentations.
            augment_generator = distributed.rank_generator(generator, topology) if topology.is_distributed else generator
            if first_step:
                generator.set_state(resumed_state)  # where the interrupted run's draws had got to
            try:
                train_loss = train_one_epoch(trained_network, optimizer, scheduler, loss_fn, data.train,
                                             batch_size=cfg.batch_size, device=device, amp_dtype=amp_dtype, augment=cfg.augment,
                                             generator=augment_generator, ema=ema, scaler=scaler, order=order, topology=topology,
                                             first_step=first_step, carried=carried, stop=stop,
                                             progress=f"epoch {epoch}/{cfg.epochs}" if progress else None)
            except _StepBoundaryStop as stopped:
                if stopped.steps_done == 0:  # nothing of this epoch done: the checkpoint of the one before
                    generator.set_state(epoch_start_state)
                    save_checkpoint(epoch - 1)
                else:
                    save_checkpoint(epoch - 1, step=stopped.steps_done, epoch_generator=epoch_start_state,
                                    epoch_loss=(stopped.loss_sum, stopped.seen))
                raise stopped_by_sigterm(f"at step {stopped.steps_done} of {steps_per_epoch} of epoch {epoch}") from None
            first_step, carried = 0, (0.0, 0)
            # With an EMA, the averaged weights are the ones validated and kept.
            kept = network if ema is None else ema.module
            distributed.share_buffers(kept, topology)
            val = validate(kept, loss_fn, data.val, device=device, amp_dtype=amp_dtype, threshold_policy=cfg.threshold_policy,
                           topology=topology)
            seconds = time.perf_counter() - started
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                   "val_roc_auc": val["chosen"]["roc_auc"], "val_accuracy": val["at_half"]["accuracy"],
                   "val_sensitivity": val["at_half"]["sensitivity"], "val_specificity": val["at_half"]["specificity"],
                   "lr": scheduler.get_last_lr()[0], "seconds": seconds}
            # What this epoch's model would be saved with: the threshold chosen on validation, and the
            # accuracy there (val_accuracy, sensitivity and specificity above are at 0.5, for comparisons).
            row.update(val_threshold=val["chosen"]["threshold"], val_accuracy_at_threshold=val["chosen"]["accuracy"])
            history.append(row)
            improved = is_better_epoch(row, best)
            log(f"epoch {epoch}/{cfg.epochs}  train loss {train_loss:.4f}  val loss {val['loss']:.4f}  "
                f"val ROC AUC {row['val_roc_auc']:.4f}  val accuracy {row['val_accuracy_at_threshold']:.4f} "
                f"at threshold {row['val_threshold']:.3f}  "
                f"{seconds:.0f}s{'  (best so far)' if improved else ''}")
            if improved:
                best = {"epoch": epoch, "roc_auc": row["val_roc_auc"], "val_loss": row["val_loss"], "metrics": val["chosen"]}
            if (improved or cfg.keep_epochs) and topology.is_main:
                metadata = model_metadata(class_names=data.index.class_names, image_size=cfg.image_size,
                                          equalize=cfg.equalize, threshold=val["chosen"]["threshold"],
                                          threshold_policy=cfg.threshold_policy, temperature=val["temperature"],
                                          calibration_bias=val["bias"], operating_points=val["operating_points"],
                                          validation_precision=precision_name(amp_dtype),
                                          train_config=cfg.to_dict(),
                                          best_epoch=epoch, val_metrics=val["chosen"],
                                          **({"sizing": sizing.to_dict()} if sizing is not None else {}),
                                          data_counts={"train": len(data.train), "val": len(data.val),
                                                       "train_positive": int(data.train.labels.sum())})
                model_bytes = model_to_bytes(kept, metadata)
                if cfg.keep_epochs:
                    storage.write_bytes(storage.join(out, config.EPOCH_MODEL_FILENAME.format(epoch=epoch)), model_bytes)
                if improved:
                    storage.write_bytes(model_loc, model_bytes)
            save_checkpoint(epoch)
            if topology.is_main:
                _write_history(out, history)
            if epoch < cfg.epochs and distributed.agree(stop.requested, topology, device):
                raise stopped_by_sigterm(f"after epoch {epoch}")

    if sizing is not None:
        log(f"trained in {(time.perf_counter() - run_started) / 60:.1f} min of the {sizing.budget_s / 60:.0f} min budget "
            f"(predicted {sizing.predicted_s / 60:.1f})")
    log(f"best epoch {best['epoch']}: validation ROC AUC {best['roc_auc']:.4f}, accuracy "
        f"{best['metrics'].get('accuracy', float('nan')):.4f} at threshold {best['metrics'].get('threshold', 0.5):.3f}; "
        f"model saved to {model_loc}")
    return TrainResult(model_loc, history, int(best["epoch"]), best["metrics"], data)


def _save_checkpoint(location: str, network: Any, ema: Any, scaler: Any, optimizer: Any, scheduler: Any, generator: Any,
                     epoch: int, history: list[dict[str, Any]], best: dict[str, Any], cfg: TrainConfig, *,
                     world_size: int = 1, step: int = 0, epoch_generator: Any = None,
                     epoch_loss: tuple[float, int] = (0.0, 0)) -> None:
    """After `epoch` finished epochs, and `step` steps of the next one (SIGTERM), whose permutation
    `epoch_generator` draws again and whose loss so far is `epoch_loss` (sum, images)."""
    import torch

    buffer = io.BytesIO()
    torch.save({"model": network.state_dict(), **({"ema": ema.state_dict()} if ema is not None else {}),
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "epoch": epoch,
                "world_size": world_size, "step": step,
                **({"epoch_generator": epoch_generator, "epoch_loss_sum": epoch_loss[0], "epoch_loss_images": epoch_loss[1]}
                   if step else {}),
                "history_json": json.dumps(history), "best_json": json.dumps(best),
                "config_json": json.dumps(cfg.to_dict())}, buffer)
    storage.write_bytes(location, buffer.getvalue())


def _write_history_json(out: str, history: list[dict[str, Any]]) -> None:
    storage.write_text(storage.join(out, config.HISTORY_FILENAME), json.dumps(history, indent=2) + "\n")


def _write_history(out: str, history: list[dict[str, Any]]) -> None:
    from xraylib.plots import figure_png, training_curves_figure

    _write_history_json(out, history)
    storage.write_bytes(storage.join(out, config.CURVES_FILENAME), figure_png(training_curves_figure(history)))
