"""One lever at a time: training recipes side by side on the same patient-level splits.

    python benchmarks/bench_ablations.py [--only NAME ...] [--list]

Every recipe trains on the same 85% of the real training patients and is selected on the same
validation split; the other 15% of patients are held out and scored once per recipe. The quick
recipes change one lever against a reduced-budget baseline (64 px, 3 epochs: about 6 minutes
each on 2 cores) so that several fit in an hour; `resolution-128x3` spends the full cpu-preset
budget differently (compare with `cpu-preset`). Each recipe carries the prediction written down
before it was run. Prints one line per recipe and a table at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import make_validation_folder, print_report, run_recipe
from common import make_holdout_root, real_train_folder

QUICK = ["--weights", "none", "--image-size", "64", "--epochs", "3", "--batch-size", "32", "--lr", "1e-3"]

# name: (flags for `xraylib train`, evaluate with TTA too, the prediction made before running it)
RECIPES: dict[str, tuple[list[str], bool, str]] = {
    "quick-baseline": (QUICK, True, "val ROC AUC about 0.99, accuracy about 0.95; TTA adds at most 0.003 AUC at 5x "
                                    "the evaluation time"),
    "quick-seed1": ([*QUICK, "--seed", "1"], False, "other validation patients and initial weights: within 0.01 "
                                                     "accuracy and 0.004 AUC of quick-baseline (the noise band)"),
    "quick-label-smoothing": ([*QUICK, "--label-smoothing", "0.1"], False, "AUC within noise; threshold moves "
                                                                            "towards 0.5; validation loss higher"),
    "quick-ema": ([*QUICK, "--ema-decay", "0.99"], False, "within noise: one-cycle annealing already ends on "
                                                          "averaged-looking weights"),
    "quick-no-augment": ([*QUICK, "--no-augment"], False, "held-out AUC 0.005 lower and specificity lower; "
                                                          "epochs a few percent faster"),
    "resolution-128x3": (["--preset", "cpu", "--image-size", "128", "--epochs", "3"], False,
                         "about 7% more time than cpu-preset; AUC within 0.003 of it, not better: at this budget "
                         "epochs matter more than pixels"),
    "cpu-preset": (["--preset", "cpu"], False, "repeats the preset's measurement: val accuracy 0.976, "
                                               "ROC AUC 0.997, about 18 min"),
    # Added after quick-no-augment beat quick-baseline by more than the seed noise.
    "cpu-preset-no-augment": (["--preset", "cpu", "--no-augment"], True,
                              "5 epochs without augmentation start to overfit (train loss near 0.01): validation "
                              "AUC within 0.002 of cpu-preset, not clearly better; the 3-epoch gain does not carry"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="run just these recipes")
    parser.add_argument("--list", action="store_true", help="print the recipes and predictions, run nothing")
    args = parser.parse_args()
    names = args.only or list(RECIPES)
    if args.list:
        for name in names:
            flags, tta, prediction = RECIPES[name]
            print(f"{name}: {' '.join(flags)}{' (+TTA)' if tta else ''}\n  predicted: {prediction}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "chest_xray"
        n_train, n_test = make_holdout_root(real_train_folder(), root)
        print(f"held out {n_test} images by patient as test/; {n_train} left in train/", flush=True)
        val_folder = make_validation_folder(root, Path(tmp) / "val")
        # One decode cache for all recipes: each image size is decoded once.
        env = {**os.environ, "XRAYLIB_CACHE_DIR": os.environ.get("XRAYLIB_CACHE_DIR", str(Path(tmp) / "cache"))}
        for name in names:
            flags, tta, prediction = RECIPES[name]
            print(f"\n## {name}: {' '.join(flags)}\npredicted: {prediction}", flush=True)
            report = run_recipe(str(root), str(Path(tmp) / name), flags, env=env, tta=tta, val_folder=val_folder)
            print_report(report)
            rows.append((name, report))
    print("\n| recipe | val accuracy | val ROC AUC | val specificity | held-out accuracy | held-out ROC AUC "
          "| held-out specificity | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        v, h = r["val"], r["held_out"]
        print(f"| {name} | {v['accuracy']:.3f} | {v['roc_auc']:.4f} | {v['specificity']:.3f} | {h['accuracy']:.3f} "
              f"| {h['roc_auc']:.4f} | {h['specificity']:.3f} | {r['times']['train']:.0f} |")
        for tta_name in ("val_plain", "val_tta", "held_out_tta"):
            if tta_name in r:
                m = r[tta_name]
                print(f"| {name} {tta_name} | {m['accuracy']:.3f} | {m['roc_auc']:.4f} | {m['specificity']:.3f} "
                      f"| | | | {r['times'][f'evaluate {tta_name}']:.0f} (evaluate) |")


if __name__ == "__main__":
    main()
