"""Test-time adaptation to a new cohort: the batch norms' statistics re-estimated on the images
about to be scored, without their labels.

A network's batch norms carry the mean and variance of each channel over the training images.
A scanner, protocol or hospital change moves those statistics, and with them every score in the
same direction, while the ranking of the films can survive (on the shift benchmark's cropped top:
ROC AUC 0.992, specificity 0.74 at 0.5). Re-estimating them on the new images (Li et al. 2016,
"Revisiting batch normalization for practical domain adaptation"; Schneider et al. 2020,
"Improving robustness against common corruptions by covariate shift adaptation") re-centres the
activations. The training statistics count as `config.ADAPT_PRIOR_IMAGES` images, so that a
handful of images moves them only a little. That weight is a compromise
(benchmarks/bench_adapt_stability.py): a heavier one leaves part of a strong shift in the
statistics, which the rebalancing below can then amplify; none at all leaves the rebalancing
undamped, and on a cohort whose class mix dominates the statistics it can run away.

The statistics also carry the class mix: gathered plainly on a cohort with fewer pneumonia films
than training had, they move every score towards pneumonia (on the benchmark's clean images at
50% pneumonia, specificity fell from 0.970 to 0.861). So `adapt_to_cohort`, what `evaluate
--adapt-batchnorm` runs, first draws the images in the proportions that give the cohort
training's class mix, as the model's own probabilities judge it (no labels), and does that
`config.ADAPT_ROUNDS` times, each time judging with the network adapted the round before.

The statistics depend on the set of images scored together, so a film's probability does too:
use it to score a cohort (a test split, a new site's batch), not one film at a time. To score a
new site's films one at a time, `adapt_model_to_images` (`xraylib adapt`) adapts the model once
to a sample of that site's unlabelled films and writes the adapted model file, which `predict` and
`evaluate` then use as any other; the file records what it was adapted to.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xraylib import config
from xraylib.errors import ConfigError, DatasetError, ModelFileError

if TYPE_CHECKING:
    from xraylib.model import TrainedModel


def rebalancing_weights(probabilities: Any, positive_share: float) -> np.ndarray:
    """A weight per image that brings the expected class mix of a cohort, judged by the model's
    own `probabilities` of the positive class, to `positive_share` (training's): the statistics a
    network was trained with carry its class mix, and a cohort with fewer positives would
    otherwise move every score towards the positive class."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    share = float(np.clip(p.mean(), 1e-3, 1 - 1e-3))
    return p * positive_share / share + (1 - p) * (1 - positive_share) / (1 - share)


def training_positive_share(metadata: dict[str, Any]) -> float:
    """The share of positives a model was trained on, from its model file: the training counts
    where recorded, else its validation split's (drawn from the same images)."""
    counts = metadata.get("data_counts") or {}
    if counts.get("train_positive") is not None and counts.get("train"):
        return counts["train_positive"] / counts["train"]
    matrix = (metadata.get("val_metrics") or {}).get("confusion_matrix", {}).get("matrix")
    if matrix:
        (tn, fp), (fn, tp) = matrix
        return (fn + tp) / (tn + fp + fn + tp)
    raise ModelFileError("the model file records neither its training class counts nor a validation confusion matrix, "
                         "so the class mix to adapt to is unknown: evaluate without --adapt-batchnorm, or train it again "
                         "with this version, which records the counts")


def adapt_batchnorm(network: Any, pixels: Any, *, mean: Sequence[float], std: Sequence[float], device: Any = None,
                    amp_dtype: Any = None, batch_size: int = config.ADAPT_BATCH_SIZE,
                    prior_images: int = config.ADAPT_PRIOR_IMAGES, weights: Any = None,
                    only: Sequence[str] | None = None, seed: int = 0) -> Any:
    """A copy of `network` (not fused: `model.inference_network` comes after) whose batch norms
    hold the statistics of `pixels` (uint8 [N, H, W], preprocessed as the model's evaluation does),
    blended with the training statistics weighted as `prior_images` images. With `weights` (one per
    image, `rebalancing_weights`), the images are drawn in those proportions (with replacement)
    before the statistics are gathered; either way, in an order drawn from `seed`. With `only`,
    just the batch norms whose names start with one of those prefixes ('bn1', 'layer1') are
    adapted. The weights are unchanged, and `network` itself is not touched."""
    import copy

    import torch

    from xraylib import dataset
    from xraylib.model import autocast

    adapted = copy.deepcopy(network)
    device = torch.device(device) if device is not None else next(adapted.parameters()).device
    adapted.to(device)
    norms = [m for name, m in adapted.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and (only is None or name.startswith(tuple(only)))]
    n = len(pixels)
    if not norms or n < 2:
        return adapted.eval()
    # Batches drawn at random, as training's were: a batch of one class would hide the variance
    # between the classes and normalize away what the next layers should see.
    rng = np.random.default_rng(seed)
    if weights is None:
        order = rng.permutation(n)
    else:
        w = np.asarray(weights, dtype=np.float64)
        order = rng.choice(n, size=n, p=w / w.sum())
    source = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches, not a moving one
    adapted.eval()
    for m in norms:
        m.train()  # normalize with each batch's statistics and gather them; the others keep training's
    # Never a batch of one, which batch norm cannot take in training mode.
    chunks = np.array_split(order, max(1, -(-n // batch_size)))
    with torch.no_grad(), autocast(device, amp_dtype):
        for chunk in chunks:
            adapted(dataset.to_model_input(pixels[torch.from_numpy(chunk)].to(device), mean, std))
    share = n / (n + prior_images)
    for m, (old_mean, old_var, momentum) in zip(norms, source, strict=True):
        m.running_mean.mul_(share).add_(old_mean, alpha=1 - share)
        m.running_var.mul_(share).add_(old_var, alpha=1 - share)
        m.momentum = momentum
    return adapted.eval()


@dataclass(frozen=True)
class Adaptation:
    """What `adapt_to_cohort` did, as metrics.json records it."""

    images: int
    rounds: int
    training_positive_share: float
    estimated_positive_share: float  # the cohort's, by the adapted model's mean probability
    prior_images: int  # how many images the training statistics counted as in the blend

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adaptation_record(adaptation: Adaptation, earlier: dict[str, Any] | None, **where: Any) -> dict[str, Any]:
    """What metrics.json and a model file record of `adaptation`: its fields, `where` (what `xraylib
    adapt` adapted to), and the model's own earlier adaptation, if any, under 'previous'."""
    record = {**adaptation.to_dict(), **where}
    if earlier:
        record["previous"] = earlier
    return record


def describe(record: dict[str, Any]) -> str:
    """How an adaptation was done, for a log line."""
    return (f"{record['rounds']} rounds, rebalanced to the training's {record['training_positive_share']:.0%} positives; "
            f"the images' estimated share {record['estimated_positive_share']:.0%}")


def _adapt_rounds(model: TrainedModel, pixels: Any, *, device: Any, amp_dtype: Any, rounds: int,
                  prior_images: int) -> tuple[Any, Any, np.ndarray, Adaptation]:
    """The adapted network as a model file holds it, the same fused for inference, its calibrated
    probabilities for `pixels` (computed by the last round), and what was done."""
    from xraylib.evaluate import predict_probabilities
    from xraylib.model import inference_network

    share = training_positive_share(model.metadata)

    def score(network: Any) -> np.ndarray:
        return predict_probabilities(network, pixels, mean=model.mean, std=model.std, device=device, amp_dtype=amp_dtype,
                                     temperature=model.temperature, bias=model.calibration_bias)

    adapted = model.network.to(device)
    network = inference_network(adapted)
    probabilities = score(network)
    for _ in range(rounds):
        adapted = adapt_batchnorm(model.network, pixels, mean=model.mean, std=model.std, device=device,
                                  amp_dtype=amp_dtype, prior_images=prior_images,
                                  weights=rebalancing_weights(probabilities, share))
        network = inference_network(adapted)
        probabilities = score(network)
    adaptation = Adaptation(len(pixels), rounds, round(share, 4), round(float(np.mean(probabilities)), 4), prior_images)
    return adapted, network, probabilities, adaptation


def adapt_to_cohort(model: TrainedModel, pixels: Any, *, device: Any, amp_dtype: Any,
                    rounds: int = config.ADAPT_ROUNDS,
                    prior_images: int = config.ADAPT_PRIOR_IMAGES) -> tuple[Any, np.ndarray, Adaptation]:
    """`model.network` with its batch norms adapted to the cohort `pixels` (decoded and
    preprocessed as `evaluate` does), rebalanced to the training's class mix; its calibrated
    probabilities for `pixels`, which the last round computed; and what was done. The network is
    on `device`, fused for inference."""
    _, network, probabilities, adaptation = _adapt_rounds(model, pixels, device=device, amp_dtype=amp_dtype,
                                                          rounds=rounds, prior_images=prior_images)
    return network, probabilities, adaptation


def adapt_model_to_images(model: str | TrainedModel, images: str | Path | Sequence[str | Path], out: str, *,
                          skip_bad: bool = False, precision: str = "auto", device: str = "auto",
                          max_images: int = config.ADAPT_MAX_IMAGES, seed: int = 0,
                          log: Callable[[str], None] = print) -> TrainedModel:
    """Adapt a model's batch norms to a new site's images, without their labels, as `evaluate
    --adapt-batchnorm` does to the images it scores, and write the adapted model file to `out` (a
    `.pt` file, or a folder that gets `model.pt`; local or S3). `images` is one location or several,
    each an image, or a folder or prefix standing for every image below it; of more than
    `max_images`, that many are drawn at random (`seed`). The model file records the adaptation
    under `batchnorm_adaptation` (and any earlier one under its `previous`); the model it came from
    is not changed. Returns the adapted model, on the CPU."""
    from xraylib import dataset
    from xraylib.model import TrainedModel, inference_dtype, load_model, model_file_location, resolve_device, save_model
    from xraylib.predict import as_locations, decode_for_model

    started = time.perf_counter()
    trained = load_model(model) if isinstance(model, str) else model
    file = model_file_location(out)
    if trained.location is not None and file == trained.location:
        raise ConfigError(f"--out {out} is the model being adapted: write the adapted model to another location, so that "
                          "the model it comes from stays as trained")
    locations = as_locations(images)
    if not locations:
        raise ConfigError("no images to adapt to: pass the files, folders or prefixes of the new site's images")
    names, ignored = dataset.find_images(locations)  # a folder without images is an error there, naming it
    if ignored:
        log(f"ignored {len(ignored)} non-image file(s)")
    found = len(names)
    if found > max_images:
        drawn = np.random.default_rng(seed).choice(found, size=max_images, replace=False)
        names = [names[i] for i in sorted(drawn.tolist())]
    pixels, kept, skipped = decode_for_model(trained, names, skip_bad=skip_bad)
    dataset.report_skipped(skipped, log)
    if pixels is None or len(kept) < 2:
        raise DatasetError(f"only {len(kept)} of the images in {', '.join(locations)} could be decoded: adapting needs at "
                           "least 2 (a few hundred give statistics close to those of all)")
    torch_device = resolve_device(device)
    adapted, _, _, adaptation = _adapt_rounds(trained, pixels, device=torch_device,
                                              amp_dtype=inference_dtype(trained, torch_device, precision),
                                              rounds=config.ADAPT_ROUNDS, prior_images=config.ADAPT_PRIOR_IMAGES)
    record = adaptation_record(adaptation, trained.metadata.get("batchnorm_adaptation"), images_location=locations,
                               images_found=found, skipped_images=len(skipped),
                               adapted=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    metadata = {**trained.metadata, "batchnorm_adaptation": record}
    save_model(file, adapted, metadata)
    log(f"batch norms adapted to {adaptation.images} images of {', '.join(locations)}"
        f"{f' (drawn from {found})' if found > adaptation.images else ''}: {describe(record)}. "
        f"Wrote {file} in {time.perf_counter() - started:.1f} s")
    return TrainedModel(adapted.to("cpu").eval(), metadata, file)
