"""The notebooks and running them: their shape, papermill end to end against the loopback S3
server, failures naming the cell, no credentials in executed notebooks, JupyterLab serving them."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from tests.conftest import scratch_dir
from tests.jupyterlab import jupyter_lab
from xraylib import config, locals3, plots, storage
from xraylib.errors import ConfigError
from xraylib.notebooks import (
    NOTEBOOKS,
    NotebookError,
    class_counts_table,
    collapse_progress,
    common_folder,
    metrics_table,
    notebook_parameters,
    notebook_path,
    parse_parameters,
    predictions_table,
    progress_bar_text,
    run_notebook,
    scrub,
    tidy_outputs,
)
from xraylib.predict import Prediction

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PARAMETERS = {f.name for f in dataclasses.fields(config.TrainConfig)}  # every knob, as in the CLI
TEST_PARAMETERS = {"model", "data", "out", "tta", "adapt_batchnorm", "compare_with", "new_images", *config.LABEL_OPTIONS}
# The SageMaker notebook: every training knob, and the job's (as `xraylib sagemaker train` takes them).
JOB_PARAMETERS = {"instance_type", "instance_count", "spot", "max_run", "max_wait", "role", "image_uri"}
METRIC_KEYS = {"accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc", "threshold", "n_images",
               "confusion_matrix", "class_names", "brier", "ece", "ci95", "ci_method", "operating_points", "subgroups",
               "per_patient", "data", "model"}
SECRET = locals3.LOCAL_ENV["AWS_SECRET_ACCESS_KEY"]
# Small and quick: 32 px, one epoch, no pretrained weights.
TINY_TRAIN = ["-p", "epochs", "1", "-p", "image_size", "32", "-p", "batch_size", "16", "-p", "weights", "none",
              "-p", "device", "cpu"]


def python_source(cell_source: str) -> str:
    """A cell as plain Python: IPython magics (`%matplotlib inline`) turned into calls."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(cell_source)


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / NOTEBOOKS[name], as_version=4)


