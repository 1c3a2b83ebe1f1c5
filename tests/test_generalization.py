"""What carries a model to new scans: contrast normalization, calibrated probabilities, a threshold
policy that does not sit on the edge of an easy split, and the acquisition-shift suite."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from xraylib import config, dataset, shifts, storage, synthetic
from xraylib.evaluate import (
    choose_threshold,
    compute_metrics,
    evaluate_loaded,
    evaluate_model,
    fit_calibration,
    predict_logits,
    probabilities_from_logits,
)
from xraylib.model import inference_dtype, inference_network, load_model, resolve_device
from xraylib.predict import predict_images
from xraylib.training import train


def _radiograph(seed: int = 0, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = 0.55 + 0.3 * np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) * 20) + 0.3 * np.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) * 20)
    ribs = 0.12 * np.sin(2 * np.pi * y * size / 6)  # fine detail, which blur and resolution loss take away
    return np.clip((lungs + ribs + rng.normal(0, 0.03, lungs.shape)) * 180, 0, 255).astype(np.uint8)


def test_histogram_equalization_undoes_exposure_gamma_and_contrast_changes():
    image = _radiograph()
    reference = dataset.equalize(image, "histogram")
    x = image.astype(np.float64) / 255
    for changed in (x ** 0.6, x ** 1.6, x * 0.7 + 0.2, (x - 0.5) * 0.6 + 0.5):
        other = dataset.equalize(np.round(changed * 255).astype(np.uint8), "histogram")
        # Equal up to grey levels that the change merged: a monotonic curve cannot reorder pixels.
        assert np.abs(other.astype(int) - reference.astype(int)).mean() < 3
        assert np.abs(np.round(changed * 255) - image).mean() > 5  # the change itself was visible
    assert reference.min() == 0 and reference.max() == 255
    flat = np.full((8, 8), 77, np.uint8)
    assert np.array_equal(dataset.equalize(flat, "histogram"), flat)
    assert dataset.equalize(image, "none") is image
    with pytest.raises(ValueError, match="clahe"):
        dataset.equalize(image, "clahe")


def test_calibration_recovers_a_known_overconfidence_and_offset_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.5, 20_000)
    labels = (rng.random(true_logits.size) < probabilities_from_logits(true_logits)).astype(int)
    # A network 4x too sure of itself whose log-odds also sit 3 too high (a short run's off-centre output).
    network_logits = true_logits * 4 + 3
    temperature, bias = fit_calibration(labels, network_logits)
    assert temperature == pytest.approx(4.0, rel=0.08)
    assert 3 / temperature + bias == pytest.approx(0.0, abs=0.1)  # the offset taken back out

    def log_loss(p: np.ndarray) -> float:
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))

    raw, calibrated = probabilities_from_logits(network_logits), probabilities_from_logits(network_logits, temperature, bias)
    assert log_loss(calibrated) < log_loss(raw) - 0.1
    assert np.array_equal(np.argsort(network_logits, kind="stable"), np.argsort(calibrated, kind="stable"))
    # 0.5 on the calibrated scale is the balanced point: about as many of each class on the wrong side.
    m = compute_metrics(labels, calibrated, 0.5)
    assert abs(m["sensitivity"] - m["specificity"]) < 0.03
    assert fit_calibration([1, 1], [3.0, 5.0]) == (1.0, 0.0)


def test_the_balanced_point_is_the_same_whatever_the_class_shares_of_the_validation_split():
    # Training weighs the classes equally; the calibration does too, so three pneumonias to one
    # normal (the training folder's shares) moves the balanced point no more than equal shares.
    rng = np.random.default_rng(3)

    def split(n_normal: int, n_pneumonia: int) -> tuple[np.ndarray, np.ndarray]:
        logits = np.concatenate([rng.normal(-2, 1.5, n_normal), rng.normal(2, 1.5, n_pneumonia)])
        return np.array([0] * n_normal + [1] * n_pneumonia), logits

    even = fit_calibration(*split(3000, 3000))
    skewed = fit_calibration(*split(1000, 3000))
    assert -even[1] * even[0] == pytest.approx(-skewed[1] * skewed[0], abs=0.15)  # the logit where P = 0.5


def test_threshold_policies_do_what_their_names_say():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 300 + [1] * 900)
    probs = probabilities_from_logits(np.concatenate([rng.normal(-2, 1.5, 300), rng.normal(2, 1.5, 900)]))

    balanced = compute_metrics(labels, probs, choose_threshold(labels, probs, "equal-error"))
    assert abs(balanced["sensitivity"] - balanced["specificity"]) < 0.01
    high_sensitivity = compute_metrics(labels, probs, choose_threshold(labels, probs, "sensitivity-0.95"))
    assert 0.95 <= high_sensitivity["sensitivity"] < 0.955
    youden = choose_threshold(labels, probs, "youden")
    m = compute_metrics(labels, probs, youden)
    assert m["sensitivity"] + m["specificity"] >= balanced["sensitivity"] + balanced["specificity"]
    assert choose_threshold(labels, probs, "balanced") == 0.5  # not fitted: the loss weighs the classes equally
    assert set(config.THRESHOLD_POLICIES) == {"balanced", "equal-error", "youden", "sensitivity-0.95"}
    with pytest.raises(ValueError, match="balanced"):
        choose_threshold(labels, probs, "f1")


def test_on_a_split_with_a_wide_gap_youden_sits_at_its_edge_and_equal_error_inside_the_overlap():
    # An easy validation split: one normal scored high, the rest far apart. Youden's J is the same
    # all along the gap and takes its top; the equal-error point stays where the classes meet.
    labels = [0] * 9 + [1] * 9
    probs = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.6, 0.55, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97]
    assert 0.6 < choose_threshold(labels, probs, "youden") < 0.9
    assert 0.55 < choose_threshold(labels, probs, "equal-error") < 0.6


def _png_bytes(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_acquisition_shift_changes_the_image_decodes_and_is_reproducible(tmp_path):
    image = _radiograph(size=128)
    path = tmp_path / "NORMAL" / "IM-0001-0001.png"
    path.parent.mkdir()
    path.write_bytes(_png_bytes(image))
    clean = shifts.load_shifted([str(path)], "clean", 64)
    assert np.array_equal(clean[0].numpy(), dataset.decode_image(path.read_bytes(), 64, str(path)))
    training_like = {"brighter", "darker", "low contrast", "high contrast", "zoom in 1.2", "zoom out 0.8",
                     "rotate 15", "rotate -15"}
    for name in shifts.SHIFTS:
        shifted = shifts.load_shifted([str(path)], name, 64, seed=3)
        assert shifted.shape == (1, 64, 64) and shifted.dtype == clean.dtype
        assert np.abs(shifted.numpy().astype(int) - clean.numpy()).mean() > 1.0, name
        assert np.array_equal(shifted.numpy(), shifts.load_shifted([str(path)], name, 64, seed=3).numpy()), name
    # The families training also draws from are stronger here than training's ranges.
    assert training_like <= set(shifts.SHIFTS)
    equalized = shifts.load_shifted([str(path)], "gamma 1.6", 64, equalize_mode="histogram")
    assert np.abs(equalized.numpy().astype(int) - dataset.equalize(clean[0].numpy(), "histogram")).mean() < 4


def test_shift_metrics_summarize_mean_and_worst_without_the_clean_images():
    labels = np.array([0, 0, 1, 1])
    scores = {"clean": np.array([0.1, 0.2, 0.8, 0.9]), "a": np.array([0.1, 0.7, 0.8, 0.9]), "b": np.array([0.6, 0.7, 0.8, 0.9])}
    summary = shifts.shift_metrics(labels, scores, 0.5)
    assert summary["per_shift"]["clean"]["specificity"] == 1.0
    assert summary["mean"]["specificity"] == pytest.approx(0.25)
    assert summary["worst"]["specificity"] == 0.0
    assert summary["worst"]["accuracy"] == 0.5


@pytest.mark.timeout(300)
def test_equalization_temperature_and_policy_travel_in_the_model_file_to_evaluate_and_predict(bucket, tmp_path):
    root = tmp_path / "chest_xray"
    synthetic.generate_dataset(root, images_per_class=40, min_side=64, max_side=96, seed=7)
    storage.upload_directory(root, f"s3://{bucket}/chest_xray")
    out = f"s3://{bucket}/runs/eq"
    cfg = config.make_train_config(data=f"s3://{bucket}/chest_xray", out=out, epochs=2, image_size=32, batch_size=16,
                                   weights="none", equalize="histogram", threshold_policy="equal-error", precision="bf16")
    result = train(cfg, log=lambda line: None, progress=False)
    model = load_model(out)
    # The threshold meets probabilities computed as validation computed them: in bf16 here, by default,
    # reproducing validation's decisions image for image; fp32 when asked, and metrics.json says which.
    assert model.validation_precision == "bf16"
    again = evaluate_loaded(model, result.data.val)
    assert again.metrics["compute_precision"] == again.metrics["validation_precision"] == "bf16"
    assert again.metrics["confusion_matrix"]["matrix"] == result.val_metrics["confusion_matrix"]["matrix"]
    assert again.metrics["threshold"] == result.val_metrics["threshold"]
    assert evaluate_loaded(model, result.data.val, precision="fp32").metrics["compute_precision"] == "fp32"
    assert model.equalize == "histogram"
    assert model.metadata["threshold_policy"] == "equal-error"
    # The calibration stored is the one fitted to the network's own log-odds on validation (a
    # 2-epoch network on 14 images may fit no rising slope on some CPUs: then the identity, by design).
    logits = predict_logits(inference_network(model.network), result.data.val.pixels, mean=model.mean, std=model.std,
                            amp_dtype=inference_dtype(model, resolve_device("auto")))
    fitted = fit_calibration(result.data.val.labels.numpy(), logits)
    assert model.temperature > 0
    assert (model.temperature, model.calibration_bias) == pytest.approx(fitted, rel=1e-3, abs=1e-3)
    assert model.threshold == pytest.approx(result.val_metrics["threshold"])

    # evaluate and predict decode, equalize and calibrate as training's validation did: the same
    # images give the same probabilities by both paths, and equalizing is what they apply.
    evaluation = evaluate_model(out, f"s3://{bucket}/chest_xray")
    test_images = sorted(str(p) for p in (root / "test").rglob("*.jpeg"))
    by_name = {p.image: p.probability for p in predict_images(out, test_images)}
    assert len(by_name) == len(evaluation.names) == evaluation.metrics["n_images"]
    from_evaluate = dict(zip([n.rsplit("/", 2)[-1] for n in evaluation.names], evaluation.probabilities, strict=True))
    for name, probability in by_name.items():
        assert probability == pytest.approx(from_evaluate[name.rsplit("/", 2)[-1]], abs=1e-4)
    stored = dataset.load_images(dataset.list_images(f"s3://{bucket}/chest_xray", split="test"), 32,
                                 equalize_mode="histogram")
    assert np.array_equal(stored.pixels.numpy(), evaluation.images.numpy())
    assert not np.array_equal(dataset.load_images(dataset.list_images(f"s3://{bucket}/chest_xray", split="test"), 32)
                              .pixels.numpy(), evaluation.images.numpy())


def test_durations_read_as_a_person_writes_them():
    assert config.parse_duration("30m") == 1800
    assert config.parse_duration("1h30m") == 5400
    assert config.parse_duration("90s") == 90
    assert config.parse_duration("1.5h") == 5400
    assert config.parse_duration("1800") == 1800
    for bad in ("thirty minutes", "30x", "0m", ""):
        with pytest.raises(config.ConfigError, match="duration"):
            config.parse_duration(bad)


def test_the_cpu_preset_sizes_itself_to_its_budget_unless_the_sizes_are_given():
    budgeted = config.make_train_config(preset="cpu", data="d", out="o")
    assert budgeted.time_budget == "30m"
    exact = config.make_train_config(preset="cpu", data="d", out="o", image_size=160, epochs=8)
    assert exact.time_budget is None and (exact.image_size, exact.epochs) == (160, 8)
    assert config.make_train_config(preset="cpu", data="d", out="o", time_budget="10m").time_budget == "10m"
    with pytest.raises(config.ConfigError, match="either --time-budget or --epochs"):
        config.make_train_config(data="d", out="o", time_budget="10m", epochs=3)
    with pytest.raises(config.ConfigError, match="duration"):
        config.make_train_config(data="d", out="o", time_budget="soon")


def test_the_ladder_takes_the_largest_rung_that_fits_and_a_faster_machine_buys_more():
    from xraylib.budget import choose_size, predicted_seconds

    def machine(speedup: float):
        # 20 img/s at 96 px on the slow machine, cost growing with the pixels
        return lambda size: (0.01 + 0.04 * (size / 96) ** 2) / speedup

    slow = choose_size(1800, seconds_per_image=machine(1.0), n_train=4433, n_val=783)
    fast = choose_size(1800, seconds_per_image=machine(3.0), n_train=4433, n_val=783)
    assert slow[:2] in config.BUDGET_LADDER and fast[:2] in config.BUDGET_LADDER
    assert config.BUDGET_LADDER.index(fast[:2]) > config.BUDGET_LADDER.index(slow[:2])
    for speedup, (size, epochs, predicted) in ((1.0, slow), (3.0, fast)):
        assert predicted <= 1800 * config.BUDGET_SAFETY
        rung = config.BUDGET_LADDER.index((size, epochs))
        if rung + 1 < len(config.BUDGET_LADDER):  # the next rung would not have fitted
            next_size, next_epochs = config.BUDGET_LADDER[rung + 1]
            assert predicted_seconds(next_size, next_epochs, seconds_per_image=machine(speedup), n_train=4433,
                                     n_val=783) > 1800 * config.BUDGET_SAFETY
    # Time already spent (listing a bucket) counts against the budget; nothing fits: the smallest rung.
    assert choose_size(1800, seconds_per_image=machine(1.0), n_train=4433, n_val=783, elapsed_s=1790)[:2] == \
        config.BUDGET_LADDER[0]


@pytest.mark.timeout(300)
def test_a_time_budget_times_this_machine_prints_and_records_its_choice_and_resume_keeps_it(tmp_path, tiny_dataset,
                                                                                        monkeypatch):
    # Small probe sizes and ladder, so the test runs in seconds; the logic is the production one.
    monkeypatch.setattr(config, "BUDGET_PROBE_SIZES", (24, 40))
    monkeypatch.setattr(config, "BUDGET_LADDER", ((24, 1), (32, 2), (40, 2)))
    monkeypatch.setattr(config, "BUDGET_FIXED_S", 0.0)
    out = tmp_path / "run"
    cfg = config.make_train_config(data=str(tiny_dataset), out=str(out), weights="none", batch_size=16, time_budget="1h")
    lines: list[str] = []
    result = train(cfg, log=lines.append, progress=False)
    chosen = next(line for line in lines if line.startswith("time budget 60 min"))
    assert "img/s at 24 px" in chosen and "img/s at 40 px" in chosen
    assert "to repeat exactly: --image-size 40 --epochs 2" in chosen  # and, where two were timed, --precision
    model = load_model(str(out))
    assert model.image_size == 40 and model.metadata["train_config"]["epochs"] == 2
    assert model.metadata["sizing"]["budget_s"] == 3600 and model.metadata["sizing"]["image_size"] == 40
    assert len(result.history) == 2

    # A budget too small for anything takes the smallest rung, and says so.
    lines.clear()
    train(config.make_train_config(data=str(tiny_dataset), out=str(tmp_path / "tight"), weights="none", batch_size=16,
                                   time_budget="1s"), log=lines.append, progress=False)
    assert any("chose 24 px, 1 epochs" in line for line in lines)

    # Resuming a budgeted run keeps the size it began with, measured or not.
    monkeypatch.setattr(config, "BUDGET_LADDER", ((24, 1),))
    lines.clear()
    train(dataclasses.replace(cfg, resume=True), log=lines.append, progress=False)
    assert not any(line.startswith("time budget") for line in lines)
    assert any("resuming" in line for line in lines)
    assert load_model(str(out)).image_size == 40


@pytest.mark.timeout(300)
def test_without_a_budget_auto_precision_races_too_and_a_resume_keeps_the_winner(tmp_path, tiny_dataset, monkeypatch):
    # A CPU that claims native bf16 (claimed here whatever the machine running the suite is), where
    # the clock decides; the speeds are stand-ins for measured ones, the training is real.
    import torch

    from xraylib import budget

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    rates = {torch.bfloat16: 77.0, None: 100.0}  # the Xeon without AMX: fp32 faster
    timed: list[int] = []

    def fake_speed(network, optimizer, *, image_size, batch_size, device, amp_dtype, steps=3):
        timed.append(image_size)
        return rates[amp_dtype]

    monkeypatch.setattr(budget, "measure_training_speed", fake_speed)
    cfg = config.make_train_config(data=str(tiny_dataset), out=str(tmp_path / "run"), epochs=1, image_size=32,
                                   batch_size=16, weights="none")
    lines: list[str] = []
    train(cfg, log=lines.append, progress=False)
    assert "precision auto: bf16 77.0 img/s and fp32 100.0 img/s at 32 px, so training in fp32" in lines[0]
    assert timed == [32, 32]
    model = load_model(cfg.out)
    assert model.validation_precision == "fp32" and model.metadata["train_config"]["precision"] == "fp32"

    rates.update({torch.bfloat16: 180.0})  # issue 13's CPU: bf16 faster
    lines.clear()
    train(dataclasses.replace(cfg, out=str(tmp_path / "faster")), log=lines.append, progress=False)
    assert "so training in bf16" in lines[0] and any("on cpu with bfloat16" in line for line in lines)
    assert load_model(str(tmp_path / "faster")).validation_precision == "bf16"

    # A resumed run keeps the precision its start chose, without timing again.
    lines.clear()
    timed.clear()
    train(dataclasses.replace(cfg, resume=True), log=lines.append, progress=False)
    assert timed == [] and not any(line.startswith("precision auto") for line in lines)
    assert any(line.startswith("resuming") for line in lines)
    assert next(line for line in lines if line.startswith("training ResNet50")).split(",")[0].endswith("on cpu")

    # Explicit precisions are not raced.
    lines.clear()
    train(dataclasses.replace(cfg, out=str(tmp_path / "explicit"), precision="fp32"), log=lines.append, progress=False)
    assert timed == [] and not any(line.startswith("precision auto") for line in lines)


def test_with_auto_precision_a_budget_races_bf16_against_fp32_and_trains_in_the_faster(monkeypatch):
    # On a Xeon with AVX-512 BF16 but no AMX fp32 trained 1.3x faster; on issue 13's CPU bf16 1.8x
    # faster: the flags cannot tell, the clock can. The speeds are stand-ins for measured ones.
    import torch

    from xraylib import budget

    def fake_speed(network, optimizer, *, image_size, batch_size, device, amp_dtype, steps=3):
        base = 3000.0 / image_size
        return base * (rates[amp_dtype])

    monkeypatch.setattr(budget, "measure_training_speed", fake_speed)
    kwargs = {"n_train": 4433, "n_val": 783, "batch_size": 32, "device": torch.device("cpu"),
              "set_up": lambda: (torch.nn.Linear(1, 1), None)}
    rates = {torch.bfloat16: 0.77, None: 1.0}  # this machine: fp32 faster
    sizing = budget.size_for_budget(1800, precisions={"bf16": torch.bfloat16, "fp32": None}, **kwargs)
    assert sizing.precision == "fp32" and sizing.precision_speeds["bf16"] < sizing.precision_speeds["fp32"]
    assert sizing.describe().endswith(f"--image-size {sizing.image_size} --epochs {sizing.epochs} --precision fp32")
    assert sizing.to_dict()["precision"] == "fp32"
    rates = {torch.bfloat16: 1.8, None: 1.0}  # issue 13's machine: bf16 faster, and a bigger rung fits
    faster = budget.size_for_budget(1800, precisions={"bf16": torch.bfloat16, "fp32": None}, **kwargs)
    assert faster.precision == "bf16"
    assert config.BUDGET_LADDER.index((faster.image_size, faster.epochs)) > \
        config.BUDGET_LADDER.index((sizing.image_size, sizing.epochs))
    alone = budget.size_for_budget(1800, precisions={"fp32": None}, **kwargs)  # nothing to race
    assert alone.precision is None and "--precision" not in alone.describe()
