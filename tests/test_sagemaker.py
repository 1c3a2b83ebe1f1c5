"""SageMaker Training Jobs without an AWS account: the launcher (`xraylib sagemaker train`) against
moto's SageMaker, S3, IAM and STS APIs on loopback, over HTTP, and the job's entry point run as the
container runs it: SageMaker's own torchrun driver, as the SDK uploaded it, with `SM_*` variables
and `/opt/ml`-style folders under a temporary directory.

What this does not prove: that AWS accepts the job (moto stores what it is given and calls every
job Completed at once, running nothing), that the prebuilt image runs it, that SageMaker syncs the
checkpoint folder and sends SIGTERM as documented, or anything about GPUs or several instances.

moto cannot simulate IAM policies (iam:SimulatePrincipalPolicy answers 500), so the SDK's
client-side role check is turned off the way the SDK documents, SAGEMAKER_VALIDATE_ROLE=false; the
role must still exist in IAM, and a missing one is still found (from the caller's identity, STS).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import run_side_by_side, scratch_dir
from xraylib import config, locals3, storage
from xraylib.errors import ConfigError, TrainingJobError
from xraylib.sagemaker import job_hyperparameters, parse_hyperparameters

pytest.importorskip("sagemaker.train", reason="needs the SageMaker SDK: pip install 'xraylib[sagemaker]'")

ROOT = Path(__file__).resolve().parents[1]
# Processes per instance when the entry point runs under torchrun: two, as on a 2-GPU instance
# (gloo on the CPU here), training one model together.
TORCHRUN_PROCESSES = 2
# The launcher's credentials, of its own (moto takes any): locals3.py's, in the uploaded source, would be found.
SECRETS = (f"AKIA{uuid.uuid4().hex[:16].upper()}", f"secret-{uuid.uuid4().hex}")
TINY_JOB = ["--epochs", "2", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--seed", "3"]


def xraylib(*args: str, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xraylib", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("xraylib: ")]
    assert len(lines) == 1 and lines[0].startswith("xraylib: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sdk_env(s3_server, tmp_path_factory) -> dict[str, str]:
    """The environment of a launcher process: the loopback server for every AWS API, the SDK's
    telemetry off (no request leaves this machine), its role check off (see the docstring)."""
    settings = tmp_path_factory.mktemp("sagemaker-config") / "config.yaml"
    settings.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    return {**os.environ, **s3_server.env(), "AWS_ACCESS_KEY_ID": SECRETS[0], "AWS_SECRET_ACCESS_KEY": SECRETS[1],
            "SAGEMAKER_USER_CONFIG_OVERRIDE": str(settings), "SAGEMAKER_VALIDATE_ROLE": "false"}


@pytest.fixture(scope="module")
def role(s3_server) -> str:
    """An execution role in moto's IAM that SageMaker may assume."""
    import boto3

    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"},
                                                     "Action": "sts:AssumeRole"}]}
    return boto3.client("iam").create_role(RoleName=f"xraylib-job-{uuid.uuid4().hex[:8]}",
                                           AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


def job_name(stdout: str) -> str:
    names = [line.removeprefix("training job: ") for line in stdout.splitlines() if line.startswith("training job: ")]
    assert len(names) == 1, stdout
    return names[0]


def describe(name: str) -> dict:
    import boto3

    described = boto3.client("sagemaker").describe_training_job(TrainingJobName=name)
    described.pop("ResponseMetadata")
    return described


def channel(described: dict, name: str) -> str:
    return next(c["DataSource"]["S3DataSource"]["S3Uri"] for c in described["InputDataConfig"] if c["ChannelName"] == name)


# ---------------------------------------------------------------------------------------------
# The launcher


def test_the_launcher_creates_the_job_it_is_asked_for(bucket, role, sdk_env):
    data, out = f"s3://{bucket}/chest_xray", f"s3://{bucket}/runs/job"
    launched = xraylib("sagemaker", "train", "--data", data, "--out", out, "--instance-type", "ml.g5.xlarge",
                       "--instance-count", "2", "--spot", "--max-run", "2h", "--role", role, "--no-wait",
                       "--preset", "gpu", "--epochs", "3", "--image-size", "128", "--no-augment", "--freeze-backbone",
                       "--lr", "0.0003", "--resume", env=sdk_env)
    assert launched.returncode == 0, launched.stderr
    name = job_name(launched.stdout)
    assert f"https://us-east-1.console.aws.amazon.com/sagemaker/home?region=us-east-1#/jobs/{name}" in launched.stdout
    described = describe(name)

    # AWS's prebuilt PyTorch training container (AWS's deep learning containers account), for the
    # installed torch's major.minor, its GPU build for a GPU instance.
    image = described["AlgorithmSpecification"]["TrainingImage"]
    repository, tag = image.split(":")
    torch_minor = ".".join(version("torch").split("+")[0].split(".")[:2])
    assert repository.startswith("763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch"), image
    assert tag.startswith(torch_minor + "-") and "cpu" not in tag, image
    assert described["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert described["ResourceConfig"]["InstanceCount"] == 2
    assert described["EnableManagedSpotTraining"] is True
    stopping = described["StoppingCondition"]
    assert stopping["MaxRuntimeInSeconds"] == 7200
    assert stopping["MaxWaitTimeInSeconds"] > stopping["MaxRuntimeInSeconds"]
    assert described["CheckpointConfig"] == {"S3Uri": f"{out}/checkpoints", "LocalPath": "/opt/ml/checkpoints"}
    assert described["RoleArn"] == role
    # Every train flag given, and only those (a job always resumes: --resume is not passed on).
    assert described["HyperParameters"] == {"data": data, "out": out, "preset": "gpu", "epochs": "3",
                                            "image_size": "128", "augment": "none", "freeze_backbone": "true",
                                            "lr": "0.0003"}

    # The source the SDK uploaded: this package as it is here, the entry script, the requirements
    # the image lacks; the prebuilt image's own torch is left alone.
    code = channel(described, "code")
    assert code.startswith(f"{out}/sagemaker/")
    uploaded = {o.relpath for o in storage.list_objects(code)}
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "xraylib").glob("*.py")}
    assert package | {"xraylib_job.py", "requirements.txt"} == uploaded
    assert [name for name in sorted(package) if storage.read_bytes(f"{code}/{name}") != (ROOT / name).read_bytes()] == []
    requirements = storage.read_bytes(f"{code}/requirements.txt").decode().split()
    assert any(r.startswith("boto3") for r in requirements)
    assert not any(r.startswith(("torch", "papermill", "jupyterlab")) for r in requirements)

    # No credentials anywhere: not in the job's description, the uploaded files or the output.
    texts = [json.dumps(described, default=str), launched.stdout, launched.stderr]
    texts += [storage.read_bytes(o.location).decode("utf-8", "replace") for o in storage.list_objects(f"{out}/sagemaker")]
    assert not [secret for secret in SECRETS for text in texts if secret in text]

    # Its log, as SageMaker writes it to CloudWatch Logs (one stream per instance; written here into
    # moto's), followed the way a waiting launcher follows it, each line marked with its instance.
    import boto3

    from xraylib.sagemaker import follow_training_job

    logs = boto3.client("logs")
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    written = {"algo-1": ["epoch 1/3  train loss 0.6", "epoch 2/3  train loss 0.4"], "algo-2": ["worker ready"]}
    for instance, lines in written.items():
        stream = f"{name}/{instance}-1764000000"
        logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream)
        logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream,
                            logEvents=[{"timestamp": int(time.time() * 1000) + i, "message": line + "\n"}
                                       for i, line in enumerate(lines)])
    followed: list[str] = []
    job = follow_training_job(name, "us-east-1", log=followed.append)
    assert followed == [f"[{instance}] {line}" for instance, lines in written.items() for line in lines]
    assert job.status == "Completed" and job.instance_count == 2 and job.spot


