"""Accuracy of a training recipe on real chest X-rays, measured on patients it never saw.

    python benchmarks/bench_accuracy.py [--s3] [--data FOLDER] -- --preset cpu --weights none

Holds out 15% of the patients of the data folder (default: the real training images in
../shared/data) as `test/`, runs `xraylib train` with the flags after `--` on the rest (which
holds out its own validation split by patient), then `xraylib evaluate` on the held-out patients.
With `--s3` the data goes through `xraylib upload` to a loopback S3 server first, and training
and evaluation read from there. Prints the validation metrics of the kept epoch, the held-out
metrics and the wall time of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_holdout_root, real_train_folder, timed

from xraylib import locals3, storage
from xraylib.model import load_model

KEYS = ("accuracy", "sensitivity", "specificity", "roc_auc", "pr_auc", "threshold")


def _line(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in KEYS) + f", n_images {metrics['n_images']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3", action="store_true", help="upload to a loopback S3 server and read from there")
    parser.add_argument("--data", type=Path, default=None, help="folder of NORMAL/ and PNEUMONIA/ (default: real images)")
    parser.add_argument("train_flags", nargs="*", help="flags for `xraylib train`, after --")
    args = parser.parse_args()
    source = args.data or real_train_folder()
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, locals3.local_s3_server() if args.s3 else nullcontext():
        root = Path(tmp) / "chest_xray"
        n_train, n_test = make_holdout_root(source, root)
        print(f"held out {n_test} images by patient as test/; {n_train} left in train/", flush=True)
        env = {**os.environ, "XRAYLIB_CACHE_DIR": os.environ.get("XRAYLIB_CACHE_DIR", str(Path(tmp) / "cache"))}

        def run(*command: str) -> None:
            print("$ xraylib " + " ".join(command), flush=True)
            subprocess.run([sys.executable, "-m", "xraylib", *command], check=True, env=env)

        data, out, results = str(root), str(Path(tmp) / "run"), str(Path(tmp) / "eval")
        if args.s3:
            locals3.create_bucket("xray-bench")
            data, out, results = "s3://xray-bench/chest_xray", "s3://xray-bench/runs/bench", "s3://xray-bench/eval/bench"
            with timed("upload", times):
                run("upload", str(root), data)
        with timed("train", times):
            run("train", "--data", data, "--out", out, *args.train_flags)
        with timed("evaluate", times):
            run("evaluate", "--model", out, "--data", data, "--out", results)
        val = load_model(out).metadata["val_metrics"]
        held_out = json.loads(storage.read_bytes(storage.join(results, "metrics.json")))
    print(f"validation (best epoch): {_line(val)}")
    print(f"held-out patients:       {_line(held_out)}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))


if __name__ == "__main__":
    main()
