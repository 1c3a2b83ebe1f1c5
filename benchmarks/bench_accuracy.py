"""Accuracy of a training recipe on real chest X-rays, measured on patients it never saw.

    python benchmarks/bench_accuracy.py [--s3] [--tta] [--data FOLDER] -- --preset cpu --weights none

Holds out 15% of the patients of the data folder (default: the real training images in
../shared/data) as `test/`, runs `xraylib train` with the flags after `--` on the rest (which
holds out its own validation split by patient), then `xraylib evaluate` on the held-out patients.
With `--s3` the data goes through `xraylib upload` to a loopback S3 server first, and training
and evaluation read from there. With `--tta`, both the validation split and the held-out
patients are also scored with test-time augmentation. Prints the validation metrics of the kept
epoch, the held-out metrics with their 95% patient-bootstrap intervals (and the operating points,
subgroups and per-patient results), and the wall time of each step. `bench_ablations.py` runs several
recipes through `run_recipe`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_holdout_root, real_train_folder, timed

from xraylib import config, dataset, locals3, storage
from xraylib.model import load_model

KEYS = ("accuracy", "sensitivity", "specificity", "roc_auc", "pr_auc", "brier", "ece", "threshold")


def _with_interval(metrics: dict, key: str) -> str:
    low, high = (metrics.get("ci95") or {}).get(key, (None, None))
    value = "n/a" if metrics[key] is None else f"{metrics[key]:.4f}"
    return f"{key} {value}" + (f" [{low:.4f}, {high:.4f}]" if low is not None else "")


def metrics_line(metrics: dict) -> str:
    """The metrics (with their 95% patient-bootstrap intervals, where evaluated) on one line."""
    return ", ".join(_with_interval(metrics, k) for k in KEYS if k in metrics) + f", n_images {metrics['n_images']}"


def trust_lines(metrics: dict) -> list[str]:
    """Operating points, subgroups and per-patient results of an evaluation's metrics.json."""
    lines = [f"  operating point sensitivity {p['target_sensitivity']:.2f} (threshold {p['threshold']:.4f}, chosen on "
             f"{p['chosen_on']}): {_with_interval({**p, 'n_images': 0}, 'sensitivity')}, "
             f"{_with_interval({**p, 'n_images': 0}, 'specificity')}" for p in metrics.get("operating_points", [])]
    lines += [f"  subgroup {name}: {group['n_images']} images, "
              + _with_interval({"sensitivity": group["sensitivity"], "ci95": {"sensitivity": group["ci95"]}}, "sensitivity")
              for name, group in metrics.get("subgroups", {}).items()]
    if "per_patient" in metrics:
        patient = metrics["per_patient"]
        lines.append(f"  per patient ({patient['n_patients']}): "
                     + ", ".join(_with_interval(patient, k) for k in ("accuracy", "sensitivity", "specificity", "roc_auc")))
    return lines


def make_validation_folder(root: Path, dest: Path) -> Path:
    """`dest/<CLASS>/`: the validation split `xraylib train` makes of `root/train/` with its
    default fraction and seed, laid out as symlinks so that `xraylib evaluate` can score it."""
    defaults = config.TrainConfig(data=str(root), out="-")
    index = dataset.list_images(str(root), split="train")
    _, val = dataset.split_by_patient(index, defaults.val_fraction, defaults.seed)
    for record in val.records:
        link = dest / record.obj.relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(record.obj.location).resolve())
    return dest


def xraylib(*command: str, env: dict[str, str]) -> None:
    print("$ xraylib " + " ".join(command), flush=True)
    subprocess.run([sys.executable, "-m", "xraylib", *command], check=True, env=env)


def run_recipe(data: str, work: str, train_flags: list[str], *, env: dict[str, str], tta: bool = False,
               val_folder: Path | None = None) -> dict:
    """Train with `train_flags` on `data`, evaluate on its `test/` split (and, with `tta`, on
    `val_folder` and `test/` with test-time augmentation). Returns metrics and wall times."""
    out, results = storage.join(work, "run"), storage.join(work, "eval")
    times: dict[str, float] = {}
    with timed("train", times):
        xraylib("train", "--data", data, "--out", out, *train_flags, env=env)
    with timed("evaluate", times):
        xraylib("evaluate", "--model", out, "--data", data, "--out", results, env=env)
    report = {"flags": train_flags, "times": times, "val": load_model(out).metadata["val_metrics"],
              "held_out": json.loads(storage.read_bytes(storage.join(results, "metrics.json")))}
    if tta:
        for name, where in (("val_plain", str(val_folder)), ("val_tta", str(val_folder)), ("held_out_tta", data)):
            started = time.perf_counter()
            target = storage.join(work, name)
            xraylib("evaluate", "--model", out, "--data", where, "--out", target,
                    *(["--tta"] if name.endswith("tta") else []), env=env)
            report[name] = json.loads(storage.read_bytes(storage.join(target, "metrics.json")))
            times[f"evaluate {name}"] = time.perf_counter() - started
    return report


def print_report(report: dict) -> None:
    print(f"validation (best epoch): {metrics_line(report['val'])}")
    print(f"held-out patients:       {metrics_line(report['held_out'])}")
    print("\n".join(trust_lines(report["held_out"])))
    for name in ("val_plain", "val_tta", "held_out_tta"):
        if name in report:
            print(f"{name + ':':<25}{metrics_line(report[name])}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in report["times"].items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3", action="store_true", help="upload to a loopback S3 server and read from there")
    parser.add_argument("--tta", action="store_true", help="also score validation and held-out with --tta")
    parser.add_argument("--data", type=Path, default=None, help="folder of NORMAL/ and PNEUMONIA/ (default: real images)")
    parser.add_argument("train_flags", nargs="*", help="flags for `xraylib train`, after --")
    args = parser.parse_args()
    source = args.data or real_train_folder()
    with tempfile.TemporaryDirectory() as tmp, locals3.local_s3_server() if args.s3 else nullcontext():
        root = Path(tmp) / "chest_xray"
        n_train, n_test = make_holdout_root(source, root)
        print(f"held out {n_test} images by patient as test/; {n_train} left in train/", flush=True)
        val_folder = make_validation_folder(root, Path(tmp) / "val") if args.tta else None
        env = {**os.environ, "XRAYLIB_CACHE_DIR": os.environ.get("XRAYLIB_CACHE_DIR", str(Path(tmp) / "cache"))}
        data, work = str(root), str(Path(tmp) / "work")
        upload: dict[str, float] = {}
        if args.s3:
            locals3.create_bucket("xray-bench")
            data, work = "s3://xray-bench/chest_xray", "s3://xray-bench/work"
            with timed("upload", upload):
                xraylib("upload", str(root), data, env=env)
        report = run_recipe(data, work, args.train_flags, env=env, tta=args.tta, val_folder=val_folder)
        report["times"] = {**upload, **report["times"]}
    print_report(report)


if __name__ == "__main__":
    main()