def test_no_role_no_region_or_no_sdk_is_one_clear_line(bucket, role, sdk_env, tmp_path):
    args = ["sagemaker", "train", "--data", f"s3://{bucket}/chest_xray", "--out", f"s3://{bucket}/runs/x",
            "--instance-type", "ml.m5.xlarge", "--image-uri", "123456789012.dkr.ecr.us-east-1.amazonaws.com/mine:1"]
    no_region = {k: v for k, v in sdk_env.items() if k not in ("AWS_DEFAULT_REGION", "AWS_REGION")}
    no_region.update(AWS_CONFIG_FILE=str(tmp_path / "none"))
    blocked = "import sys; sys.modules['sagemaker'] = None; from xraylib.cli import main; sys.exit(main(sys.argv[1:]))"
    # The three at once: each spends most of its time importing the SDK, which the cores share.
    no_role, no_region_result, without_sdk = run_side_by_side(
        ([sys.executable, "-m", "xraylib", *args], sdk_env),
        ([sys.executable, "-m", "xraylib", *args, "--role", role], no_region),
        ([sys.executable, "-c", blocked, *args, "--role", role], sdk_env), timeout=180)
    # No --role, and the caller (moto's STS: an IAM user) has no role behind it.
    assert_one_line_error(no_role, "no SageMaker execution role", "--role arn:aws:iam::")
    # No region anywhere in boto3's chain.
    assert_one_line_error(no_region_result, "no AWS region", "AWS_DEFAULT_REGION")
    # Without the SDK (the `sagemaker` extra not installed), the command says how to install it.
    assert_one_line_error(without_sdk, "pip install 'xraylib[sagemaker]'")


