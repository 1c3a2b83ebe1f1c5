"""Why the cropped top costs specificity: the held-out films of `bench_shift.py` scored by one
trained run under variants of the crop that each change one thing.

    python benchmarks/bench_crop_top.py --model RUN    # RUN trained on bench_shift's hold-out split

- clean, and the benchmark's crop (the top 12% cut off the original film, which is then squashed
  to the model's square as every film is: the chest stretched vertically by 13.6% and moved up);
- the crop after equalizing: the same crop of the preprocessed square, so that the histogram
  equalization saw the whole film (tests whether the equalization's mapping is what moved);
- the top 12% blacked out, no stretch: the same anatomy missing, nothing moved or stretched;
- the bottom 12% cut off after equalizing: the same stretch, the chest moved down instead of up.

Prints specificity, sensitivity and the normal films' mean probability for each, at the model's
threshold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import make_holdout_root, real_train_folder

from xraylib import dataset, shifts, storage
from xraylib.dataset import decode_image, equalize
from xraylib.evaluate import predict_probabilities
from xraylib.model import inference_dtype, inference_network, load_model
from xraylib.synthetic import encode

CUT = 0.12  # as the benchmark's "crop top 12%"


def main() -> None:
    import torch
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a train --out folder trained on bench_shift's hold-out split")
    args = parser.parse_args()
    model = load_model(args.model)
    network = inference_network(model.network)
    device = torch.device("cpu")
    size = model.image_size

    def square(pixels: np.ndarray, rows: slice) -> np.ndarray:
        return np.asarray(Image.fromarray(pixels[rows]).resize((size, size), Image.BILINEAR))

    def blacked(location: str) -> np.ndarray:
        film = shifts.full_resolution_gray(storage.read_bytes(location)).copy()
        film[: round(film.shape[0] * CUT)] = 0
        return equalize(decode_image(encode(film, fmt="PNG"), size, location), model.equalize)

    cut = round(size * CUT)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "chest_xray"
        make_holdout_root(real_train_folder(), root)
        records = dataset.list_images(str(root), split="test").records
        labels = np.array([r.label for r in records])
        locations = [r.obj.location for r in records]
        print(f"{len(locations)} held-out films, model {args.model} ({size} px, threshold {model.threshold:.3f})")
        print("| films | specificity | sensitivity | normal films' mean P(pneumonia) |\n|---|---|---|---|")
        clean = shifts.load_shifted(locations, "clean", size, equalize_mode=model.equalize).numpy()
        variants: dict[str, Callable[[], np.ndarray]] = {  # each a function, so one set of pixels is held at a time
            "clean": lambda: clean,
            "crop top (the benchmark's)":
                lambda: shifts.load_shifted(locations, "crop top 12%", size, equalize_mode=model.equalize).numpy(),
            "crop top after equalizing": lambda: np.stack([square(a, slice(cut, None)) for a in clean]),
            "top 12% blacked out, no stretch": lambda: np.stack(storage.parallel_map(blacked, locations)),
            "bottom 12% cut after equalizing": lambda: np.stack([square(a, slice(None, size - cut)) for a in clean]),
        }
        for name, load in variants.items():
            p = predict_probabilities(network, torch.from_numpy(load()), mean=model.mean, std=model.std, device=device,
                                      amp_dtype=inference_dtype(model, device), temperature=model.temperature,
                                      bias=model.calibration_bias)
            called = p >= model.threshold
            print(f"| {name} | {np.mean(~called[labels == 0]):.3f} | {np.mean(called[labels == 1]):.3f} "
                  f"| {p[labels == 0].mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
