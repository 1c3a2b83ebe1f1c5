"""The demo: the whole workflow on one machine, offline, in about two minutes on two CPU cores.

`run_demo` starts a real S3-compatible server on loopback (moto, over HTTP), generates a small
synthetic dataset in the Kaggle layout, uploads it to a bucket there, runs the train notebook and
then the test notebook headless against s3:// locations, exactly as on AWS, and copies the
executed notebooks, metrics and pictures into a local folder. The data is generated, not medical:
the demo shows that the pipeline works end to end, not how well it does on real radiographs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from xraylib import config, locals3, storage, synthetic
from xraylib.notebooks import run_notebook

# Sized so that the whole demo takes about two minutes on two idle CPU cores and the model clearly
# learns (the README shows a run's confusion matrix; fewer images or epochs learn visibly less).
IMAGES_PER_CLASS = 80  # generated training images per class; validation and test get fewer
EPOCHS = 5
IMAGE_SIZE = 64
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
WEIGHTS = "none"  # offline: no ImageNet download
SEED = 0
BUCKET = "xraylib-demo"
DATA_PREFIX = "chest_xray"
RUN_PREFIX = "runs/demo"

TRAIN_FILES = (config.HISTORY_FILENAME, config.CURVES_FILENAME, "train_classifier.executed.ipynb")
EVAL_FILES = ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration.png",
              config.MODEL_CARD_FILENAME, "test_classifier.executed.ipynb")


def run_demo(out: str | Path = "demo-output", images_per_class: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Run the demo; the results land in the local folder `out`. Returns the test metrics."""
    images_per_class = images_per_class or IMAGES_PER_CLASS
    epochs = epochs or EPOCHS
    out_dir = Path(out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    saved_cache = os.environ.get("XRAYLIB_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="xraylib-demo-") as tmp, locals3.local_s3_server() as server:
        # A cache of its own, so the demo neither reuses nor fills the user's (the kernels inherit it).
        os.environ["XRAYLIB_CACHE_DIR"] = str(Path(tmp) / "cache")
        try:
            print(f"local S3 server at {server.endpoint_url}; bucket {BUCKET}")
            locals3.create_bucket(BUCKET)
            counts = synthetic.generate_dataset(Path(tmp) / DATA_PREFIX, images_per_class, seed=SEED)
            data = f"s3://{BUCKET}/{DATA_PREFIX}"
            print(f"generated {sum(sum(c.values()) for c in counts.values())} synthetic images {counts}")
            print(f"uploading to {data}: {storage.upload_directory(Path(tmp) / DATA_PREFIX, data)}")

            run = f"s3://{BUCKET}/{RUN_PREFIX}"
            evaluation = storage.join(run, "evaluation")
            print(f"\n== train notebook -> {run}")
            run_notebook("train", {"data": data, "out": run, "epochs": epochs, "image_size": IMAGE_SIZE,
                                   "batch_size": BATCH_SIZE, "lr": LEARNING_RATE, "weights": WEIGHTS, "seed": SEED,
                                   "device": "cpu"})
            print(f"\n== test notebook -> {evaluation}")
            run_notebook("test", {"model": run, "data": data, "out": evaluation,
                                  "new_images": storage.join(data, "val")})

            for folder, names in ((run, TRAIN_FILES), (evaluation, EVAL_FILES)):
                for name in names:
                    storage.write_bytes(str(out_dir / name), storage.read_bytes(storage.join(folder, name)))
        finally:
            if saved_cache is None:
                os.environ.pop("XRAYLIB_CACHE_DIR", None)
            else:
                os.environ["XRAYLIB_CACHE_DIR"] = saved_cache

    metrics = json.loads((out_dir / "metrics.json").read_text())
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; results in {out_dir}:")
    for name in (*TRAIN_FILES, *EVAL_FILES):
        print(f"  {name}")
    print(f"test set ({metrics['n_images']} generated images): accuracy {metrics['accuracy']:.3f}, "
          f"sensitivity {metrics['sensitivity']:.3f}, specificity {metrics['specificity']:.3f}, "
          f"ROC AUC {metrics['roc_auc']:.3f}, PR AUC {metrics['pr_auc']:.3f} at threshold {metrics['threshold']:.2f}")
    low, high = metrics["ci95"]["accuracy"]
    print(f"accuracy's 95% interval, resampling patients: {low:.3f} to {high:.3f}; calibration: Brier "
          f"{metrics['brier']:.3f}, ECE {metrics['ece']:.3f}")
    print(f"open the notebooks with `make lab`, or {out_dir / 'test_classifier.executed.ipynb'} in JupyterLab")
    return metrics