def test_settings_a_job_cannot_run_with_are_refused_before_anything_is_uploaded(bucket, s3_client, tmp_path):
    from xraylib.sagemaker import launch_training_job

    values = {"data": f"s3://{bucket}/chest_xray", "out": f"s3://{bucket}/runs/x"}
    refused = [
        ({}, {"max_wait": "3h"}, "pass --spot with it"),
        ({}, {"spot": True, "max_run": "4h", "max_wait": "1h"}, "must be at least --max-run"),
        ({"data": str(tmp_path)}, {}, "--data must be an s3:// location"),
        ({"weights": str(tmp_path / "resnet50.pth")}, {}, "upload it and pass its s3:// location"),
        ({"epochs": 0}, {}, "epochs must be at least 1"),
        ({}, {"instance_type": "g5.xlarge"}, "they start with ml."),
        ({}, {"max_run": "soon"}, "cannot read the duration 'soon'"),
    ]
    for train_changes, job_changes, message in refused:
        with pytest.raises(ConfigError, match=re.escape(message)):
            launch_training_job({**values, **train_changes}, **{"instance_type": "ml.m5.xlarge", **job_changes})
    assert s3_client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_no_prebuilt_image_for_this_torch_says_to_pass_one():
    from xraylib.sagemaker import default_image_uri

    with pytest.raises(TrainingJobError, match="pass --image-uri") as caught:
        default_image_uri("us-east-1", "ml.g5.xlarge", torch_version="1.99.0")
    assert "1.99" in str(caught.value) and "\n" not in str(caught.value)


def test_the_hyperparameters_survive_the_torchrun_driver():
    """What the launcher puts in the job comes back typed, after SageMaker's torchrun driver has
    turned the hyperparameters into command line arguments (its own function does it here)."""
    from sagemaker.train.container_drivers.common.utils import hyperparameters_to_cli_args

    values = {"data": "s3://b/chest xray", "out": "s3://b/runs/1", "epochs": 12, "lr": 3e-05, "weights": "none",
              "freeze_backbone": True, "skip_bad": False, "time_budget": "1800", "preset": "gpu",
              "threshold_policy": "sensitivity-0.95", "ema_decay": 0.995}
    argv = hyperparameters_to_cli_args(job_hyperparameters({**values, "resume": True, "seed": None}))
    assert parse_hyperparameters(argv) == values
    with pytest.raises(Exception, match="epochs must be a int"):
        parse_hyperparameters(["--epochs", "three"])
    with pytest.raises(Exception, match="unknown hyperparameter '--epoch'"):
        parse_hyperparameters(["--epoch", "3"])


def test_train_and_sagemaker_train_take_every_training_parameter(capsys):
    import dataclasses

    from xraylib.cli import get_args_parser

    for command in (["train"], ["sagemaker", "train"]):
        with pytest.raises(SystemExit):
            get_args_parser().parse_args([*command, "--help"])
        usage = capsys.readouterr().out
        flags = ["--no-augment" if f.name == "augment" else "--" + f.name.replace("_", "-")
                 for f in dataclasses.fields(config.TrainConfig)]
        assert [flag for flag in flags if flag not in usage] == [], command


def test_the_cli_and_the_notebook_take_the_launchers_job_settings(capsys):
    import inspect

    from xraylib.cli import get_args_parser
    from xraylib.notebooks import notebook_parameters, notebook_path
    from xraylib.sagemaker import launch_training_job

    settings = {name for name, p in inspect.signature(launch_training_job).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name not in ("wait", "log")}
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["sagemaker", "train", "--help"])
    usage = capsys.readouterr().out
    assert [name for name in settings if "--" + name.replace("_", "-") not in usage] == []
    assert settings <= set(notebook_parameters(notebook_path("sagemaker")))


