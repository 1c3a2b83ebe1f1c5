"""Inside a SageMaker training job: the job's side of the contract, run on every GPU of every instance.

SageMaker's torchrun driver runs the uploaded `xraylib_job.py` as `torchrun --nnodes H
--nproc_per_node P xraylib_job.py --data S3 --out S3 --epochs 10 ...`, one `--name value` pair per
hyperparameter (`sagemaker.job_hyperparameters`); that script calls `main`, which:

- reads the data straight from its S3 location, with the job's role;
- trains into the checkpoint folder (`/opt/ml/checkpoints`, or `XRAYLIB_CHECKPOINT_DIR`), which
  SageMaker syncs with `<out>/checkpoints` while the job runs and copies back into a restarted
  job, and always resumes: a job restarted after a spot interruption, or a new job with the same
  `--out`, continues from the last checkpoint by itself;
- then, on the global rank 0 only, copies the model file, history and curves to `SM_MODEL_DIR`
  (SageMaker packs it into model.tar.gz) and to `--out`;
- ends a problem the user can fix with one line, also written to `SM_OUTPUT_FAILURE`, which
  SageMaker reports as the job's FailureReason.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xraylib import config, storage
from xraylib.errors import ConfigError, XrayError
from xraylib.sagemaker import JOB_FILES, Log, parse_hyperparameters


def checkpoint_dir() -> str:
    """The folder SageMaker syncs with `<out>/checkpoints`."""
    return os.environ.get("XRAYLIB_CHECKPOINT_DIR") or config.SAGEMAKER_CHECKPOINT_DIR


def model_dir() -> str:
    return os.environ.get("SM_MODEL_DIR") or config.SAGEMAKER_MODEL_DIR


def is_global_rank_zero() -> bool:
    """torchrun numbers every process of every instance; without torchrun there is one."""
    return int(os.environ.get("RANK", "0")) == 0


def run_job(values: dict[str, Any], *, log: Log = print) -> list[str]:
    """Train with the job's hyperparameters `values` into the checkpoint folder, resuming from
    what is there, and publish the results. Returns where they were copied (rank 0; [] elsewhere)."""
    from xraylib.training import train

    values = dict(values)
    out = values.pop("out", None)
    if not out:
        raise ConfigError("the training job has no out hyperparameter: launch it with `xraylib sagemaker train --out S3`")
    values.pop("resume", None)
    local = checkpoint_dir()
    cfg = config.make_train_config(**values, out=local, resume=True)
    train(cfg, log=log, progress=False)
    if not is_global_rank_zero():
        return []
    copies = []
    for name in JOB_FILES:
        data = storage.read_bytes(storage.join(local, name))
        for folder in (model_dir(), out):
            storage.write_bytes(storage.join(folder, name), data)
            copies.append(storage.join(folder, name))
    log(f"copied {', '.join(JOB_FILES)} to {model_dir()} and {out}")
    return copies


def write_failure(message: str) -> None:
    """Leave `message` where SageMaker reads a job's FailureReason; the first failure is the one kept."""
    path = Path(os.environ.get("SM_OUTPUT_FAILURE") or "/opt/ml/output/failure")
    if path.parent.is_dir() and not path.exists():
        with contextlib.suppress(OSError):  # the log has the message; the failure file is a courtesy
            path.write_text(message + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    # Line by line into the job's log (CloudWatch), as it happens, not in 8 KB blocks.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        run_job(parse_hyperparameters(sys.argv[1:] if argv is None else argv))
    except XrayError as exc:
        print(f"xraylib: error: {exc}", file=sys.stderr, flush=True)
        write_failure(str(exc))
        return 2
    return 0
