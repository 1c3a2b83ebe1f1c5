"""Test-time adaptation to a new cohort: the batch norms' statistics re-estimated on the images
about to be scored, without their labels.

A network's batch norms carry the mean and variance of each channel over the training images.
A scanner, protocol or hospital change moves those statistics, and with them every score in the
same direction, while the ranking of the films can survive (on the shift benchmark's cropped top:
ROC AUC 0.992, specificity 0.74 at 0.5). Re-estimating them on the new images (Li et al. 2016,
"Revisiting batch normalization for practical domain adaptation"; Schneider et al. 2020,
"Improving robustness against common corruptions by covariate shift adaptation") re-centres the
activations. The training statistics count as `config.ADAPT_PRIOR_IMAGES` images, so that a
handful of images moves them only a little.

The statistics also carry the class mix: gathered plainly on a cohort with fewer pneumonia films
than training had, they move every score towards pneumonia (on the benchmark's clean images at
50% pneumonia, specificity fell from 0.970 to 0.861). So `adapt_to_cohort`, what `evaluate
--adapt-batchnorm` runs, first draws the images in the proportions that give the cohort
training's class mix, as the model's own probabilities judge it (no labels), and does that
`config.ADAPT_ROUNDS` times, each time judging with the network adapted the round before.

The statistics depend on the set of images scored together, so a film's probability does too:
use it to score a cohort (a test split, a new site's batch), not one film at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xraylib import config
from xraylib.errors import ModelFileError

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adapt_to_cohort(model: TrainedModel, pixels: Any, *, device: Any, amp_dtype: Any,
                    rounds: int = config.ADAPT_ROUNDS) -> tuple[Any, np.ndarray, Adaptation]:
    """`model.network` with its batch norms adapted to the cohort `pixels` (decoded and
    preprocessed as `evaluate` does), rebalanced to the training's class mix; its calibrated
    probabilities for `pixels`, which the last round computed; and what was done. The network is
    on `device`, fused for inference."""
    from xraylib.evaluate import predict_probabilities
    from xraylib.model import inference_network

    share = training_positive_share(model.metadata)

    def score(network: Any) -> np.ndarray:
        return predict_probabilities(network, pixels, mean=model.mean, std=model.std, device=device, amp_dtype=amp_dtype,
                                     temperature=model.temperature, bias=model.calibration_bias)

    network = inference_network(model.network.to(device))
    probabilities = score(network)
    for _ in range(rounds):
        network = inference_network(adapt_batchnorm(model.network, pixels, mean=model.mean, std=model.std,
                                                    device=device, amp_dtype=amp_dtype,
                                                    weights=rebalancing_weights(probabilities, share)))
        probabilities = score(network)
    return network, probabilities, Adaptation(len(pixels), rounds, round(share, 4), round(float(np.mean(probabilities)), 4))