def test_importing_the_launcher_loads_no_sdk():
    code = ("import sys, xraylib.sagemaker, xraylib.sagemaker_entry; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sagemaker', 'torch', 'boto3')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


# ---------------------------------------------------------------------------------------------
# The job's side: the entry point as the container runs it


def container_env(opt_ml: Path, described: dict, sdk_env: dict[str, str]) -> dict[str, str]:
    """What the SDK's environment.py sets in the container (SM_*), for one CPU instance, with
    /opt/ml under a temporary folder; the checkpoint folder moved there too."""
    env = {k: v for k, v in sdk_env.items() if k != "PYTHONPATH"}  # the job imports the uploaded xraylib
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # torchrun
        "OMP_NUM_THREADS": "1", "XRAYLIB_CACHE_DIR": str(opt_ml / "cache"),
        "SM_MODEL_DIR": str(opt_ml / "model"), "SM_OUTPUT_DIR": str(opt_ml / "output"),
        "SM_OUTPUT_FAILURE": str(opt_ml / "output" / "failure"), "SM_INPUT_DATA_DIR": str(opt_ml / "input" / "data"),
        "SM_SOURCE_DIR": str(opt_ml / "input" / "data" / "code"), "SM_ENTRY_SCRIPT": "xraylib_job.py",
        "SM_DISTRIBUTED_CONFIG": json.dumps({"process_count_per_node": TORCHRUN_PROCESSES, "smp": None}),
        "SM_HPS": json.dumps(described["HyperParameters"]), "SM_HOST_COUNT": "1", "SM_HOSTS": '["algo-1"]',
        "SM_CURRENT_HOST": "algo-1", "SM_CURRENT_HOST_RANK": "0", "SM_MASTER_ADDR": "algo-1",
        "SM_CURRENT_INSTANCE_TYPE": described["ResourceConfig"]["InstanceType"], "SM_NUM_GPUS": "0",
        "SM_NETWORK_INTERFACE_NAME": "lo", "TRAINING_JOB_NAME": described["TrainingJobName"],
        "XRAYLIB_CHECKPOINT_DIR": str(opt_ml / "checkpoints"),
    })
    for folder in ("model", "output", "checkpoints"):
        (opt_ml / folder).mkdir(parents=True, exist_ok=True)
    return env


def download(prefix: str, folder: Path) -> None:
    for obj in storage.list_objects(prefix):
        target = folder / obj.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(obj.location))


