"""Training runs on generated images: it learns, writes its files, resumes after SIGKILL, and
trains in bf16 autocast."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import scratch_dir
from xraylib import cli, config, dataset, storage, synthetic
from xraylib.evaluate import evaluate_loaded
from xraylib.model import load_model
from xraylib.training import ema_update, is_better_epoch, train


@pytest.fixture(scope="module")
def learnable_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("learnable") / "chest_xray"
    synthetic.generate_dataset(root, images_per_class=90, min_side=64, max_side=96, seed=5)
    return root


@pytest.mark.timeout(300)
def test_short_training_run_on_s3_learns_and_writes_its_files(bucket, learnable_dataset):
    storage.upload_directory(learnable_dataset, f"s3://{bucket}/chest_xray")
    out = f"s3://{bucket}/runs/first"
    cfg = config.make_train_config(data=f"s3://{bucket}/chest_xray", out=out, epochs=4, image_size=48,
                                   batch_size=16, weights="none", seed=0)
    lines: list[str] = []
    result = train(cfg, log=lines.append, progress=False)

    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/4", "2/4", "3/4", "4/4"]
    val_patients = {r.patient for r in result.data.val.records}
    assert val_patients.isdisjoint({r.patient for r in result.data.train.records})
    assert result.val_metrics["accuracy"] >= 0.8, result.history
    assert result.val_metrics["roc_auc"] >= 0.9, result.history

    names = {o.relpath for o in storage.list_objects(out)}
    assert names == {"model.pt", "checkpoint.pt", "history.json", "training_curves.png"}
    history = json.loads(storage.read_bytes(f"{out}/history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # The kept epoch: the highest validation ROC AUC and, among epochs tied on it, the lowest loss.
    top = [h for h in history if h["val_roc_auc"] == max(r["val_roc_auc"] for r in history)]
    assert result.best_epoch == min(top, key=lambda h: h["val_loss"])["epoch"]
    model = load_model(out)
    assert model.metadata["best_epoch"] == result.best_epoch
    assert model.metadata["train_config"]["image_size"] == 48
    assert model.threshold == pytest.approx(result.val_metrics["threshold"])
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(model.metadata)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in storage.read_bytes(f"{out}/model.pt").decode("latin-1")


def test_a_higher_validation_auc_wins_and_a_tie_goes_to_the_lower_loss():
    best = {"epoch": 3, "roc_auc": 1.0, "val_loss": 0.26}
    assert not is_better_epoch({"val_roc_auc": 0.99, "val_loss": 0.01}, best)
    assert is_better_epoch({"val_roc_auc": 1.0, "val_loss": 0.03}, best)  # as sure of every image, and surer
    assert not is_better_epoch({"val_roc_auc": 1.0, "val_loss": 0.30}, best)
    assert is_better_epoch({"val_roc_auc": 0.2, "val_loss": 5.0}, {"epoch": 0, "roc_auc": -1.0, "val_loss": math.inf})
    assert is_better_epoch({"val_roc_auc": 1.0, "val_loss": 0.5}, {"epoch": 2, "roc_auc": 1.0})  # an older checkpoint's best


def _history_epochs(out) -> list[int]:
    path = out / config.HISTORY_FILENAME
    return [h["epoch"] for h in json.loads(path.read_text())] if path.exists() else []


@pytest.mark.timeout(300)
def test_run_killed_with_sigkill_resumes_and_finishes_every_epoch(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "xraylib", "train", "--data", str(tiny_dataset), "--out", str(out),
               "--epochs", "3", "--image-size", "32", "--batch-size", "16", "--weights", "none"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not _history_epochs(out) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.stdout.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _history_epochs(out)
    assert done and done[-1] < 3
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} after epoch {done[-1]}" in resumed.stdout
    epoch_lines = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("epoch ")]
    assert epoch_lines == [f"{e}/3" for e in range(done[-1] + 1, 4)]
    assert _history_epochs(out) == [1, 2, 3]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 3
    load_model(str(out))


RUN_FLAGS = ["--epochs", "1", "--image-size", "32", "--batch-size", "16", "--weights", "none"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dataset):
    """The output folder of a finished one-epoch run, as `xraylib train` with RUN_FLAGS leaves it."""
    with scratch_dir(tmp_path_factory, "finished") as root, pytest.MonkeyPatch.context() as mp:
        out = root / "run"
        mp.setenv("XRAYLIB_CACHE_DIR", str(root / "cache"))
        cfg = config.make_train_config(data=str(tiny_dataset), out=str(out), epochs=1, image_size=32, batch_size=16,
                                       weights="none")
        train(cfg, log=lambda _: None, progress=False)
        yield out


def _resume(capsys, data, out, *flags: str) -> tuple[int, str, str]:
    """`xraylib train ... --resume` with RUN_FLAGS and then `flags`: exit status, stdout, stderr."""
    status = cli.main(["train", "--data", str(data), "--out", str(out), *RUN_FLAGS, "--resume", *flags])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    return line


@pytest.mark.timeout(300)
def test_resume_refuses_changed_settings_by_name_and_allows_another_device(finished_run, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    # Another seed or validation share draws another validation split: trained images would be validated on.
    status, _, err = _resume(capsys, tiny_dataset, out, "--seed", "1", "--val-fraction", "0.3")
    line = _one_line(err)
    assert status == 2 and "--seed" in line and "--val-fraction" in line and "--epochs" not in line
    assert "new --out" in line and str(out) in line
    # More epochs would meet a one-cycle schedule built for one.
    status, _, err = _resume(capsys, tiny_dataset, out, "--epochs", "3")
    assert status == 2 and "--epochs" in _one_line(err)

    # A checkpoint written before a setting existed compares it against the setting's default.
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    saved = json.loads(checkpoint["config_json"])
    del saved["label_smoothing"]
    checkpoint["config_json"] = json.dumps(saved)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    (out / "checkpoint.pt").write_bytes(buffer.getvalue())
    status, _, err = _resume(capsys, tiny_dataset, out, "--label-smoothing", "0.1")
    assert status == 2 and "--label-smoothing" in _one_line(err)

    # Where and how it runs is no part of what it learns: a run may finish on another machine.
    status, stdout, err = _resume(capsys, tiny_dataset, out, "--device", "cpu", "--precision", "fp32", "--skip-bad")
    assert status == 0, err
    assert f"resuming {out} after epoch 1" in stdout


@pytest.mark.timeout(300)
def test_a_damaged_checkpoint_is_one_line_naming_it(finished_run, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    checkpoint = out / "checkpoint.pt"
    whole = checkpoint.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"\0" * 4096):  # cut short (a full disk), or overwritten
        checkpoint.write_bytes(damaged)
        status, _, err = _resume(capsys, tiny_dataset, out)
        line = _one_line(err)
        assert status == 2 and str(checkpoint) in line and "delete it" in line


@pytest.mark.timeout(300)
def test_with_ema_the_kept_model_is_the_moving_average(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    cfg = config.make_train_config(data=str(tiny_dataset), out=str(out), epochs=1, image_size=32, batch_size=16,
                                   weights="none", ema_decay=0.9)
    train(cfg, log=lambda _: None, progress=False)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
    raw = checkpoint["model"]
    kept = load_model(str(out)).network.state_dict()
    assert kept.keys() == raw.keys() == averaged.keys()
    assert all(torch.equal(kept[k], averaged[k]) for k in raw)  # the file holds the average...
    assert not torch.equal(kept["conv1.weight"], raw["conv1.weight"])  # ...not the last step's weights
    assert int(checkpoint["ema"]["n_averaged"]) > 1


@pytest.mark.timeout(300)
def test_with_keep_epochs_every_epoch_is_a_model_file_of_its_own(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    cfg = config.make_train_config(data=str(tiny_dataset), out=str(out), epochs=3, image_size=32, batch_size=16,
                                   weights="none", keep_epochs=True)
    result = train(cfg, log=lambda _: None, progress=False)
    files = [out / config.EPOCH_MODEL_FILENAME.format(epoch=epoch) for epoch in (1, 2, 3)]
    assert sorted((out / "epochs").iterdir()) == files
    models = [load_model(str(file)) for file in files]
    # Each holds its epoch's weights, and the threshold validation chose for it.
    assert [m.metadata["best_epoch"] for m in models] == [1, 2, 3]
    assert [m.threshold for m in models] == pytest.approx([row["val_threshold"] for row in result.history])
    assert not torch.equal(models[0].network.conv1.weight, models[2].network.conv1.weight)
    # model.pt is still the best epoch's, byte for byte the same weights as that epoch's file.
    best, kept = models[result.best_epoch - 1].network.state_dict(), load_model(str(out)).network.state_dict()
    assert all(torch.equal(best[k], kept[k]) for k in kept)


def _averaged_after(decay: float, weights: list[float]) -> float:
    """The moving average `train` keeps, of a one-weight network set to each of `weights` in turn."""
    from torch.optim.swa_utils import AveragedModel

    network = torch.nn.BatchNorm1d(1)
    average = AveragedModel(network, multi_avg_fn=ema_update(decay), use_buffers=True)
    for w in weights:
        network.weight.data.fill_(w)
        network.num_batches_tracked += 1
        average.update_parameters(network)
    assert int(average.module.num_batches_tracked) == len(weights)  # counters are copied, not averaged
    return float(average.module.weight.detach())


def test_the_moving_average_forgets_the_initial_weights_whatever_its_decay():
    # The first step's weights are nearly the random initialization. With a constant decay of 0.998
    # the average kept 0.998**99 = 82% of them after 100 steps; ramped up, they are gone.
    assert _averaged_after(0.998, [0.0] + [1.0] * 99) > 0.99
    assert _averaged_after(0.99, [0.0] + [1.0] * 99) > 0.99
    # Once the ramp has passed it, the decay asked for is the decay applied.
    assert _averaged_after(0.998, [0.0] * 6000 + [1.0]) == pytest.approx(0.002, rel=1e-3)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_a_float32_model_that_scores_as_in_float32(tmp_path, tiny_dataset, precision):
    # `--precision auto` takes bf16 by itself on CPUs with AVX-512 BF16 or AMX and on recent GPUs,
    # fp16 on older GPUs (T4, V100), where the loss must be scaled or small gradients vanish.
    out = tmp_path / "run"
    # fp16 needs a dozen steps: the loss scale starts high and halves at each overflowing step. A CPU
    # emulates fp16 (seconds a step for the whole ResNet50), so only the head trains: its gradients
    # are scaled, overflow and are unscaled all the same, in a few seconds.
    cfg = config.make_train_config(data=str(tiny_dataset), out=str(out), epochs=1, image_size=32,
                                   batch_size=16 if precision == "bf16" else 4, weights="none", precision=precision,
                                   freeze_backbone=precision == "fp16")
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler")  # skipped fp16 steps must not alarm the user
        result = train(cfg, log=lines.append, progress=False)
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert any(f"with {dtype}" in line for line in lines), lines
    assert np.isfinite(result.history[0]["train_loss"])
    scaler = torch.load(out / "checkpoint.pt", weights_only=True).get("scaler")
    if precision == "fp16":
        assert any("loss scaling" in line for line in lines), lines
        assert scaler["scale"] < 65536.0  # steps whose gradients overflowed were skipped, not applied...
        assert scaler["_growth_tracker"] >= 1  # ...and later ones, at a lower scale, were taken
    else:
        assert scaler is None

    model = load_model(str(out))
    assert {t.dtype for t in model.network.state_dict().values() if t.is_floating_point()} == {torch.float32}
    test = dataset.load_images(dataset.list_images(str(tiny_dataset), split="test"), model.image_size)
    in_fp32 = evaluate_loaded(model, test, precision="fp32").probabilities
    reduced = evaluate_loaded(model, test, precision=precision).probabilities
    assert np.abs(in_fp32 - reduced).max() < 0.05
    assert not np.array_equal(in_fp32, reduced)  # the reduced precision really computed: its rounding shows
