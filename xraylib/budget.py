"""Sizing a training run to a time budget (the image size and number of epochs that fill it),
and racing bf16 against fp32 on a CPU whose flags cannot say which is faster.

The same recipe runs several times faster on a CPU that runs bf16 natively than on one that emulates
it; a fixed preset leaves the fast machine idle. `size_for_budget` times a few real training steps
(forward, backward, optimizer, in the precision the run will use; with `--precision auto` on a CPU
that claims native bf16, in both bf16 and fp32, keeping the faster) at two image sizes, fits the
time per image as a constant plus a part proportional to the pixels, and walks up
`config.BUDGET_LADDER` to the largest (image size, epochs) whose predicted run still fits.

The choice is printed with the flags that repeat it exactly (`--image-size N --epochs M`), and
recorded in the model file; a resumed run keeps the checkpoint's choice instead of measuring again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from xraylib import config


@dataclass(frozen=True)
class Sizing:
    """What `size_for_budget` chose and why."""

    image_size: int
    epochs: int
    budget_s: float
    predicted_s: float
    images_per_second: dict[int, float]  # measured training speed at each probed size
    precision: str | None = None  # chosen by timing, when 'auto' had two candidates
    precision_speeds: dict[str, float] | None = None  # img/s of each candidate at the first probe size

    def describe(self) -> str:
        speeds = ", ".join(f"{v:.1f} img/s at {k} px" for k, v in sorted(self.images_per_second.items()))
        raced = ""
        if self.precision_speeds:
            tried = " and ".join(f"{name} {v:.1f} img/s" for name, v in self.precision_speeds.items())
            raced = f"{tried} at {config.BUDGET_PROBE_SIZES[0]} px, so training in {self.precision}; "
        repeat = f"--image-size {self.image_size} --epochs {self.epochs}"
        repeat += f" --precision {self.precision}" if self.precision else ""
        return (f"time budget {self.budget_s / 60:.0f} min: {raced}measured {speeds}; chose {self.image_size} px, "
                f"{self.epochs} epochs (predicted {self.predicted_s / 60:.1f} min); to repeat exactly: {repeat}")

    def to_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "predicted_s": round(self.predicted_s, 1), "image_size": self.image_size,
                "epochs": self.epochs, "images_per_second": {str(k): round(v, 2) for k, v in self.images_per_second.items()},
                **({"precision": self.precision, "precision_images_per_second": self.precision_speeds}
                   if self.precision_speeds else {})}


@dataclass(frozen=True)
class PrecisionRace:
    """What `race_precisions` measured and chose."""

    chosen: str
    images_per_second: dict[str, float]  # of each candidate, at `image_size`
    image_size: int

    def describe(self) -> str:
        tried = " and ".join(f"{name} {v:.1f} img/s" for name, v in self.images_per_second.items())
        return (f"precision auto: {tried} at {self.image_size} px, so training in {self.chosen}; "
                f"--precision {self.chosen} repeats it without timing")


def measure_training_speed(network: Any, optimizer: Any, *, image_size: int, batch_size: int, device: Any,
                           amp_dtype: Any, steps: int = 3) -> float:
    """Training images per second at `image_size`: `steps` timed steps on random pixels after one
    untimed warm-up step (which pays for kernel selection). The network's weights change; callers
    build the real network afterwards."""
    import torch

    from xraylib import dataset
    from xraylib.model import autocast

    network.train()
    pixels = torch.randint(0, 256, (batch_size, image_size, image_size), dtype=torch.uint8)
    labels = torch.arange(batch_size) % 2
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        x = dataset.to_model_input(pixels.to(device), config.IMAGENET_MEAN, config.IMAGENET_STD)
        with autocast(device, amp_dtype):
            loss = loss_fn(network(x).float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def _fresh_speed(set_up: Any, amp_dtype: Any, *, image_size: int, batch_size: int, device: Any) -> float:
    """`measure_training_speed` on a fresh (network, optimizer) from `set_up()`."""
    network, optimizer = set_up()
    return measure_training_speed(network, optimizer, image_size=image_size, batch_size=batch_size, device=device,
                                  amp_dtype=amp_dtype)


def race_precisions(precisions: dict[str, Any], *, image_size: int, batch_size: int, device: Any,
                    set_up: Any) -> PrecisionRace:
    """Each candidate of `precisions` (a name, 'fp32' or 'bf16', to its autocast dtype) timed for
    a few training steps at `image_size` on a fresh (network, optimizer) from `set_up()`; the
    faster wins. A CPU's flags cannot tell: some that claim AVX-512 BF16 run fp32 faster, others
    bf16 (the README's Performance section has the CPUs measured)."""
    speeds = {name: _fresh_speed(set_up, dtype, image_size=image_size, batch_size=batch_size, device=device)
              for name, dtype in precisions.items()}
    return PrecisionRace(max(speeds, key=lambda name: speeds[name]), speeds, image_size)


def predicted_seconds(image_size: int, epochs: int, *, seconds_per_image: Any, n_train: int, n_val: int) -> float:
    """A run's time: every epoch trains on `n_train` images and validates `n_val` (inference costs
    about a third of a training step), plus `config.BUDGET_FIXED_S` for decoding and writing."""
    per_image = seconds_per_image(image_size)
    return epochs * (n_train + n_val / 3) * per_image + config.BUDGET_FIXED_S


def choose_size(budget_s: float, *, seconds_per_image: Any, n_train: int, n_val: int,
                elapsed_s: float = 0.0) -> tuple[int, int, float]:
    """The largest rung of `config.BUDGET_LADDER` whose predicted run fits `budget_s` (after
    `elapsed_s` already spent), or the smallest rung when none does."""
    available = (budget_s - elapsed_s) * config.BUDGET_SAFETY
    chosen = config.BUDGET_LADDER[0]
    for size, epochs in config.BUDGET_LADDER:
        if predicted_seconds(size, epochs, seconds_per_image=seconds_per_image, n_train=n_train, n_val=n_val) <= available:
            chosen = (size, epochs)
    size, epochs = chosen
    return size, epochs, predicted_seconds(size, epochs, seconds_per_image=seconds_per_image, n_train=n_train, n_val=n_val)


def size_for_budget(budget_s: float, *, n_train: int, n_val: int, batch_size: int, device: Any,
                    precisions: dict[str, Any], set_up: Any, elapsed_s: float = 0.0) -> Sizing:
    """Time training at the two probe sizes of `config.BUDGET_PROBE_SIZES`, fit seconds per image
    as a + b * pixels, and choose the rung of the ladder that fills `budget_s`.

    `set_up()` returns a fresh (network, optimizer) on `device`, as the run trains them.
    `precisions` maps a name ('fp32', 'bf16') to its autocast dtype. With two candidates (a CPU
    that claims native bf16), both are timed at the first probe size and the faster one trains
    (`race_precisions`)."""
    first, second = config.BUDGET_PROBE_SIZES
    race = race_precisions(precisions, image_size=first, batch_size=batch_size, device=device, set_up=set_up)
    chosen, raced = race.chosen, race.images_per_second
    speeds = {first: raced[chosen],
              second: _fresh_speed(set_up, precisions[chosen], image_size=second, batch_size=batch_size, device=device)}
    (s0, v0), (s1, v1) = sorted(speeds.items())
    slope = max((1 / v1 - 1 / v0) / (s1 * s1 - s0 * s0), 0.0)
    intercept = max(1 / v0 - slope * s0 * s0, 0.0)

    def seconds_per_image(size: int) -> float:
        return intercept + slope * size * size

    size, epochs, predicted = choose_size(budget_s, seconds_per_image=seconds_per_image, n_train=n_train, n_val=n_val,
                                          elapsed_s=elapsed_s)
    if len(raced) < 2:
        return Sizing(size, epochs, budget_s, predicted + elapsed_s, speeds)
    return Sizing(size, epochs, budget_s, predicted + elapsed_s, speeds, chosen, {k: round(v, 2) for k, v in raced.items()})
