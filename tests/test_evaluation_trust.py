"""Evaluation a reviewer can trust: patient-bootstrap intervals that cover what they claim,
calibration measures, operating points, subgroups, per-patient results, model comparison, the
model card, and metrics.json staying strict JSON when a class or a subgroup is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from tests.conftest import scratch_dir
from xraylib import calibration, cli, config, dataset, storage
from xraylib.adaptation import adapt_to_cohort
from xraylib.compare import compare_evaluations
from xraylib.evaluate import choose_threshold, evaluate_loaded, evaluate_model
from xraylib.model import TrainedModel, build_resnet50, model_metadata, save_model
from xraylib.operating_points import choose_operating_points, sensitivity_threshold
from xraylib.subgroups import by_patient, subgroup_of
from xraylib.uncertainty import bootstrap_intervals, paired_differences, point_metrics


def strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def simulated_cohort(rng: np.random.Generator, patients: int, *, patient_sd: float, image_sd: float,
                     separation: float = 1.5) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patients of either class with 1 to 3 images each; an image's score is the class mean, plus
    the patient's own offset (shared by its images), plus the image's noise, squashed to 0..1."""
    labels, scores, names = [], [], []
    for patient in range(patients):
        label = int(patient % 2)
        offset = rng.normal(0, patient_sd)
        for _ in range(int(rng.integers(1, 4))):
            labels.append(label)
            scores.append(separation * label + offset + rng.normal(0, image_sd))
            names.append(f"P{patient}")
    return np.array(labels), 1 / (1 + np.exp(-np.array(scores))), names


def test_patient_bootstrap_covers_the_true_value_at_about_the_stated_rate():
    rng = np.random.default_rng(7)
    patient_sd, image_sd, separation = 0.8, 0.6, 1.0
    spread = np.hypot(patient_sd, image_sd)  # an image's score: class mean + patient + image, normal
    # The population's values at threshold 0.5 (score 0), and ROC AUC of two independent images.
    truth = {"sensitivity": norm.cdf(separation / spread), "specificity": 0.5,
             "roc_auc": norm.cdf(separation / (np.sqrt(2) * spread))}
    covered = dict.fromkeys(truth, 0)
    datasets = 200
    for i in range(datasets):
        labels, probs, patients = simulated_cohort(rng, 200, patient_sd=patient_sd, image_sd=image_sd, separation=separation)
        # Fewer resamples than evaluation's 2,000 keep the test quick; coverage does not hinge on them.
        ci = bootstrap_intervals(labels, probs, 0.5, patients, metrics=tuple(truth), seed=i, resamples=1000)
        for name, value in truth.items():
            covered[name] += ci[name][0] <= value <= ci[name][1]
    for name in truth:
        assert 0.90 <= covered[name] / datasets <= 0.99, (name, covered[name] / datasets)


def test_resampling_patients_is_wider_than_resampling_images_when_a_patients_images_agree():
    rng = np.random.default_rng(3)
    labels, probs, patients = simulated_cohort(rng, 80, patient_sd=1.0, image_sd=0.05)
    by_patient_ci = bootstrap_intervals(labels, probs, 0.5, patients)
    images = [f"image{i}" for i in range(len(labels))]  # every image its own group
    by_image_ci = bootstrap_intervals(labels, probs, 0.5, images)
    for name in ("accuracy", "sensitivity", "roc_auc"):
        width_patient = by_patient_ci[name][1] - by_patient_ci[name][0]
        width_image = by_image_ci[name][1] - by_image_ci[name][0]
        assert width_patient > 1.2 * width_image, (name, width_patient, width_image)


def test_same_seed_same_interval():
    rng = np.random.default_rng(0)
    labels, probs, patients = simulated_cohort(rng, 60, patient_sd=0.5, image_sd=0.5)
    assert bootstrap_intervals(labels, probs, 0.5, patients, seed=11) == bootstrap_intervals(labels, probs, 0.5, patients,
                                                                                              seed=11)
    assert bootstrap_intervals(labels, probs, 0.5, patients, seed=11) != bootstrap_intervals(labels, probs, 0.5, patients,
                                                                                              seed=12)