def start_container(opt_ml: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """sm_train.sh's last step: in the code folder, SageMaker's torchrun driver."""
    data = opt_ml / "input" / "data"
    return subprocess.Popen([sys.executable, str(data / "sm_drivers" / "distributed_drivers" / "torchrun_driver.py")],
                            cwd=data / "code", env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def epoch_lines(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.startswith("epoch ") and "train loss" in line]


@pytest.fixture(scope="module")
def finished_job(s3_server, sdk_env, role, tiny_dataset, tmp_path_factory) -> Iterator[dict]:
    """A job launched against moto, then run as the container would: killed once its first epoch
    is checkpointed, and started again with the checkpoint folder left in place."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    locals3.create_bucket(bucket)
    with scratch_dir(tmp_path_factory, "job") as tmp:
        yield _run_killed_and_resumed_job(tmp, bucket, sdk_env, role, tiny_dataset)
    locals3.delete_bucket(bucket, s3_server.endpoint_url)


def _run_killed_and_resumed_job(tmp: Path, bucket: str, sdk_env: dict[str, str], role: str, tiny_dataset: Path) -> dict:
    data, out = f"s3://{bucket}/chest_xray", f"s3://{bucket}/runs/job"
    storage.upload_directory(tiny_dataset, data)
    launched = xraylib("sagemaker", "train", "--data", data, "--out", out, "--instance-type", "ml.m5.xlarge",
                       "--role", role, "--no-wait", *TINY_JOB, env=sdk_env)
    assert launched.returncode == 0, launched.stderr
    described = describe(job_name(launched.stdout))
    opt_ml = tmp / "opt" / "ml"
    download(channel(described, "code"), opt_ml / "input" / "data" / "code")
    download(channel(described, "sm_drivers"), opt_ml / "input" / "data" / "sm_drivers")
    env = container_env(opt_ml, described, sdk_env)
    checkpoint = opt_ml / "checkpoints" / config.CHECKPOINT_FILENAME

    first = start_container(opt_ml, env, tmp / "first.log")
    deadline = time.monotonic() + 300
    # The first epoch checkpointed, and its line through the driver's pipe into the log.
    while (not checkpoint.exists() or not epoch_lines((tmp / "first.log").read_text())) and first.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    if first.poll() is not None:
        pytest.fail(f"the first run ended by itself (exit {first.returncode}) before it could be killed:\n"
                    + (tmp / "first.log").read_text()[-3000:])
    os.killpg(first.pid, signal.SIGKILL)  # the whole container: driver, torchrun and its workers
    first.wait(timeout=30)
    published_after_kill = sorted(p.name for p in (opt_ml / "model").iterdir())

    second = start_container(opt_ml, env, tmp / "second.log")
    try:
        second.wait(timeout=400)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    return {"out": out, "opt_ml": opt_ml, "first": (tmp / "first.log").read_text(), "first_code": first.returncode,
            "second": (tmp / "second.log").read_text(), "second_code": second.returncode,
            "published_after_kill": published_after_kill, "checkpointed": checkpoint.exists()}


@pytest.mark.timeout(600)
def test_a_killed_job_resumes_by_itself_and_publishes_the_model(finished_job):
    first, second = finished_job["first"], finished_job["second"]
    assert finished_job["checkpointed"], first
    assert finished_job["first_code"] == -signal.SIGKILL, first
    # Killed after its first epoch, before its second: nothing published yet.
    assert epoch_lines(first) == ["1/2"], first
    assert finished_job["published_after_kill"] == []
    # Started again with the checkpoint folder in place, it resumes by itself and trains exactly
    # the remaining epoch.
    assert finished_job["second_code"] == 0, second
    assert "resuming" in second and "after epoch 1" in second, second
    assert epoch_lines(second) == ["2/2"], second
    model_dir = finished_job["opt_ml"] / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        [config.MODEL_FILENAME, config.HISTORY_FILENAME, config.CURVES_FILENAME])
    out = finished_job["out"]
    assert storage.read_bytes(f"{out}/{config.MODEL_FILENAME}") == (model_dir / config.MODEL_FILENAME).read_bytes()
    history = json.loads(storage.read_bytes(f"{out}/{config.HISTORY_FILENAME}"))
    assert [row["epoch"] for row in history] == [1, 2]
    from xraylib.model import load_model

    trained = load_model(out)
    assert trained.metadata["train_config"]["epochs"] == 2 and trained.metadata["train_config"]["image_size"] == 32
    assert not [s for s in SECRETS if s in first + second]


@pytest.mark.timeout(300)
def test_the_notebook_launches_a_job_and_shows_what_it_left_in_out(finished_job, role, sdk_env, monkeypatch, capsys):
    """The sagemaker notebook, run headless: it launches the job (moto reports it Completed at once)
    and shows the curves and validation metrics from `out`, where the entry point above left them."""
    from xraylib.notebooks import run_notebook

    for key in ("SAGEMAKER_USER_CONFIG_OVERRIDE", "SAGEMAKER_VALIDATE_ROLE"):
        monkeypatch.setenv(key, sdk_env[key])
    out = finished_job["out"]
    parameters = {"data": out.replace("/runs/job", "/chest_xray"), "out": out, "instance_type": "ml.m5.xlarge",
                  "role": role, "epochs": 2, "image_size": 32, "batch_size": 16, "weights": "none", "seed": 3}
    executed = run_notebook("sagemaker", parameters, output=f"{out}/sagemaker_training_job.executed.ipynb")
    printed = capsys.readouterr().out
    assert "training job: xraylib-train-" in printed
    assert "Completed" in printed and "billable seconds not reported" in printed
    assert "best epoch" in printed and "of 2" in printed
    import nbformat

    nb = nbformat.reads(storage.read_bytes(executed).decode(), as_version=4)
    outputs = [o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o]
    tables = [o for o in outputs if "roc_auc" in o.get("text/html", "")]
    assert len(images) == 1 and len(tables) == 1


def test_a_failed_job_ends_with_its_reason_and_a_finished_one_with_its_bill():
    # moto's jobs always complete, so the end of a failed one is checked on the description's fields.
    from xraylib.sagemaker import TrainingJob, report_job_end

    lines: list[str] = []
    failed = TrainingJob("xraylib-1", "us-east-1", "Failed", spot=True, training_seconds=600, billable_seconds=200,
                         failure_reason="AlgorithmError: xraylib: error: no images in s3://b/x\n(exit 2)")
    with pytest.raises(TrainingJobError) as caught:
        report_job_end(failed, "s3://b/out", log=lines.append)
    assert str(caught.value) == "training job xraylib-1 failed: AlgorithmError: xraylib: error: no images in s3://b/x (exit 2)"
    assert lines == ["training job xraylib-1: Failed, trained 600 s, billable 200 s, spot savings 67%"]
    lines.clear()
    done = TrainingJob("xraylib-2", "us-east-1", "Completed", spot=False, training_seconds=600, billable_seconds=600)
    assert report_job_end(done, "s3://b/out", log=lines.append) is done
    assert lines == ["training job xraylib-2: Completed, trained 600 s, billable 600 s", "results in s3://b/out"]
