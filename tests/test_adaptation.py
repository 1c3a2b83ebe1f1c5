"""Test-time batch-norm adaptation (xraylib.adaptation): the statistics a network scores a cohort
with are that cohort's, blended with training's, and nothing else changes."""

from __future__ import annotations

import pytest
import torch

from xraylib import config, dataset
from xraylib.adaptation import adapt_batchnorm
from xraylib.errors import ModelFileError
from xraylib.model import build_resnet50

MEAN, STD = config.IMAGENET_MEAN, config.IMAGENET_STD


def _cohort(n: int, brightness: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 120, (n, 32, 32), generator=g) + brightness).to(torch.uint8)


def _first_norm_input_mean(network: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network.conv1(dataset.to_model_input(pixels, MEAN, STD)).mean(dim=(0, 2, 3))


def test_the_statistics_are_the_new_cohorts_over_every_batch_and_the_original_is_untouched():
    torch.manual_seed(0)
    network = build_resnet50("none").eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    pixels = _cohort(70, brightness=100)  # 70 images in batches of 32: 3 batches, none of one image
    adapted = adapt_batchnorm(network, pixels, mean=MEAN, std=STD, batch_size=32, prior_images=0)

    expected = _first_norm_input_mean(network, pixels)
    assert torch.allclose(adapted.bn1.running_mean, expected, atol=1e-4)
    assert not torch.allclose(network.bn1.running_mean, expected, atol=1e-2)
    assert not adapted.training
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} of the original network changed"
    for key, value in adapted.state_dict().items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before[key]), f"{key} is a weight and must not change"


def test_the_training_statistics_count_as_prior_images_and_a_single_image_changes_nothing():
    torch.manual_seed(0)
    network = build_resnet50("none").eval()
    pixels = _cohort(40, brightness=100)
    source = network.bn1.running_mean.clone()
    target = adapt_batchnorm(network, pixels, mean=MEAN, std=STD, prior_images=0).bn1.running_mean
    halfway = adapt_batchnorm(network, pixels, mean=MEAN, std=STD, prior_images=40).bn1.running_mean
    assert torch.allclose(halfway, (source + target) / 2, atol=1e-5)

    one = adapt_batchnorm(network, pixels[:1], mean=MEAN, std=STD)
    assert torch.equal(one.bn1.running_mean, source)


def test_rebalancing_gives_the_cohort_the_training_class_mix_and_leaves_a_cohort_that_has_it_alone():
    import numpy as np

    from xraylib.adaptation import rebalancing_weights

    sure = np.array([1.0] * 30 + [0.0] * 70)  # a cohort with 30% positives, as the model judges it
    w = rebalancing_weights(sure, 0.74)
    assert w[:30].sum() / w.sum() == pytest.approx(0.74, abs=1e-4)
    assert np.allclose(rebalancing_weights(np.array([1.0] * 74 + [0.0] * 26), 0.74), 1.0, atol=1e-4)


def test_the_training_class_mix_comes_from_the_model_file_or_its_validation_and_otherwise_a_clear_error():
    from xraylib.adaptation import training_positive_share

    assert training_positive_share({"data_counts": {"train": 200, "val": 30, "train_positive": 150}}) == 0.75
    older = {"data_counts": {"train": 200, "val": 30},
             "val_metrics": {"confusion_matrix": {"labels": ["NORMAL", "PNEUMONIA"], "matrix": [[6, 2], [1, 21]]}}}
    assert training_positive_share(older) == pytest.approx(22 / 30)
    with pytest.raises(ModelFileError, match=r"class mix to adapt to is unknown.*without --adapt-batchnorm"):
        training_positive_share({"data_counts": {"train": 200}})
