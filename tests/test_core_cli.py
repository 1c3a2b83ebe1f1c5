"""The `xraylib` command as a user runs it: real processes, the loopback S3 server over HTTP."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import run_side_by_side
from xraylib import storage


def xraylib(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xraylib", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xraylib: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.timeout(400)
def test_upload_train_evaluate_predict_from_s3(bucket, tiny_dataset, tmp_path):
    data = f"s3://{bucket}/chest_xray"
    up = xraylib("upload", str(tiny_dataset), data)
    assert up.returncode == 0, up.stderr
    assert "ignored 1 non-image file(s)" in up.stdout
    assert "already there 0" in up.stdout
    again = xraylib("upload", str(tiny_dataset), data)
    assert "uploaded 0," in again.stdout

    out = f"s3://{bucket}/runs/cli"
    trained = xraylib("train", "--data", data, "--out", out, "--epochs", "1", "--image-size", "32", "--batch-size", "16",
                      "--weights", "none")
    assert trained.returncode == 0, trained.stderr
    assert "epoch 1/1" in trained.stdout

    results = f"s3://{bucket}/eval/cli"
    evaluated = xraylib("evaluate", "--model", out, "--data", data, "--out", results)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(storage.read_bytes(f"{results}/metrics.json"))
    required = {"accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc", "threshold", "n_images",
                "confusion_matrix"}
    assert required <= set(metrics)
    assert metrics["n_images"] == 40
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 40
    written = {o.relpath for o in storage.list_objects(results)}
    assert written == {"metrics.json", "confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration.png",
                       "model_card.md", "predictions.csv"}
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{results}/predictions.csv").decode())))
    assert len(rows) == 40 and all(r["image"].startswith(f"{data}/test/") for r in rows)

    images = [f"{data}/test/NORMAL/" + p.name for p in sorted((tiny_dataset / "test" / "NORMAL").glob("*.jpeg"))[:2]]
    local = sorted((tiny_dataset / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    predicted = xraylib("predict", "--model", f"{out}/model.pt", *images, str(local))
    assert predicted.returncode == 0, predicted.stderr
    lines = [line.split("\t") for line in predicted.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == [*images, str(local)]
    assert all(line[1] in ("NORMAL", "PNEUMONIA") and 0 <= float(line[2]) <= 1 for line in lines)

    # A prefix stands for every image below it. A bad image fails the run unless --skip-bad, which
    # leaves it out and says so on stderr; stdout keeps one prediction per line.
    storage.write_bytes(f"{data}/val/NORMAL/broken.jpeg", b"\xff\xd8\xff not a jpeg")
    assert_one_line_error(xraylib("predict", "--model", out, f"{data}/val"), "val/NORMAL/broken.jpeg", "--skip-bad")
    storage.write_bytes(f"{data}/val/notes.txt", b"not an image")
    skipping = xraylib("predict", "--model", out, f"{data}/val/", "--skip-bad")
    assert skipping.returncode == 0, skipping.stderr
    good = sorted(f"{data}/val/{p.relative_to(tiny_dataset / 'val').as_posix()}"
                  for p in (tiny_dataset / "val").rglob("*.jpeg"))
    assert [line.split("\t")[0] for line in skipping.stdout.strip().splitlines()] == good
    assert "ignored 1 non-image file(s)" in skipping.stderr
    assert "skipped 1 bad image(s)" in skipping.stderr and "val/NORMAL/broken.jpeg" in skipping.stderr


def test_user_errors_print_one_line_and_exit_nonzero(bucket, tiny_dataset, tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    (tmp_path / "model.pt").write_text("not a model")
    (tmp_path / "scan.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    cases = [
        # An --out that cannot be written to is found before a single image is decoded.
        (["train", "--data", str(tiny_dataset), "--out", "s3://no-such-bucket-xyz/run"],
         ["no-such-bucket-xyz", "does not exist"]),
        (["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "a-file" / "run")],
         ["cannot write", "a-file/run/history.json"]),
        (["train", "--data", "s3://no-such-bucket-xyz/data", "--out", str(tmp_path / "o")],
         ["no-such-bucket-xyz", "does not exist"]),
        (["train", "--data", f"s3://{bucket}/empty", "--out", str(tmp_path / "o")], [f"s3://{bucket}/empty"]),
        (["predict", "--model", str(tmp_path / "model.pt"), "x.jpeg"], ["model.pt"]),
        (["evaluate", "--model", str(tmp_path / "nowhere"), "--data", str(tmp_path), "--out", str(tmp_path / "e")],
         ["nowhere"]),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "0"], ["epochs must be at least 1"]),
    ]
    results = run_side_by_side(*(([sys.executable, "-m", "xraylib", *args], None) for args, _ in cases))
    for (_, fragments), result in zip(cases, results, strict=True):
        assert_one_line_error(result, *fragments)
    unwritable = results[0]
    assert "found" not in unwritable.stdout and "epoch" not in unwritable.stdout


def test_missing_credentials_are_a_clear_error(s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": s3_server.endpoint_url,
                "AWS_DEFAULT_REGION": "us-east-1"})
    result = subprocess.run([sys.executable, "-m", "xraylib", "train", "--data", "s3://some-bucket/data", "--out",
                             str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(result, "no AWS credentials found for s3://some-bucket/data", "aws configure")


def test_importing_xraylib_loads_nothing_heavy():
    code = "import sys, xraylib; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'boto3', 'botocore')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_every_training_parameter_has_a_train_flag(capsys):
    import dataclasses

    from xraylib import config
    from xraylib.cli import get_args_parser

    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["train", "--help"])
    usage = capsys.readouterr().out
    flags = {f.name: "--no-augment" if f.name == "augment" else "--" + f.name.replace("_", "-")
             for f in dataclasses.fields(config.TrainConfig)}
    assert [flag for flag in flags.values() if flag not in usage] == []
