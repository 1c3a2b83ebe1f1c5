"""How steady the time budget's sizing is: `budget.size_for_budget` run several times in a row on
this machine, as `xraylib train --preset cpu` runs it, with the training set of the shift benchmark.

    python benchmarks/bench_budget.py [--repeats 3] [--budget 30m] [--n-train 3767 --n-val 666]

Prints each repeat's measured speeds, chosen size and predicted minutes, then the spread of the
predictions. A training run's own line ("time budget 30 min: ... predicted X min") is one such
draw; set it beside its actual time to see how much of a miss is the probe's noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xraylib import budget, config
from xraylib.model import autocast_dtype, build_resnet50, precision_name, resolve_device
from xraylib.training import set_up_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", help="a duration such as 30m (default: the cpu preset's)")
    parser.add_argument("--n-train", type=int, default=3767, help="training images (the shift benchmark's: 3,767)")
    parser.add_argument("--n-val", type=int, default=666, help="validation images (the shift benchmark's: 666)")
    args = parser.parse_args()
    device = resolve_device("auto")
    cfg = config.make_train_config(preset="cpu", data="unused", out="unused")
    amp_dtype = autocast_dtype(device, "auto")
    # As training.size_training_run: with 'auto' on a CPU that claims native bf16, both are raced.
    precisions = {precision_name(amp_dtype): amp_dtype}
    if device.type == "cpu" and amp_dtype is not None:
        precisions["fp32"] = None

    def set_up():
        network = build_resnet50("none")
        return network, set_up_training(network, device=device, precision="auto", lr=cfg.lr,
                                        weight_decay=cfg.weight_decay)[0]

    budget_s = config.parse_duration(args.budget or cfg.time_budget)
    predicted = []
    for repeat in range(args.repeats):
        sizing = budget.size_for_budget(budget_s, n_train=args.n_train, n_val=args.n_val, batch_size=cfg.batch_size,
                                        device=device, precisions=precisions, set_up=set_up)
        predicted.append(sizing.predicted_s / 60)
        print(f"repeat {repeat + 1}: {sizing.describe()}", flush=True)
    print(f"predicted minutes: {', '.join(f'{m:.1f}' for m in predicted)}; spread {max(predicted) - min(predicted):.1f} min "
          f"({(max(predicted) / min(predicted) - 1):.0%} of the lowest)")


if __name__ == "__main__":
    main()
