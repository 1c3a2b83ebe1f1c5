"""When the batch-norm adaptation's class-mix rebalancing goes wrong, on generated images.

    python benchmarks/bench_adapt_stability.py [--work DIR]

The blob model of `tests/test_evaluation_trust.py` (class carried only by a blob; trained on as many
of each class) is adapted to a site of 120 films and then scores 60 other films of that site. Each
site is drawn three ways: faded to half its contrast with half of it positive (the README's known
limit), unchanged with 17% positive, and faded with 17% positive. Each is adapted by every
combination of:

- what judges the class mix first: the model as trained (what `evaluate --adapt-batchnorm` and
  `xraylib adapt` do) or the network adapted plainly, without rebalancing;
- how many images the training statistics count as in the blend (0, 8: `config.ADAPT_PRIOR_IMAGES`
  now, or 32: what it was);

followed by `config.ADAPT_ROUNDS` rounds of rebalancing. It prints the site's share of positives
as the adapted network judges it (the truth is 0.50 or 0.17) and the accuracy on the other films.
About 5 minutes on 2 cores; the blob model is trained once into `--work` (under half a minute).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for the tests' blob model

import numpy as np

from tests.test_evaluation_trust import _blob_cohort, _train_blob_model
from xraylib import config
from xraylib.adaptation import adapt_batchnorm, adapt_to_cohort, rebalancing_weights, training_positive_share
from xraylib.evaluate import predict_probabilities
from xraylib.model import TrainedModel, inference_network, load_model

PRIORS = (0, 8, 32)  # 32 was config.ADAPT_PRIOR_IMAGES until this table
STARTS = ("as trained", "plain")


def faded(tile: np.ndarray) -> np.ndarray:
    return (tile * 0.5 + 64).astype(np.uint8)


def unchanged(tile: np.ndarray) -> np.ndarray:
    return tile


SITES = {"faded, 50% positive": (faded, 60, 60), "unchanged, 17% positive": (unchanged, 20, 100),
         "faded, 17% positive": (faded, 20, 100)}


def adapted_scores(model: TrainedModel, site, films, *, start: str, prior: int) -> tuple[float, float]:
    """The site's judged share of positives and the accuracy on `films` after adapting to `site`."""
    def score(network, pixels) -> np.ndarray:  # a network fused for inference
        return predict_probabilities(network, pixels, mean=model.mean, std=model.std, device="cpu",
                                     amp_dtype=None, temperature=model.temperature, bias=model.calibration_bias)

    if start == "as trained":  # the library's own rounds
        network, judged, _ = adapt_to_cohort(model, site.pixels, device="cpu", amp_dtype=None, prior_images=prior)
    else:
        share = training_positive_share(model.metadata)
        network = inference_network(adapt_batchnorm(model.network, site.pixels, mean=model.mean, std=model.std,
                                                    device="cpu", prior_images=prior))
        judged = score(network, site.pixels)
        for _ in range(config.ADAPT_ROUNDS):
            network = inference_network(adapt_batchnorm(model.network, site.pixels, mean=model.mean, std=model.std,
                                                        device="cpu", prior_images=prior,
                                                        weights=rebalancing_weights(judged, share)))
            judged = score(network, site.pixels)
    calls = score(network, films.pixels) >= model.threshold
    return float(judged.mean()), float((calls == films.labels.numpy().astype(bool)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/xraylib-adapt-stability"),
                        help="where the blob model is trained once and kept")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    run = args.work / "run"
    model = load_model(str(run)) if (run / "model.pt").exists() else _train_blob_model(args.work)
    columns = [(start, prior) for start in STARTS for prior in PRIORS]
    print("judged share of positives / accuracy on 60 other films of the site; the library's own way is "
          f"'as trained', prior {config.ADAPT_PRIOR_IMAGES}")
    print("| site | seed | " + " | ".join(f"{start}, prior {prior}" for start, prior in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, (change, positives, negatives) in SITES.items():
        for seed in (11, 21, 31):
            site = _blob_cohort(positives, negatives, change, seed=seed)
            films = _blob_cohort(30, 30, change, seed=seed + 1)
            cells = [adapted_scores(model, site, films, start=start, prior=prior) for start, prior in columns]
            print(f"| {name} | {seed} | " + " | ".join(f"{s:.2f} / {a:.2f}" for s, a in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
