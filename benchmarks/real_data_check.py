"""The whole workflow on the real training images, through the command line and a loopback S3
server: upload, train from S3, evaluate on patients held out from training.

    python benchmarks/real_data_check.py [--epochs 1] [--image-size 64]

Prints the commands' output, the held-out metrics and the wall time of each step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_holdout_root, real_train_folder, timed

from xraylib import locals3, storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="1")
    parser.add_argument("--image-size", default="64")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `xraylib train` flags")
    args = parser.parse_args()
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, locals3.local_s3_server():
        root = Path(tmp) / "chest_xray"
        n_train, n_test = make_holdout_root(real_train_folder(), root)
        print(f"held out {n_test} images by patient as test/, {n_train} left in train/")
        locals3.create_bucket("xray-real")
        env_cache = {"XRAYLIB_CACHE_DIR": str(Path(tmp) / "cache")}

        def run(*command: str) -> None:
            print("$ xraylib " + " ".join(command), flush=True)
            subprocess.run([sys.executable, "-m", "xraylib", *command], check=True, env={**__import__("os").environ, **env_cache})

        with timed("upload", times):
            run("upload", str(root), "s3://xray-real/chest_xray")
        with timed("train", times):
            run("train", "--data", "s3://xray-real/chest_xray", "--out", "s3://xray-real/runs/real", "--epochs", args.epochs,
                "--image-size", args.image_size, "--weights", "none", *args.extra)
        with timed("evaluate", times):
            run("evaluate", "--model", "s3://xray-real/runs/real", "--data", "s3://xray-real/chest_xray",
                "--out", "s3://xray-real/eval/real")
        metrics = json.loads(storage.read_bytes("s3://xray-real/eval/real/metrics.json"))
    keys = ("accuracy", "sensitivity", "specificity", "roc_auc", "pr_auc", "threshold", "n_images")
    print("held-out metrics: " + ", ".join(f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                                           for k in keys))
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))


if __name__ == "__main__":
    main()