def outputs_of(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


# ---------------------------------------------------------------------------------------------
# The committed notebooks


@pytest.mark.parametrize("name", ["train", "test", "sagemaker"])
def test_notebook_shape(name):
    nb = load(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert not any("parameters" in c.metadata.get("tags", []) for c in code[1:])
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "notebooks are committed without outputs"
        for node in ast.walk(ast.parse(python_source(cell.source))):
            assert not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda), (
                f"{NOTEBOOKS[name]}: code belongs in xraylib, not in a notebook cell:\n{cell.source}"
            )
    # The parameters cell only assigns literals, one knob per name.
    for node in ast.parse(code[0].source).body:
        assert isinstance(node, ast.Assign)
        ast.literal_eval(node.value)


def test_notebook_parameters():
    assert set(notebook_parameters(notebook_path("train"))) == TRAIN_PARAMETERS
    assert notebook_parameters(notebook_path("train"))["preset"] is None
    assert set(notebook_parameters(notebook_path("test"))) == TEST_PARAMETERS
    assert set(notebook_parameters(notebook_path("sagemaker"))) == TRAIN_PARAMETERS | JOB_PARAMETERS


@pytest.fixture(scope="module")
def kernel_metadata() -> dict:
    """What JupyterLab writes into a notebook's metadata once the `python3` kernel of this
    environment is up: the kernelspec it started, and the language_info of the kernel's reply."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    spec = KernelSpecManager().get_kernel_spec("python3")
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        client.kernel_info()
        reply = client.get_shell_msg(timeout=60)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return {"kernelspec": {"name": "python3", "display_name": spec.display_name, "language": spec.language},
            "language_info": reply["content"]["language_info"]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["train", "test", "sagemaker"])
def test_notebooks_are_saved_as_jupyterlab_saves_them(name, kernel_metadata):
    """Opened and left untouched, a notebook is not marked modified: JupyterLab sets the kernel's
    metadata (a change when it differs from the file's) and jupyter_server writes it with
    `nbformat.write`; the committed file is already that, byte for byte."""
    committed = (ROOT / "notebooks" / NOTEBOOKS[name]).read_text(encoding="utf-8")
    nb = nbformat.reads(committed, as_version=4)  # as the contents API hands it to JupyterLab
    python = nb.metadata.get("language_info", {}).get("version")
    nb.metadata.update(kernel_metadata)
    nb.metadata.language_info["version"] = python  # compared last, below
    saved = io.StringIO()
    nbformat.write(nbformat.from_dict(nb), saved, version=nbformat.NO_CONVERT)
    assert saved.getvalue() == committed
    if python != kernel_metadata["language_info"]["version"]:
        pytest.skip(f"the notebooks record Python {python}, this kernel runs {kernel_metadata['language_info']['version']}: "
                    "JupyterLab marks them modified when it opens them here")


def test_notebooks_match_their_generator():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build_notebooks.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Parameters, paths, tables


def test_parse_parameters_like_papermill():
    pairs = [["epochs", "3"], ["lr", "3e-4"], ["resume", "true"], ["augment", "False"], ["preset", "None"], ["weights", "none"],
             ["data", "s3://bucket/chest_xray"], ["image_size", "-1"], ["name", "1.2.3"]]
    assert parse_parameters(pairs) == {"epochs": 3, "lr": 3e-4, "resume": True, "augment": False, "preset": None,
                                       "data": "s3://bucket/chest_xray", "weights": "none", "image_size": -1,
                                       "name": "1.2.3"}
    assert parse_parameters([]) == {}
    with pytest.raises(ConfigError, match="identifier"):
        parse_parameters([["not-a-name", "1"]])


def test_notebook_path(tmp_path, monkeypatch):
    assert notebook_path("train") == ROOT / "notebooks" / "train_classifier.ipynb"
    assert notebook_path("test").name == "test_classifier.ipynb"
    monkeypatch.chdir(tmp_path)  # not next to notebooks/: found next to the package
    assert notebook_path("train") == ROOT / "notebooks" / "train_classifier.ipynb"
    own = tmp_path / "mine.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), own)
    assert notebook_path(str(own)) == own
    with pytest.raises(ConfigError, match=r"missing\.ipynb") as info:
        notebook_path(str(tmp_path / "missing.ipynb"))
    assert "tried" in str(info.value)


def test_run_notebook_refuses_unknown_and_credential_parameters():
    with pytest.raises(ConfigError, match=r"no parameter.*epoch.*takes"):
        run_notebook("train", {"epoch": 3})
    with pytest.raises(ConfigError, match="credentials"):
        run_notebook("test", {"aws_secret_access_key": "x"})


def test_tables():
    metrics = {"accuracy": 0.9, "roc_auc": 0.95, "n_images": 10, "threshold": 0.5, "confusion_matrix": {}}
    table = metrics_table(metrics, title="test")
    assert [r[0] for r in table.rows] == ["accuracy", "roc_auc", "threshold", "n_images"]
    assert ["td", "0.9000", "right"] in Cells(table._repr_html_()).cells
    assert "| accuracy | 0.9000 |" in table._repr_markdown_()
    assert "roc_auc" in str(table)

    split = SimpleNamespace(labels=[0, 1, 1], class_names=("NORMAL", "PNEUMONIA"))
    counts = class_counts_table({"train": split})
    assert counts.header == ("split", "NORMAL", "PNEUMONIA", "total")
    assert counts.rows == (("train", "1", "2", "3"),)

    predictions = predictions_table([Prediction("s3://b/new/a.jpeg", "PNEUMONIA", 0.91234)])
    assert predictions.rows == (("a.jpeg", "PNEUMONIA", "0.9123"),)
    assert predictions.title == "1 image(s) in s3://b/new"
    assert predictions_table([]).title == "0 image(s)"


class Cells(HTMLParser):
    """The cells of an HTML table: (tag, text, CSS text-align or None)."""

    def __init__(self, text: str):
        super().__init__()
        self.cells: list[list] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            style = dict(attrs).get("style") or ""
            align = next((rule.split(":")[1].strip() for rule in style.split(";") if rule.strip().startswith("text-align")), None)
            self.cells.append([tag, "", align])

    def handle_data(self, data):
        if self.cells:
            self.cells[-1][1] += data


def test_table_text_is_left_aligned_and_numbers_right():
    """JupyterLab right-aligns table cells: the text columns (what a metric means, image names) were
    ragged. Numbers stay right-aligned."""
    table = metrics_table({"accuracy": 0.9, "roc_auc": 0.95, "n_images": 10}, title="test")
    cells = Cells(table._repr_html_()).cells
    assert ["td", "share of all images classified correctly", "left"] in cells
    assert ["td", "accuracy", "left"] in cells and ["th", "metric", "left"] in cells
    assert ["td", "0.9000", "right"] in cells and ["td", "10", "right"] in cells and ["th", "value", "right"] in cells
    assert "|:---|---:|:---|" in table._repr_markdown_()
    assert "accuracy  0.9000  share" in str(table) and "n_images      10  images" in str(table)
    predictions = Cells(predictions_table([Prediction("s3://b/new/a.jpeg", "PNEUMONIA", 0.9)])._repr_html_()).cells
    assert [align for tag, _, align in predictions if tag == "td"] == ["left", "left", "right"]


@pytest.mark.parametrize(("locations", "folder"), [
    (["s3://b/x/val/NORMAL/a.jpeg", "s3://b/x/val/PNEUMONIA/b.jpeg"], "s3://b/x/val"),
    (["s3://b/a.jpeg", "s3://b/c/d.jpeg"], "s3://b"),
    (["s3://b/a.jpeg", "s3://c/a.jpeg"], ""),
    (["/data/new/a.png", "/data/new/b.png"], "/data/new"),
    (["/a.png", "/b/c.png"], ""),
    (["a.png", "b.png"], ""),
    (["new/a.png", "new/b.png"], "new"),
])
def test_common_folder(locations, folder):
    assert common_folder(locations) == folder


def test_progress_bars_are_collapsed():
    text = "found 3\n\rbar 10%\rbar 100%\r        \r\nepoch 1 done\n\n"
    assert collapse_progress(text) == "found 3\nbar 100%\nepoch 1 done\n\n"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="\rb 1/2"),
        nbformat.v4.new_output("stream", name="stderr", text="\rb 2/2\n"),
        nbformat.v4.new_output("stream", name="stdout", text="done\n"),
    ])]
    outputs = nbformat.reads(tidy_outputs(nbformat.writes(nb)), as_version=4).cells[0].outputs
    assert [(o.name, o.text) for o in outputs] == [("stderr", "b 2/2\n"), ("stdout", "done\n")]


def test_progress_bar_widgets_keep_their_final_text():
    """An executed notebook read without its kernel shows a widget's text fallback: the bar as it
    ended, not at 0%."""
    state = {
        "box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_label", "IPY_MODEL_bar", "IPY_MODEL_count"]}},
        "label": {"model_name": "HTMLModel", "state": {"value": "epoch 1/2: 100%"}},
        "bar": {"model_name": "FloatProgressModel", "state": {"value": 5, "max": 5}},
        "count": {"model_name": "HTMLModel", "state": {"value": " 5/5 [00:02&lt;00:00,  2.26batch/s]"}},
    }
    assert progress_bar_text(state, "box") == "epoch 1/2: 100%|██████████| 5/5 [00:02<00:00,  2.26batch/s]"
    assert progress_bar_text(state, "label") is None and progress_bar_text(state, "missing") is None
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state, "version_major": 2,
                                                                           "version_minor": 0}}
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
        "display_data", data={"application/vnd.jupyter.widget-view+json": view, "text/plain": "epoch 1/2:   0%|"})])]
    output = nbformat.reads(tidy_outputs(nbformat.writes(nb)), as_version=4).cells[0].outputs[0]
    assert output.data["text/plain"] == "epoch 1/2: 100%|██████████| 5/5 [00:02<00:00,  2.26batch/s]"
    assert output.data["application/vnd.jupyter.widget-view+json"] == view


def test_scrub():
    text = json.dumps({"text": ["key=s3cr/t\"x\n"]})
    assert "s3cr" not in scrub(text, ["s3cr/t\"x"])


# ---------------------------------------------------------------------------------------------
# The pictures


def drawn(figure):
    """`figure` drawn as a PNG would be, and its renderer, to measure what is on it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def test_training_curves_show_whole_epochs_named_panels_and_the_accuracy_that_is_saved():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 0.8 / e, "val_roc_auc": 0.9, "val_accuracy": 0.5,
                "val_threshold": 0.9, "val_accuracy_at_threshold": 0.95} for e in (1, 2)]
    figure = plots.training_curves_figure(history)
    drawn(figure)
    loss, validation = figure.axes
    for ax in (loss, validation):
        low, high = ax.get_xlim()
        assert [t for t in ax.get_xticks() if low <= t <= high] == [1, 2], "epochs are whole numbers"
        assert ax.get_title() and ax.get_ylabel() and ax.get_xlabel() == "epoch"
    accuracy = next(line for line in validation.get_lines() if "accuracy" in line.get_label())
    assert list(accuracy.get_ydata()) == [0.95, 0.95], "the accuracy at the chosen threshold, as the final table shows"
    assert "threshold" in accuracy.get_label()
    older = [{k: v for k, v in h.items() if k not in ("val_threshold", "val_accuracy_at_threshold")} for h in history]
    accuracy = next(line for line in plots.training_curves_figure(older).axes[1].get_lines() if "accuracy" in line.get_label())
    assert list(accuracy.get_ydata()) == [0.5, 0.5] and accuracy.get_label() == "accuracy at threshold 0.5"


