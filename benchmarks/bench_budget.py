"""How steady the time budget's sizing is: `training.size_training_run`, what `xraylib train
--preset cpu` runs before it trains, repeated on this machine for the shift benchmark's images.

    python benchmarks/bench_budget.py [--repeats 3] [--images 4433]

Prints each repeat's measured speeds, chosen size and predicted minutes, then the spread of the
predictions. A training run's own line ("time budget 30 min: ... predicted X min") is one such
draw; set it beside its actual time to see how much of a miss is the probes' noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xraylib import config
from xraylib.model import resolve_device
from xraylib.training import size_training_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=4433, help="images before the validation split (the shift "
                                                                  "benchmark's training folder: 4,433)")
    args = parser.parse_args()
    cfg = config.make_train_config(preset="cpu", data="unused", out="unused")
    device = resolve_device("auto")
    predicted = []
    for repeat in range(args.repeats):
        sizing = size_training_run(cfg, n_images=args.images, device=device, elapsed_s=0.0)
        predicted.append(sizing.predicted_s / 60)
        print(f"repeat {repeat + 1}: {sizing.describe()}", flush=True)
    print(f"predicted minutes: {', '.join(f'{m:.1f}' for m in predicted)}; spread {max(predicted) - min(predicted):.1f} min "
          f"({(max(predicted) / min(predicted) - 1):.0%} of the lowest)")


if __name__ == "__main__":
    main()