def test_the_bootstraps_metrics_on_the_images_as_they_are_equal_scikit_learns():
    rng = np.random.default_rng(5)
    labels = (rng.random(300) < 0.6).astype(int)
    probs = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1), 2)  # rounded: many ties
    values = point_metrics(labels, probs, 0.5)
    assert values["roc_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert values["pr_auc"] == pytest.approx(average_precision_score(labels, probs))
    assert values["brier"] == pytest.approx(brier_score_loss(labels, probs))
    assert calibration.brier_score(labels, probs) == pytest.approx(brier_score_loss(labels, probs))


def test_calibrated_scores_have_an_ece_near_zero_and_overconfident_ones_a_large_one():
    rng = np.random.default_rng(1)
    probs = rng.random(20000)
    labels = (rng.random(20000) < probs).astype(int)  # each image is positive with exactly its probability
    assert calibration.expected_calibration_error(labels, probs) < 0.02
    logit = np.log(probs / (1 - probs))
    overconfident = 1 / (1 + np.exp(-4 * logit))  # same ranking, pushed towards 0 and 1
    assert calibration.expected_calibration_error(labels, overconfident) > 0.15
    bins = calibration.reliability_bins(labels, probs)
    assert bins.count.sum() == len(probs) and len(bins.count) == config.ECE_BINS
    assert np.allclose(bins.positive_share, bins.mean_probability, atol=0.03)


def test_a_sensitivity_threshold_finds_the_target_share_of_positives():
    rng = np.random.default_rng(2)
    labels = (rng.random(400) < 0.5).astype(int)
    probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    positives = np.sort(probs[labels == 1])
    for target in config.OPERATING_POINT_SENSITIVITIES:
        threshold = sensitivity_threshold(labels, probs, target)
        assert (positives >= threshold).mean() >= target
        above = positives[positives > threshold]  # one more positive left out: below the target
        assert (positives > above.min()).mean() < target if len(above) else True
        assert not np.any(probs == threshold)
    assert choose_threshold(labels, probs, "sensitivity-0.95") == sensitivity_threshold(labels, probs, 0.95)
    points = choose_operating_points(labels, probs)
    assert [p["target_sensitivity"] for p in points] == [0.9, 0.95, 0.99]
    assert points[0]["threshold"] >= points[1]["threshold"] >= points[2]["threshold"]


def test_subgroups_and_patients_from_file_names():
    assert subgroup_of("s3://b/test/PNEUMONIA/person1_bacteria_1.jpeg") == "bacteria"
    assert subgroup_of("person1_virus_6.jpeg") == "virus"
    assert subgroup_of("IM-0001-0001.jpeg") is None
    patients, label, score = by_patient([0, 1, 0, 0], [0.2, 0.7, 0.9, 0.1], ["A", "A", "B", "B"])
    assert patients == ["A", "B"] and label.tolist() == [1, 0] and score.tolist() == [0.7, 0.9]


def test_paired_difference_of_a_model_with_itself_is_zero_and_a_better_model_wins():
    rng = np.random.default_rng(4)
    labels, good, patients = simulated_cohort(rng, 150, patient_sd=0.3, image_sd=0.3, separation=3.0)
    noisy = 1 / (1 + np.exp(-(np.log(good / (1 - good)) + rng.normal(0, 3.0, len(good)))))
    same = {d.metric: d for d in paired_differences(labels, {"a": (good, 0.5), "b": (good, 0.5)}, patients)}
    assert same["roc_auc"].difference == 0 and same["roc_auc"].ci95 == [0.0, 0.0]
    better = {d.metric: d for d in paired_differences(labels, {"a": (good, 0.5), "b": (noisy, 0.5)}, patients)}
    assert better["roc_auc"].difference == pytest.approx(roc_auc_score(labels, good) - roc_auc_score(labels, noisy))
    assert better["roc_auc"].ci95[0] > 0  # the interval of A - B excludes 0


# ---------------------------------------------------------------------------------------------
# Evaluations of a model on generated images


def untrained_model(**extra) -> TrainedModel:
    import torch

    torch.manual_seed(0)
    return TrainedModel(build_resnet50("none").eval(),
                        model_metadata(class_names=("NORMAL", "PNEUMONIA"), image_size=32, threshold=0.5, **extra))


@pytest.fixture(scope="module")
def test_images(tiny_dataset) -> tuple[dataset.ImageIndex, dataset.LoadedImages]:
    index = dataset.list_images(str(tiny_dataset), split="test")
    return index, dataset.load_images(index, 32)


def only(data: dataset.LoadedImages, keep) -> dataset.LoadedImages:
    rows = [i for i, r in enumerate(data.records) if keep(r)]
    return dataset.LoadedImages(data.pixels[rows], data.labels[rows], tuple(data.records[i] for i in rows), data.class_names)


@pytest.mark.parametrize("missing", ["NORMAL class", "virus subgroup", "PNEUMONIA class"])
def test_metrics_json_is_strict_when_a_class_or_a_subgroup_is_missing(tmp_path, test_images, missing):
    from xraylib.evaluate import write_evaluation

    _, data = test_images
    keep = {"NORMAL class": lambda r: r.label == 1, "virus subgroup": lambda r: "virus" not in r.obj.relpath,
            "PNEUMONIA class": lambda r: r.label == 0}[missing]
    write_evaluation(evaluate_loaded(untrained_model(), only(data, keep), device="cpu"), str(tmp_path))
    metrics = strict_json((tmp_path / "metrics.json").read_text())
    assert set(metrics["ci95"]) == {"accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc", "brier",
                                    "ece"}
    assert 0 <= metrics["brier"] <= 1 and 0 <= metrics["ece"] <= 1
    virus = metrics["subgroups"]["virus"]
    if missing == "virus subgroup" or missing == "PNEUMONIA class":
        assert virus["n_images"] == 0 and virus["sensitivity"] is None and "virus" in virus["undefined"]
    if missing == "NORMAL class":
        assert metrics["specificity"] is None and metrics["ci95"]["specificity"] == [None, None]
        assert metrics["per_patient"]["specificity"] is None and "specificity" in metrics["per_patient"]["undefined"]
    if missing == "PNEUMONIA class":
        assert metrics["sensitivity"] is None and metrics["subgroups"]["bacteria"]["sensitivity"] is None
    assert (tmp_path / "model_card.md").exists() and (tmp_path / "calibration.png").exists()


def test_operating_points_come_from_the_model_file_and_older_files_choose_them_on_the_test_images(test_images):
    _, data = test_images
    older = evaluate_loaded(untrained_model(), data, device="cpu").metrics["operating_points"]
    assert [p["chosen_on"] for p in older] == ["test images"] * 3
    assert all(p["sensitivity"] >= p["target_sensitivity"] for p in older)  # by construction, on the same images
    stored = [{"target_sensitivity": 0.9, "threshold": 0.3}, {"target_sensitivity": 0.95, "threshold": 0.2},
              {"target_sensitivity": 0.99, "threshold": 0.1}]
    points = evaluate_loaded(untrained_model(operating_points=stored), data, device="cpu").metrics["operating_points"]
    assert [(p["threshold"], p["chosen_on"]) for p in points] == [(0.3, "validation"), (0.2, "validation"), (0.1, "validation")]
    for p in points:
        low, high = p["ci95"]["specificity"]
        assert low <= p["specificity"] <= high


def test_evaluate_writes_a_model_card_with_the_data_location_and_the_numbers_of_metrics_json(tmp_path, tiny_dataset):
    model_file = tmp_path / "model.pt"
    model = untrained_model(train_config={"data": "s3://bucket/chest_xray", "epochs": 3, "val_fraction": 0.15, "seed": 0},
                            data_counts={"train": 60, "val": 10}, threshold_policy="balanced")
    save_model(str(model_file), model.network, model.metadata)
    out = tmp_path / "evaluation"
    evaluate_model(str(model_file), str(tiny_dataset), str(out), device="cpu")
    metrics = strict_json((out / "metrics.json").read_text())
    card = (out / "model_card.md").read_text()
    assert f"`{tiny_dataset / 'test'}`" in card and metrics["data"] == str(tiny_dataset / "test")
    assert f"`{model_file}`" in card and "`s3://bucket/chest_xray`" in card
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc", "brier", "ece"):
        low, high = metrics["ci95"][name]
        assert f"| {name} | {metrics[name]:.4f} | {low:.4f} – {high:.4f} |" in card
    for point in metrics["operating_points"]:
        assert f"| {point['target_sensitivity']:.2f} | {point['threshold']:.4f} | {point['sensitivity']:.4f} |" in card
    for name, group in metrics["subgroups"].items():
        assert f"| {name} | {group['n_images']} | {group['n_patients']} |" in card
    for heading in ("## Intended use", "## Not intended use", "## Training data and split", "## Preprocessing",
                    "## Training parameters", "## Calibration", "## Operating points", "## Subgroups", "## Known limits"):
        assert heading in card
    assert "overstate results on a new cohort" in card


def test_compare_cli_reports_paired_differences(tmp_path, tiny_dataset, capsys):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    for seed, file in ((0, first), (1, second)):
        import torch

        torch.manual_seed(seed)
        save_model(str(file), build_resnet50("none"), model_metadata(class_names=("NORMAL", "PNEUMONIA"), image_size=32,
                                                                        threshold=0.5))
    out = tmp_path / "comparison"
    assert cli.main(["compare", "--model", str(first), "--model", str(second), "--data", str(tiny_dataset), "--out", str(out),
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = strict_json((out / "comparison.json").read_text())
    assert result["n_images"] == 40 and result["a"] == str(first) and result["b"] == str(second)
    auc = result["differences"]["roc_auc"]
    assert auc["difference"] == pytest.approx(auc["a"] - auc["b"])
    assert auc["ci95"][0] <= auc["difference"] <= auc["ci95"][1]
    assert f"roc_auc      A {auc['a']:.4f}  B {auc['b']:.4f}  A-B {auc['difference']:+.4f}" in printed
    assert cli.main(["compare", "--model", str(first), "--data", str(tiny_dataset)]) == 2
    assert "two models" in capsys.readouterr().err


def test_compare_a_model_with_itself_differs_by_zero(test_images):
    _, data = test_images
    evaluation = evaluate_loaded(untrained_model(), data, device="cpu")
    comparison = compare_evaluations(evaluation, evaluation)
    assert comparison.n_images == len(data) and comparison.left_out == 0
    assert all(d.difference == 0 or d.difference != d.difference for d in comparison.differences)


def test_explain_reads_a_model_file_and_images_from_s3_and_writes_overlays_there(bucket, tiny_dataset, capsys):
    from PIL import Image

    model = untrained_model()
    save_model(f"s3://{bucket}/runs/model.pt", model.network, model.metadata)
    storage.upload_directory(tiny_dataset / "val", f"s3://{bucket}/new")
    images = [o.location for o in storage.list_objects(f"s3://{bucket}/new")][:3]
    assert cli.main(["explain", "--model", f"s3://{bucket}/runs/model.pt", *images, "--out", f"s3://{bucket}/maps",
                     "--device", "cpu"]) == 0
    written = capsys.readouterr().out.split()
    assert written == [f"s3://{bucket}/maps/{o.rsplit('/', 1)[-1].rsplit('.', 1)[0]}.gradcam.png" for o in images]
    import io

    for location in written:
        assert Image.open(io.BytesIO(storage.read_bytes(location))).format == "PNG"


# ---------------------------------------------------------------------------------------------
# Grad-CAM on a network trained where the class is carried only by a blob


BLOB_RADIUS = 14
TILE = 64  # the training images' size, and one tile of the test mosaics


def blob_tile(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """A noise tile; a positive one carries a bright disk centred in one of its quadrants, chosen at random."""
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    pixels = rng.normal(0.4, 0.12, (TILE, TILE))
    blob = np.zeros((TILE, TILE), dtype=bool)
    if positive:
        cy, cx = ((16, 16), (16, 48), (48, 16), (48, 48))[rng.integers(4)]
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < BLOB_RADIUS**2
        pixels[blob] += 0.35
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8), blob


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory):
    """A ResNet50 trained by `train` (64 px, 5 epochs, 2 threads whatever the machine has: under half a minute) on images whose
    class is carried only by the blob."""
    with scratch_dir(tmp_path_factory, "blobs") as root:
        return _train_blob_model(root)


def _train_blob_model(root: Path):
    import torch

    from xraylib.synthetic import encode
    from xraylib.training import train

    rng = np.random.default_rng(0)
    for cls in ("NORMAL", "PNEUMONIA"):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(80):
            name = f"IM-{i:04d}-0001.png" if cls == "NORMAL" else f"person{i}_bacteria_{i}.png"
            (folder / name).write_bytes(encode(blob_tile(rng, cls == "PNEUMONIA")[0], fmt="PNG"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    try:
        train(config.make_train_config(data=str(root), out=str(root / "run"), epochs=5, image_size=TILE, batch_size=16,
                                       weights="none", augment="none", equalize="none", device="cpu", precision="fp32",
                                       lr=1e-3, seed=0), progress=False, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    from xraylib.model import load_model

    return load_model(str(root / "run"))


def test_grad_cam_heat_falls_on_the_blob_that_carries_the_class(blob_model):
    """The last conv stage has one cell per 32 px, so a 64-px image has 2 x 2 of them, and each sees
    the whole image. The test images are therefore 128-px mosaics of four 64-px tiles, one of which
    carries the blob: the network sees them whole (it is convolutional), and its map has 4 x 4
    cells, of which the blob's tile holds 2 x 2. For each mosaic it calls positive, the blob's tile
    is the hottest of the four and the blob holds at least twice the heat its area would get from
    an even map; over them, the blob's tile (a quarter of the image) holds at least half the heat."""
    import torch

    from xraylib.explain import grad_cam

    rng = np.random.default_rng(1)
    mosaics, tiles, blobs, blob_tile_index = [], [], [], []
    for _ in range(24):
        where = int(rng.integers(4))
        parts = [blob_tile(rng, i == where) for i in range(4)]
        mosaics.append(np.block([[parts[0][0], parts[1][0]], [parts[2][0], parts[3][0]]]))
        blobs.append(np.block([[parts[0][1], parts[1][1]], [parts[2][1], parts[3][1]]]))
        tile = np.zeros((2 * TILE, 2 * TILE), dtype=bool)
        tile[where // 2 * TILE:(where // 2 + 1) * TILE, where % 2 * TILE:(where % 2 + 1) * TILE] = True
        tiles.append(tile)
        blob_tile_index.append(where)
    heat, probabilities = grad_cam(blob_model, torch.from_numpy(np.stack(mosaics)), device="cpu")
    found = probabilities >= blob_model.threshold
    assert found.sum() >= 4, probabilities
    total = heat.reshape(len(heat), -1).sum(axis=1)
    in_tile = (heat * np.stack(tiles)).reshape(len(heat), -1).sum(axis=1) / total
    in_blob = (heat * np.stack(blobs)).reshape(len(heat), -1).sum(axis=1) / total
    per_tile = heat.reshape(len(heat), 2, TILE, 2, TILE).sum(axis=(2, 4)).reshape(len(heat), 4)
    assert np.array_equal(per_tile[found].argmax(1), np.array(blob_tile_index)[found]), per_tile[found] / total[found, None]
    assert in_tile[found].mean() >= 0.5, in_tile[found]
    assert np.all(in_blob[found] >= 2 * np.stack(blobs)[0].mean()), in_blob[found]
    assert heat.shape == (24, 2 * TILE, 2 * TILE) and heat.min() >= 0 and np.allclose(heat.max(axis=(1, 2))[found], 1)


def _blob_cohort(positives: int, negatives: int, change, seed: int = 5) -> dataset.LoadedImages:
    """Blob tiles (as the blob model trained on) after `change`, in memory, positives first."""
    import torch

    rng = np.random.default_rng(seed)
    tiles = [change(blob_tile(rng, i < positives)[0]) for i in range(positives + negatives)]
    labels = [1] * positives + [0] * negatives
    records = tuple(dataset.ImageRecord(storage.ObjectInfo(f"/cohort/{i}.png", f"{['NORMAL', 'PNEUMONIA'][y]}/{i}.png", 1, "-"),
                                        y, f"patient{i}") for i, y in enumerate(labels))
    return dataset.LoadedImages(torch.from_numpy(np.stack(tiles)), torch.tensor(labels), records, ("NORMAL", "PNEUMONIA"))


def test_adapted_to_a_cohort_of_lower_contrast_the_model_ranks_and_calls_it_again(blob_model, tmp_path):
    from xraylib.evaluate import write_evaluation

    faded = _blob_cohort(60, 60, lambda a: (a * 0.5 + 64).astype(np.uint8))
    plain = evaluate_loaded(blob_model, faded, device="cpu")
    adapted = evaluate_loaded(blob_model, faded, device="cpu", adapt_batchnorm=True)
    assert plain.metrics["roc_auc"] < 0.9 and adapted.metrics["roc_auc"] > 0.98
    assert adapted.metrics["accuracy"] > plain.metrics["accuracy"] + 0.15
    assert plain.metrics["batchnorm_adapted"] is False and "batchnorm_adaptation" not in plain.metrics
    assert adapted.metrics["batchnorm_adapted"] is True
    record = adapted.metrics["batchnorm_adaptation"]
    assert record["images"] == 120 and record["rounds"] == config.ADAPT_ROUNDS
    assert record["prior_images"] == config.ADAPT_PRIOR_IMAGES
    assert record["training_positive_share"] == 0.5  # the blob model trained on as many of each
    # The model is not changed by it: scored plainly again, the same probabilities.
    assert np.array_equal(evaluate_loaded(blob_model, faded, device="cpu").probabilities, plain.probabilities)
    write_evaluation(adapted, str(tmp_path))
    assert strict_json((tmp_path / "metrics.json").read_text())["batchnorm_adaptation"] == record
    assert "batch norms adapted to these 120 images" in (tmp_path / "model_card.md").read_text()


@pytest.mark.parametrize("positives,negatives", [(60, 60), (20, 100)])
def test_adapting_to_an_unchanged_cohort_with_fewer_positives_than_training_keeps_its_calls(blob_model, positives,
                                                                                            negatives):
    """The statistics carry the class mix; rebalanced to training's, a cohort of the training's
    kind but with a sixth positives is called as well as it was without adapting."""
    clean = _blob_cohort(positives, negatives, lambda a: a)
    plain = evaluate_loaded(blob_model, clean, device="cpu").metrics
    adapted = evaluate_loaded(blob_model, clean, device="cpu", adapt_batchnorm=True).metrics
    assert adapted["specificity"] >= plain["specificity"] - 0.05
    assert adapted["sensitivity"] >= plain["sensitivity"] - 0.05


def test_evaluate_cli_adapts_when_asked_and_says_so(blob_model, tmp_path, capsys):
    from xraylib.synthetic import encode

    for i, y in enumerate([1] * 10 + [0] * 10):
        folder = tmp_path / "faded" / ["NORMAL", "PNEUMONIA"][y]
        folder.mkdir(parents=True, exist_ok=True)
        tile = blob_tile(np.random.default_rng(i), bool(y))[0]
        (folder / f"{i}.png").write_bytes(encode((tile * 0.5 + 64).astype(np.uint8), fmt="PNG"))
    save_model(str(tmp_path / "model.pt"), blob_model.network, blob_model.metadata)
    assert cli.main(["evaluate", "--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "faded"),
                     "--out", str(tmp_path / "out"), "--device", "cpu", "--adapt-batchnorm"]) == 0
    assert "batch norms adapted to the 20 images (2 rounds, rebalanced to the training's 50% positives" in capsys.readouterr().out
    assert strict_json((tmp_path / "out" / "metrics.json").read_text())["batchnorm_adaptation"]["images"] == 20


def _write_blob_images(folder: Path, labels: list[int], change, *, seed: int, class_folders: bool) -> list[Path]:
    from xraylib.synthetic import encode

    rng = np.random.default_rng(seed)
    written = []
    for i, y in enumerate(labels):
        where = folder / ["NORMAL", "PNEUMONIA"][y] if class_folders else folder
        where.mkdir(parents=True, exist_ok=True)
        written.append(where / f"film{i}.png")
        written[-1].write_bytes(encode(change(blob_tile(rng, bool(y))[0]), fmt="PNG"))
    return written


def test_a_model_adapted_to_a_sites_unlabelled_films_scores_that_sites_other_films_one_at_a_time(blob_model, tmp_path,
                                                                                                 capsys):
    """`xraylib adapt` on a flat folder of one site's films (no labels), then the adapted model file
    evaluates other films of that site: the plain model calls nearly all of them one class, the
    adapted one calls them right; each film's probability is the same scored alone (`predict`) as
    in the evaluation, and the model it came from is unchanged."""
    import hashlib

    from xraylib.predict import predict_images

    def faded(tile: np.ndarray) -> np.ndarray:  # milder than the cohort above: still ranked, no longer called
        return (tile * 0.7 + 38).astype(np.uint8)

    _write_blob_images(tmp_path / "site", [i % 2 for i in range(120)], faded, seed=11, class_folders=False)
    (tmp_path / "site" / "worklist.txt").write_text("not an image")  # left out, and said so
    test_films = _write_blob_images(tmp_path / "site_test", [1] * 30 + [0] * 30, faded, seed=12, class_folders=True)
    original = tmp_path / "model.pt"
    save_model(str(original), blob_model.network, blob_model.metadata)
    before = hashlib.sha256(original.read_bytes()).hexdigest()

    assert cli.main(["adapt", "--model", str(original), str(tmp_path / "site"), "--out", str(tmp_path / "adapted"),
                     "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert f"batch norms adapted to 120 images of {tmp_path / 'site'}: 2 rounds" in said and "model.pt" in said
    assert "ignored 1 non-image file(s)" in said
    assert hashlib.sha256(original.read_bytes()).hexdigest() == before

    for model, out in ((original, "plain"), (tmp_path / "adapted", "adapted")):
        assert cli.main(["evaluate", "--model", str(model), "--data", str(tmp_path / "site_test"),
                         "--out", str(tmp_path / out), "--device", "cpu"]) == 0
    plain, adapted = (strict_json((tmp_path / out / "metrics.json").read_text()) for out in ("plain", "adapted"))
    assert plain["accuracy"] < 0.65 and adapted["accuracy"] > 0.9 and adapted["roc_auc"] > 0.98
    assert plain["batchnorm_adapted"] is False and adapted["batchnorm_adapted"] is True
    record = adapted["batchnorm_adaptation"]
    assert record["images"] == 120 and record["images_location"] == [str(tmp_path / "site")]
    assert record["training_positive_share"] == 0.5 and 0.35 < record["estimated_positive_share"] < 0.65
    assert f"adapted to 120 images of `{tmp_path / 'site'}`" in (tmp_path / "adapted" / "model_card.md").read_text()
    assert "adapted before, to 120 images" in capsys.readouterr().out

    # One film at a time, as predict scores it: the probability the evaluation gave it.
    by_name = {}
    for line in (tmp_path / "adapted" / "predictions.csv").read_text().splitlines()[1:]:
        by_name[line.split(",")[0]] = float(line.split(",")[3])
    for film in test_films[:3] + test_films[-3:]:
        alone = predict_images(str(tmp_path / "adapted"), str(film))[0].probability
        assert alone == pytest.approx(by_name[str(film)], abs=2e-3)


def test_adapt_will_not_overwrite_the_model_it_adapts_nor_run_without_images(blob_model, tmp_path, capsys):
    original = tmp_path / "run" / "model.pt"
    save_model(str(original), blob_model.network, blob_model.metadata)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no films here")
    before = original.read_bytes()
    assert cli.main(["adapt", "--model", str(tmp_path / "run"), str(tmp_path / "empty"), "--out", str(tmp_path / "run"),
                     "--device", "cpu"]) == 2
    assert "is the model being adapted: write the adapted model to another location" in capsys.readouterr().err
    assert cli.main(["adapt", "--model", str(tmp_path / "run"), str(tmp_path / "empty"), "--out", str(tmp_path / "new"),
                     "--device", "cpu"]) == 2
    assert f"no images (.jpeg, .jpg, .png, .dcm) in {tmp_path / 'empty'}" in capsys.readouterr().err
    assert original.read_bytes() == before and not (tmp_path / "new").exists()


def test_a_cohort_the_unadapted_model_calls_nearly_all_negative_is_called_right_once_adapted(blob_model):
    """Faded to half its contrast, a cohort of as many positives as negatives is judged mostly
    negative by the model as trained. With the training statistics weighed as 32 images, the blend
    left part of the fade in the statistics and the rebalancing amplified it: the adapted network
    ranked other films of the same kind (ROC AUC 1.0) but judged the site 0-12% positive and
    called many or all positives negative (accuracy 0.5-0.7, by CPU kind;
    benchmarks/bench_adapt_stability.py). Weighed as `config.ADAPT_PRIOR_IMAGES` (8), the mix and
    the calls come out about right."""
    def faded(tile: np.ndarray) -> np.ndarray:
        return (tile * 0.5 + 64).astype(np.uint8)

    site = _blob_cohort(60, 60, faded, seed=11)
    films = _blob_cohort(30, 30, faded, seed=12)
    results = {}
    for prior in (32, config.ADAPT_PRIOR_IMAGES):
        network, _, adaptation = adapt_to_cohort(blob_model, site.pixels, device="cpu", amp_dtype=None,
                                                 prior_images=prior)
        results[prior] = (evaluate_loaded(TrainedModel(network, blob_model.metadata), films, device="cpu").metrics,
                          adaptation.estimated_positive_share)
    before, now = results[32], results[config.ADAPT_PRIOR_IMAGES]
    assert before[0]["accuracy"] < 0.85 and before[1] < 0.35  # the limit, as it was
    # The blob model's weights differ between CPU kinds (fp32 kernels sum in different orders), and
    # so does how far the fade moves it: these bounds hold on each kind measured.
    assert now[0]["roc_auc"] > 0.98 and now[0]["accuracy"] >= 0.85, now
    assert now[0]["accuracy"] >= before[0]["accuracy"] + 0.15, (before, now)
    assert 0.35 < now[1] < 0.65  # the site is half positive


def test_adapt_reads_a_sites_films_from_s3_draws_a_sample_of_many_and_writes_the_model_there(blob_model, bucket, tmp_path):
    from xraylib.adaptation import adapt_model_to_images
    from xraylib.model import load_model

    _write_blob_images(tmp_path / "site", [i % 2 for i in range(40)], lambda a: a, seed=13, class_folders=False)
    storage.upload_directory(tmp_path / "site", f"s3://{bucket}/site-b/2026-11")
    said = []
    returned = adapt_model_to_images(blob_model, f"s3://{bucket}/site-b/", f"s3://{bucket}/runs/site-b", device="cpu",
                                     max_images=16, log=said.append)
    stored = load_model(f"s3://{bucket}/runs/site-b")
    record = stored.metadata["batchnorm_adaptation"]
    assert record["images"] == 16 and record["images_found"] == 40
    assert record["images_location"] == [f"s3://{bucket}/site-b/"]
    assert stored.location == returned.location == f"s3://{bucket}/runs/site-b/model.pt"
    assert f"batch norms adapted to 16 images of s3://{bucket}/site-b/ (drawn from 40)" in said[-1]
    # The file holds the adapted statistics, not the model's own.
    own = dict(blob_model.network.named_buffers())
    moved = [name for name, value in stored.network.named_buffers() if name.endswith("running_mean")
             and not np.allclose(value.numpy(), own[name].numpy())]
    assert moved