def test_sample_image_titles_are_whole_and_fit_their_column():
    import torch

    names = ["person1946_bacteria_4874.jpeg", "NORMAL2-IM-1427-0001.jpeg", "person101_bacteria_18.jpeg", "IM-0002-0001.jpeg"]
    records = tuple(SimpleNamespace(obj=SimpleNamespace(relpath=f"train/X/{n}")) for n in names * 2)
    data = SimpleNamespace(labels=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), class_names=("NORMAL", "PNEUMONIA"),
                           records=records, pixels=torch.zeros((8, 16, 16), dtype=torch.uint8))
    figure = plots.sample_images_figure(data)
    renderer = drawn(figure)
    titles = [ax.title for ax in figure.axes if ax.get_title()]
    assert sorted(t.get_text().split("\n")[1] for t in titles) == sorted(names * 2), "file names are not cut"
    pitch = figure.bbox.width / 4
    for title in titles:
        box = title.get_window_extent(renderer)
        column = int(((box.x0 + box.x1) / 2) // pitch)
        assert column * pitch <= box.x0 and box.x1 <= (column + 1) * pitch, f"{title.get_text()!r} overflows its column"


# ---------------------------------------------------------------------------------------------
# Executing the notebooks for real: papermill, a kernel, the loopback S3 server


def xraylib_cmd(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xraylib", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(s3_server, tiny_dataset, tmp_path_factory):
    """The tiny dataset in a bucket, and a model trained on it by `xraylib run train`."""
    bucket = f"nb-{uuid.uuid4().hex[:12]}"
    locals3.create_bucket(bucket)
    data = f"s3://{bucket}/chest_xray"
    storage.upload_directory(tiny_dataset, data)
    with scratch_dir(tmp_path_factory, "cache") as cache:
        env = {**os.environ, "XRAYLIB_CACHE_DIR": str(cache)}
        run = f"s3://{bucket}/runs/tiny"
        result = xraylib_cmd("run", "train", "-p", "data", data, "-p", "out", run, *TINY_TRAIN, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        yield {"bucket": bucket, "data": data, "run": run, "stdout": result.stdout, "env": env}
    locals3.delete_bucket(bucket, s3_server.endpoint_url)


def assert_shows_what_a_reviewer_asks(nb: nbformat.NotebookNode) -> None:
    """An executed test notebook shows intervals, operating points, subgroups, the comparison, the
    Grad-CAM heat maps and the model card."""
    html = "".join("".join(o["data"]["text/html"]) for o in outputs_of(nb) if "text/html" in o.get("data", {}))
    for caption in ("test images", "test patients", "operating points", "subgroups"):
        assert f"<caption>{caption}</caption>" in html
    assert "<th style=\"text-align: left\">95% interval</th>" in html and "A - B" in html
    assert re.search(r"<td[^>]*>accuracy</td><td[^>]*>\d\.\d{4}</td><td[^>]*>\d\.\d{4} – \d\.\d{4}</td>", html), html
    assert all(f"<td style=\"text-align: left\">{kind}</td>" in html for kind in ("bacteria", "virus"))
    heat_maps = next(c for c in nb.cells if c.cell_type == "code" and "grad_cam_figure" in c.source)
    assert any("image/png" in o.get("data", {}) for o in heat_maps.outputs)
    card = [o for o in outputs_of(nb) if "text/markdown" in o.get("data", {}) and "text/html" not in o.get("data", {})]
    assert len(card) == 1 and "# Model card" in "".join(card[0]["data"]["text/markdown"])  # rendered, not a table's text
    assert "## Known limits" in "".join(card[0]["data"]["text/markdown"])


def assert_executed_cleanly(nb: nbformat.NotebookNode) -> None:
    assert nb.metadata["papermill"]["exception"] in (None, False)
    errors = [o for o in outputs_of(nb) if o.output_type == "error"]
    assert not errors, errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)


@pytest.mark.timeout(400)
def test_train_notebook_runs_headless(trained):
    executed = f"{trained['run']}/train_classifier.executed.ipynb"
    assert trained["stdout"].strip().endswith(f"executed notebook written to {executed}")
    assert "epoch 1/1" in trained["stdout"]  # the cells' output is echoed live
    text = storage.read_bytes(executed).decode()
    assert SECRET not in text
    nb = nbformat.reads(text, as_version=4)
    assert_executed_cleanly(nb)
    assert nb.metadata["papermill"]["parameters"]["epochs"] == 1
    pictures = [o for o in outputs_of(nb) if "image/png" in o.get("data", {})]
    assert len(pictures) == 2  # sample images and training curves
    html = [o for o in outputs_of(nb) if "text/html" in o.get("data", {})]
    assert any("validation" in "".join(o.data["text/html"]) for o in html)  # the split counts
    for name in ("model.pt", "checkpoint.pt", "history.json", "training_curves.png"):
        assert storage.exists(f"{trained['run']}/{name}")


def bars_of(cell: nbformat.NotebookNode) -> list[str]:
    """The progress bars a cell displayed, as their text shows them."""
    return [o.data["text/plain"] for o in cell.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]


def test_finished_progress_bars_stay_with_their_count_and_time(trained):
    nb = nbformat.reads(storage.read_bytes(f"{trained['run']}/train_classifier.executed.ipynb").decode(), as_version=4)
    training = next(c for c in nb.cells if c.cell_type == "code" and "train(cfg" in c.source)
    bars = bars_of(training)
    assert len(bars) == 2, bars  # loading the images, then one epoch
    assert re.fullmatch(r"loading images: 100%\|█{10}\| 80/80 \[\d\d:\d\d<00:00, .*(item/s|s/item)\]", bars[0]), bars[0]
    assert re.fullmatch(r"epoch 1/1: 100%\|█{10}\| 5/5 \[\d\d:\d\d<00:00, .*(batch/s|s/batch), loss=\d\.\d{4}\]",
                        bars[1]), bars[1]


def test_training_log_says_how_the_network_starts(trained):
    assert "training ResNet50 from scratch on cpu" in trained["stdout"] and "(none weights)" not in trained["stdout"]


def test_epoch_lines_give_the_accuracy_at_the_threshold_the_model_is_saved_with(trained):
    """As the final line and the validation table do: not at 0.5 in one place and at the chosen
    threshold in the other."""
    epoch = re.search(r"^epoch 1/1 .* val accuracy (\S+) at threshold (\S+) ", trained["stdout"], re.MULTILINE)
    final = re.search(r"^best epoch 1: .*, accuracy (\S+) at threshold (\S+);", trained["stdout"], re.MULTILINE)
    assert epoch and final and epoch.groups() == final.groups(), trained["stdout"]


@pytest.mark.timeout(300)
def test_test_notebook_runs_with_output_on_s3(trained, capsys):
    evaluation = f"{trained['run']}/evaluation"
    report = f"s3://{trained['bucket']}/reports/test.ipynb"
    new_images = f"{trained['data']}/val"
    assert run_notebook("test", {"model": trained["run"], "data": trained["data"], "out": evaluation,
                                 "new_images": new_images}, output=report) == report
    text = storage.read_bytes(report).decode()
    assert SECRET not in text
    nb = nbformat.reads(text, as_version=4)
    assert_executed_cleanly(nb)
    pictures = [o for o in outputs_of(nb) if "image/png" in o.get("data", {})]
    assert len(pictures) == 6  # confusion matrix, ROC, PR, reliability diagram, mistakes, Grad-CAM heat maps
    assert_shows_what_a_reviewer_asks(nb)
    # The last table classifies every image below new_images, each named from there.
    predictions = "".join(outputs_of(nb)[-1]["data"]["text/html"])
    val_images = storage.list_objects(new_images)
    assert f"<caption>{len(val_images)} image(s) in {new_images}</caption>" in predictions
    assert sorted(text for tag, text, align in Cells(predictions).cells if tag == "td" and align == "left"
                  and text.endswith(".jpeg")) == sorted(o.relpath for o in val_images)
    # The evaluation ends with its bar, finished, and a line saying what it did.
    evaluating = next(c for c in nb.cells if c.cell_type == "code" and "evaluate_model(" in c.source)
    assert [bar.split("|")[0] for bar in bars_of(evaluating)] == ["loading images: 100%"]
    printed = "".join(o.text for o in evaluating.outputs if o.output_type == "stream")
    assert re.fullmatch(r"evaluated 40 images in \d+\.\d s; wrote metrics\.json, predictions\.csv, confusion_matrix\.png, "
                        r"roc_curve\.png, pr_curve\.png, calibration\.png and model_card\.md to "
                        rf"{re.escape(evaluation)}\n", printed), printed
    metrics = json.loads(storage.read_bytes(f"{evaluation}/metrics.json"))
    assert set(metrics) >= METRIC_KEYS
    assert metrics["n_images"] == 40
    for name in ("predictions.csv", "confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration.png", "model_card.md"):
        assert storage.exists(f"{evaluation}/{name}")
    # The model trained by the notebook stored its operating points, chosen on validation.
    assert [p["chosen_on"] for p in metrics["operating_points"]] == ["validation"] * 3


@pytest.mark.timeout(300)
def test_plain_papermill_runs_the_notebooks(trained, tmp_path):
    """`papermill notebook out.ipynb -p ...`, without xraylib in between: the python3 kernel of this env."""
    papermill = Path(sys.executable).parent / "papermill"
    out = tmp_path / "evaluation"
    result = subprocess.run(
        [str(papermill), str(ROOT / "notebooks" / "test_classifier.ipynb"), str(tmp_path / "executed.ipynb"),
         "-p", "model", trained["run"], "-p", "data", trained["data"], "-p", "out", str(out), "-p", "adapt_batchnorm", "True"],
        capture_output=True, text=True, timeout=240, env=trained["env"], cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    assert_executed_cleanly(executed)
    assert "<caption>0 image(s)</caption>" in "".join(outputs_of(executed)[-1]["data"]["text/html"])  # new_images: []
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert metrics["batchnorm_adaptation"]["images"] == metrics["n_images"]  # the parameter reached evaluate


@pytest.mark.timeout(300)
def test_failing_cell_exits_non_zero_naming_the_cell(trained):
    out = f"s3://{trained['bucket']}/runs/failed"
    result = xraylib_cmd("run", "train", "-p", "data", f"s3://{trained['bucket']}/nothing-here", "-p", "out", out,
                         *TINY_TRAIN, env=trained["env"], timeout=240)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("xraylib: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0])
    message = errors[0]
    assert "train_classifier.ipynb cell 5 (`index = index_images(cfg.data" in message
    assert "DatasetError: no files found in s3://" in message
    executed = f"{out}/train_classifier.executed.ipynb"
    assert message.endswith(f"the executed notebook is at {executed}")
    text = storage.read_bytes(executed).decode()  # kept, with the traceback
    assert SECRET not in text
    assert any(o.output_type == "error" for o in outputs_of(nbformat.reads(text, as_version=4)))


@pytest.mark.timeout(120)
def test_kernel_is_this_python_and_secrets_are_blanked(s3_server, tmp_path, monkeypatch):
    # A `python3` kernelspec of some other environment, found first by a plain jupyter_client lookup.
    other = tmp_path / "jupyter" / "kernels" / "python3"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(json.dumps({"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f",
                                                            "{connection_file}"], "display_name": "other",
                                                   "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.environ['AWS_SECRET_ACCESS_KEY'])"),
                nbformat.v4.new_code_cell("raise ValueError('bad ' + os.environ['AWS_SECRET_ACCESS_KEY'])")]
    path = tmp_path / "leaky.ipynb"
    nbformat.write(nb, path)
    output = tmp_path / "leaky.executed.ipynb"
    with pytest.raises(NotebookError) as info:
        run_notebook(str(path), {}, output=str(output), echo=False)
    assert "leaky.ipynb cell 1 (`raise ValueError('bad ' + os.environ['AWS_SECRET_ACCESS_KEY'])`) failed: ValueError: bad" \
        in str(info.value)
    assert SECRET not in str(info.value)
    text = output.read_text()
    assert SECRET not in text and "***" in text
    executed = nbformat.reads(text, as_version=4)
    assert executed.cells[1].outputs[0].text.splitlines()[0] == os.path.normpath(sys.executable)
    assert os.environ["JUPYTER_PATH"] == str(tmp_path / "jupyter")  # restored


# ---------------------------------------------------------------------------------------------
# JupyterLab serves the notebooks


@pytest.mark.timeout(120)
def test_jupyter_lab_lists_the_notebooks(tmp_path):
    with jupyter_lab(ROOT, tmp_path / "lab", timeout=90) as lab:
        listing = lab.get("/api/contents/notebooks")
        notebooks = {item["name"]: item["type"] for item in listing["content"]}
        assert notebooks["train_classifier.ipynb"] == "notebook"
        assert notebooks["test_classifier.ipynb"] == "notebook"
        assert notebooks["sagemaker_training_job.ipynb"] == "notebook"
        opened = lab.get("/api/contents/notebooks/train_classifier.ipynb")
        assert opened["content"]["metadata"]["kernelspec"]["name"] == "python3"
        unauthorized = urllib.request.Request(lab.url + "/api/contents/notebooks")
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(unauthorized, timeout=10)
        assert denied.value.code == 403


# ---------------------------------------------------------------------------------------------
# The demo, shrunk


@pytest.mark.timeout(300)
def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    from xraylib import demo

    monkeypatch.setattr(demo, "IMAGE_SIZE", 32)
    endpoint_before = os.environ.get("AWS_ENDPOINT_URL")
    metrics = demo.run_demo(tmp_path / "demo", images_per_class=8, epochs=1)
    files = {p.name for p in (tmp_path / "demo").iterdir()}
    assert set(demo.TRAIN_FILES) | set(demo.EVAL_FILES) == files
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text()) == metrics
    assert metrics["n_images"] == 8
    for name in ("train_classifier.executed.ipynb", "test_classifier.executed.ipynb"):
        text = (tmp_path / "demo" / name).read_text()
        assert SECRET not in text
        assert_executed_cleanly(nbformat.reads(text, as_version=4))
    assert_shows_what_a_reviewer_asks(nbformat.reads((tmp_path / "demo" / "test_classifier.executed.ipynb").read_text(),
                                                     as_version=4))
    card = (tmp_path / "demo" / "model_card.md").read_text()
    assert f"{metrics['accuracy']:.4f}" in card and "s3://xraylib-demo/chest_xray" in card
    printed = capsys.readouterr().out
    assert f"results in {tmp_path / 'demo'}" in printed and "accuracy" in printed
    assert "local S3 server at http://127.0.0.1:" in printed
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint_before  # the demo's server is gone, the environment restored


@pytest.mark.timeout(120)
def test_a_dead_kernel_is_reported(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("print('starting')"), nbformat.v4.new_code_cell("import os\nos._exit(9)")]
    path = tmp_path / "dies.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(NotebookError, match=r"dies\.ipynb: the kernel died .*lower batch_size"):
        run_notebook(str(path), {}, output=str(tmp_path / "dies.executed.ipynb"), echo=False)
    executed = nbformat.read(tmp_path / "dies.executed.ipynb", as_version=4)
    assert executed.cells[0].outputs[0].text == "starting\n"
