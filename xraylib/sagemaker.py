"""SageMaker Training Jobs: `xraylib train` on AWS's machines, launched from the command line or a notebook.

`launch_training_job` builds the job with the SageMaker Python SDK's `ModelTrainer` (the
`sagemaker-train` package, an optional extra: `pip install 'xraylib[sagemaker]'`):

- the container is AWS's prebuilt PyTorch training image for the installed torch's major.minor
  (`default_image_uri`), or `image_uri`;
- the SDK uploads this package's source (`stage_source`: the `xraylib` folder, a one-line entry
  script and the requirements the image lacks) and SageMaker's torchrun driver runs the entry
  script on every GPU of every instance; `sagemaker_entry.py` is the job's side of the contract;
- the train settings travel as the job's hyperparameters (`job_hyperparameters`), read back in
  the container by `parse_hyperparameters`;
- checkpoints are synced to `<out>/checkpoints`; the SDK's staging (source, drivers) and
  SageMaker's own output (model.tar.gz) go under `<out>/sagemaker/`;
- the role is `role`, else the caller's own (in SageMaker Studio, the notebook's execution role);
  the region comes from boto3's chain. No credential goes into the job: the container runs with
  the role's.

Nothing here imports the SDK (or boto3) until a job is launched.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xraylib import config, storage
from xraylib.errors import ConfigError, TrainingJobError

Log = Callable[[str], None]

INSTALL_HINT = "pip install 'xraylib[sagemaker]'"
# The uploaded source: the xraylib package, this script (SageMaker's torchrun driver runs a file of
# the source folder, which then finds the package beside it) and the requirements the image lacks.
ENTRY_SCRIPT = "xraylib_job.py"
ENTRY_SCRIPT_SOURCE = '''"""Run by SageMaker's torchrun driver on every GPU of a training job: see xraylib/sagemaker_entry.py."""

import sys

from xraylib.sagemaker_entry import main

sys.exit(main())
'''
REQUIREMENTS_FILE = "requirements.txt"
CHECKPOINTS_FOLDER = "checkpoints"  # <out>/checkpoints: the container's checkpoint folder, synced
STAGING_FOLDER = "sagemaker"  # <out>/sagemaker: the uploaded source, drivers and SageMaker's output
JOB_FILES = (config.MODEL_FILENAME, config.HISTORY_FILENAME, config.CURVES_FILENAME)  # copied to --out
FAILED_STATUSES = ("Failed", "Stopped")
ENDED_STATUSES = ("Completed", *FAILED_STATUSES)
LOG_GROUP = "/aws/sagemaker/TrainingJobs"  # where SageMaker puts a job's log, one stream per instance


# ---------------------------------------------------------------------------------------------
# The contract between the launcher and the container: hyperparameters


def job_hyperparameters(train_values: Mapping[str, Any]) -> dict[str, str]:
    """The train settings given explicitly (None: not given) as the job's hyperparameters, one
    string per TrainConfig field: what is left out takes its default, or the preset's, in the job.
    `resume` is left out: a job always resumes from its checkpoints."""
    known = {f.name for f in dataclasses.fields(config.TrainConfig)}
    unknown = sorted(set(train_values) - known)
    if unknown:
        raise ConfigError(f"unknown training parameter(s): {', '.join(unknown)}")
    return {name: json.dumps(value) if isinstance(value, bool) else str(value)
            for name, value in train_values.items() if value is not None and name != "resume"}


def _typed(name: str, kind: str, text: str) -> Any:
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"hyperparameter {name} must be a {kind}, got {text!r}") from None
    return text


def parse_hyperparameters(argv: Sequence[str]) -> dict[str, Any]:
    """`["--epochs", "3", "--data", "s3://b/x"]`, as SageMaker's torchrun driver passes the job's
    hyperparameters, back to `{"epochs": 3, "data": "s3://b/x"}`, typed as TrainConfig declares."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(config.TrainConfig)}
    if len(argv) % 2:
        raise ConfigError(f"hyperparameters come as --name value pairs, got {' '.join(argv)!r}")
    values: dict[str, Any] = {}
    for flag, text in zip(argv[::2], argv[1::2], strict=True):
        name = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or name not in kinds:
            raise ConfigError(f"unknown hyperparameter {flag!r}; known: {', '.join(sorted(kinds))}")
        values[name] = _typed(name, kinds[name], text)
    return values


# ---------------------------------------------------------------------------------------------
# The launcher


@dataclass
class TrainingJob:
    """A launched training job, as DescribeTrainingJob last reported it."""

    name: str
    region: str
    status: str
    spot: bool
    instance_count: int = 1
    billable_seconds: int | None = None
    training_seconds: int | None = None
    failure_reason: str | None = None

    @property
    def console_url(self) -> str:
        return f"https://{self.region}.console.aws.amazon.com/sagemaker/home?region={self.region}#/jobs/{self.name}"

    @property
    def spot_savings(self) -> float | None:
        """The share of the training time not billed (spot pricing); None without spot or figures."""
        if not self.spot or not self.billable_seconds or not self.training_seconds:
            return None
        return 1.0 - self.billable_seconds / self.training_seconds

    def summary(self) -> str:
        parts = [f"training job {self.name}: {self.status}"]
        if self.training_seconds is not None:
            parts.append(f"trained {self.training_seconds} s")
        if self.billable_seconds is not None:
            parts.append(f"billable {self.billable_seconds} s")
        else:
            parts.append("billable seconds not reported")
        if self.spot:
            savings = self.spot_savings
            parts.append(f"spot savings {savings:.0%}" if savings is not None else "spot savings not reported")
        return ", ".join(parts)


def _import_sdk() -> Any:
    try:
        import sagemaker.train.model_trainer as model_trainer
    except ImportError:
        raise TrainingJobError(f"SageMaker training jobs need the SageMaker Python SDK: {INSTALL_HINT}") from None
    return model_trainer


def aws_region() -> str:
    """The region boto3's chain gives (AWS_REGION, AWS_DEFAULT_REGION, the AWS config file)."""
    import boto3

    region = boto3.session.Session().region_name
    if not region:
        raise TrainingJobError("no AWS region for the training job: set AWS_DEFAULT_REGION (e.g. us-east-1, where the "
                               "data is) or run `aws configure set region REGION`")
    return region


def default_image_uri(region: str, instance_type: str, torch_version: str | None = None) -> str:
    """AWS's prebuilt PyTorch training container for `torch_version` (default: the installed
    torch's) on `instance_type` (CPU or GPU image), as the SDK's image_uris knows them."""
    from importlib.metadata import version

    _import_sdk()
    from sagemaker.core import image_uris

    wanted = ".".join((torch_version or version("torch")).split("+")[0].split(".")[:2])
    for framework in config.SAGEMAKER_IMAGE_FRAMEWORKS:
        try:
            return image_uris.retrieve(framework, region, version=wanted, instance_type=instance_type,
                                       image_scope="training")
        except ValueError:
            continue
    raise TrainingJobError(
        f"no prebuilt SageMaker PyTorch training container for torch {wanted} on {instance_type} in {region} is known to "
        f"sagemaker-core {version('sagemaker-core')}: pass --image-uri with a PyTorch {wanted} training image, "
        "or upgrade sagemaker-train")


def job_requirements() -> list[str]:
    """xraylib's own dependencies (as installed) less what the prebuilt image brings and what only
    the notebooks need: pip leaves a package the image already has at a satisfying version alone."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires("xraylib") or []
    except PackageNotFoundError:
        raise TrainingJobError("xraylib is not installed, so its dependencies are unknown: pip install -e '.[sagemaker]' "
                               "in the source folder") from None
    skipped = {*config.SAGEMAKER_IMAGE_PROVIDES, *config.SAGEMAKER_NOTEBOOK_ONLY}
    kept = []
    for requirement in requirements:
        if ";" in requirement:  # an extra's, or for another platform
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")
        if name not in skipped:
            kept.append(requirement)
    return kept


def stage_source(folder: Path) -> Path:
    """Write what the SDK uploads into `folder`: the xraylib package, the entry script and the
    requirements file. Returns `folder`."""
    package = Path(__file__).resolve().parent
    shutil.copytree(package, folder / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / ENTRY_SCRIPT).write_text(ENTRY_SCRIPT_SOURCE, encoding="utf-8")
    (folder / REQUIREMENTS_FILE).write_text("\n".join(job_requirements()) + "\n", encoding="utf-8")
    return folder


def _check_locations(cfg: config.TrainConfig) -> None:
    for name, location in (("--data", cfg.data), ("--out", cfg.out)):
        if not location.startswith("s3://"):
            raise ConfigError(f"a training job reads and writes S3: {name} must be an s3:// location, got {location!r}")
    if cfg.weights not in ("imagenet", "none") and not cfg.weights.startswith("s3://"):
        raise ConfigError(f"a training job cannot read the local weights file {cfg.weights!r}: upload it and pass its "
                          "s3:// location")


def _stopping_seconds(spot: bool, max_run: str | None, max_wait: str | None) -> tuple[int, int | None]:
    run_s = int(config.parse_duration(max_run or config.SAGEMAKER_MAX_RUN))
    if not spot:
        if max_wait is not None:
            raise ConfigError("--max-wait is how long a spot job may wait for capacity: pass --spot with it")
        return run_s, None
    wait_s = int(config.parse_duration(max_wait)) if max_wait is not None else config.SAGEMAKER_SPOT_WAIT_FACTOR * run_s
    if wait_s < run_s:
        raise ConfigError(f"--max-wait ({wait_s} s) must be at least --max-run ({run_s} s): it counts the training time "
                          "as well as the waits for spot capacity")
    return run_s, wait_s


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _role_error(exc: Exception, role: str | None) -> TrainingJobError:
    reason = _one_line(str(exc).split("\n\n")[0])  # the SDK's reason, without its code sample
    if role is None:
        return TrainingJobError(
            f"no SageMaker execution role ({reason}): pass --role arn:aws:iam::ACCOUNT:role/NAME, a role that "
            "sagemaker.amazonaws.com may assume, with read access to --data and write access to --out "
            "(in SageMaker Studio, the notebook's execution role is used)")
    return TrainingJobError(f"the role {role} cannot run the training job: {reason}")


def describe_job(name: str, region: str) -> TrainingJob:
    """The job `name` as DescribeTrainingJob reports it now."""
    import boto3

    described = boto3.session.Session(region_name=region).client("sagemaker").describe_training_job(TrainingJobName=name)
    return TrainingJob(name=name, region=region, status=described["TrainingJobStatus"],
                       spot=bool(described.get("EnableManagedSpotTraining")),
                       instance_count=int(described.get("ResourceConfig", {}).get("InstanceCount", 1)),
                       billable_seconds=described.get("BillableTimeInSeconds"),
                       training_seconds=described.get("TrainingTimeInSeconds"),
                       failure_reason=described.get("FailureReason"))


def launch_training_job(
    train_values: Mapping[str, Any], *, instance_type: str, instance_count: int = config.SAGEMAKER_INSTANCE_COUNT,
    spot: bool = False, max_run: str | None = None, max_wait: str | None = None, role: str | None = None,
    image_uri: str | None = None, wait: bool = True, log: Log = print,
) -> TrainingJob:
    """Start `xraylib train` with `train_values` (TrainConfig fields; None: not given) as a
    SageMaker training job on `instance_count` `instance_type` instances. With `wait`, follow its
    log until it ends; a failed or stopped job raises TrainingJobError with its failure reason."""
    import tempfile

    values = {k: v for k, v in train_values.items() if v is not None}
    cfg = config.make_train_config(**values)  # the settings are checked here, not minutes later in the job
    _check_locations(cfg)
    if not instance_type.startswith("ml."):
        raise ConfigError(f"instance type {instance_type!r} is not a SageMaker one: they start with ml., e.g. ml.g5.xlarge")
    if instance_count < 1:
        raise ConfigError(f"--instance-count must be at least 1, got {instance_count}")
    run_s, wait_s = _stopping_seconds(spot, max_run, max_wait)
    model_trainer = _import_sdk()
    region = aws_region()
    image = image_uri or default_image_uri(region, instance_type)

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError
    from sagemaker.core.helper.iam_role_resolver import RoleValidationError
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.training.configs import CheckpointConfig, Compute, OutputDataConfig, SourceCode, StoppingCondition
    from sagemaker.train.distributed import Torchrun

    staging = storage.join(cfg.out, STAGING_FOLDER)
    bucket, prefix = storage.parse_s3(staging)
    with tempfile.TemporaryDirectory(prefix="xraylib-job-") as tmp:
        source = stage_source(Path(tmp))
        try:
            session = Session(boto_session=boto3.session.Session(region_name=region), default_bucket=bucket,
                              default_bucket_prefix=prefix)
            try:
                trainer = model_trainer.ModelTrainer(
                    sagemaker_session=session, role=role, base_job_name=config.SAGEMAKER_BASE_JOB_NAME, training_image=image,
                    source_code=SourceCode(source_dir=str(source), entry_script=ENTRY_SCRIPT, requirements=REQUIREMENTS_FILE),
                    distributed=Torchrun(),  # one process per GPU of each instance (one on a CPU instance)
                    compute=Compute(instance_type=instance_type, instance_count=instance_count,
                                    enable_managed_spot_training=spot),
                    stopping_condition=StoppingCondition(max_runtime_in_seconds=run_s, max_wait_time_in_seconds=wait_s),
                    checkpoint_config=CheckpointConfig(s3_uri=storage.join(cfg.out, CHECKPOINTS_FOLDER),
                                                       local_path=config.SAGEMAKER_CHECKPOINT_DIR),
                    output_data_config=OutputDataConfig(s3_output_path=staging),
                    hyperparameters=job_hyperparameters(values),
                )
            except (RoleValidationError, ValueError) as exc:
                if isinstance(exc, RoleValidationError) or "role" in str(exc).lower():
                    raise _role_error(exc, role) from None
                raise
            trainer.train(wait=False, logs=False)
        except (BotoCoreError, ClientError) as exc:
            raise TrainingJobError(f"SageMaker refused the training job: {_one_line(exc)}") from None
    name = trainer._latest_training_job.training_job_name  # the SDK's handle on the job it created (its documented way)
    log(f"training job: {name}")
    log(TrainingJob(name, region, "", spot).console_url)
    if not wait:
        job = describe_job(name, region)
        log(f"not waiting: status {job.status}; results will be in {cfg.out}")
        return job
    return report_job_end(follow_training_job(name, region, log=log), cfg.out, log=log)


def report_job_end(job: TrainingJob, out: str, *, log: Log = print) -> TrainingJob:
    """Print how the ended `job` went (status, billable seconds, spot savings); a failed or stopped
    job raises TrainingJobError with SageMaker's failure reason, which the CLI turns into its exit status."""
    log(job.summary())
    if job.status in FAILED_STATUSES:
        raise TrainingJobError(f"training job {job.name} {job.status.lower()}: "
                               f"{_one_line(job.failure_reason or 'no reason given')}")
    log(f"results in {out}")
    return job


def follow_training_job(name: str, region: str, *, log: Log = print, poll_s: float = config.SAGEMAKER_LOG_POLL_S) -> TrainingJob:
    """Print the log of the job `name` as it comes (CloudWatch Logs, through the SDK's stream
    reader; each line marked with its instance when there are several) until the job ends, and
    return it as DescribeTrainingJob reports it then."""
    import time

    _import_sdk()
    from sagemaker.core.utils.logs import MultiLogStreamHandler

    def show(streams: Any, several: bool) -> None:
        for stream, event in streams.get_latest_log_events():
            instance = stream.removeprefix(name + "/").rsplit("-", 1)[0]  # <job>/algo-2-1700000000 -> algo-2
            log(f"[{instance}] {event['message'].rstrip()}" if several else event["message"].rstrip())

    job = describe_job(name, region)
    streams = MultiLogStreamHandler(LOG_GROUP, name, expected_stream_count=job.instance_count)
    while True:
        job = describe_job(name, region)  # before reading: what was logged until the job ended is all read below
        show(streams, job.instance_count > 1)
        if job.status in ENDED_STATUSES:
            if not streams.ready():  # an instance that never logged (a job that failed early): read what exists
                show(MultiLogStreamHandler(LOG_GROUP, name, expected_stream_count=1), job.instance_count > 1)
            return job
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# What a finished job left in --out


@dataclass
class JobResults:
    """The history and the saved model's validation metrics of a training run's output location."""

    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    best_epoch: int
    model_location: str


def read_job_results(out: str) -> JobResults:
    """What a training job (or `xraylib train`) left in `out`: history.json and the model's metadata."""
    from xraylib.model import load_model

    history = json.loads(storage.read_bytes(storage.join(out, config.HISTORY_FILENAME)))
    model_location = storage.join(out, config.MODEL_FILENAME)
    metadata = load_model(model_location).metadata
    return JobResults(history, dict(metadata.get("val_metrics", {})), int(metadata.get("best_epoch", 0)), model_location)


__all__ = ["JobResults", "TrainingJob", "default_image_uri", "follow_training_job", "job_hyperparameters",
           "launch_training_job",
           "parse_hyperparameters", "read_job_results", "stage_source"]
