"""The notebooks as a person sees them: JupyterLab of this environment in headless Chromium.

Both committed notebooks are opened in JupyterLab (copied byte for byte into a scratch folder,
so the outputs never land in the repository), the parameters cell gets a few lines appended as
a person would type them (generated data in a bucket of the loopback S3 server, two epochs at
32 px), and all cells run. The checks are what a person would notice: a kernel chooser dialog,
the notebook marked modified as soon as it opens, an error or 'Error displaying widget' in an
output, finished progress bars gone, the confusion matrix not shown, tables whose text is
right-aligned. Screenshots of each notebook, on opening and after the run, are saved in
test-output/browser/ (or $XRAYLIB_TEST_OUTPUT/browser).

Chromium is Debian's `chromium` package (/usr/bin/chromium, or $XRAYLIB_CHROMIUM), driven by
Playwright for Python; Playwright's own browser download is not used. Marked `browser`, so
`make test` leaves it out; `make test-browser` runs it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.jupyterlab import jupyter_lab
from xraylib import locals3, storage
from xraylib.notebooks import NOTEBOOKS, _is_number

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("XRAYLIB_CHROMIUM", "/usr/bin/chromium")
OUTPUT = Path(os.environ.get("XRAYLIB_TEST_OUTPUT", ROOT / "test-output")) / "browser"
# Headless, offline, and quiet: no sandbox (CI runs as root), no GPU, no calls home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EPOCHS = 2
RUN_TIMEOUT = 300  # seconds for all cells of one notebook

# The open notebook's state, summarized in the page: the document model (dirty, outputs) and what
# the output areas show (text, pictures, progress widgets, table alignment).
STATE_JS = """async (name) => {
  const panel = [...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === name);
  if (!panel || !panel.context.isReady) return null;
  const kernel = panel.sessionContext.session ? panel.sessionContext.session.kernel : null;
  const model = panel.context.model.toJSON();
  const cells = panel.content.widgets.map((cell, i) => {
    const json = model.cells[i];
    const area = cell.node.querySelector('.jp-Cell-outputArea');
    const tables = area ? [...area.querySelectorAll('table')].map(table => ({
      header: [...table.querySelectorAll('thead th')].map(th => th.textContent),
      align: [...(table.querySelector('tbody tr') || {children: []}).children].map(td => getComputedStyle(td).textAlign),
      cells: [...table.querySelectorAll('tbody tr')].map(tr => [...tr.children].map(td => td.textContent)),
    })) : [];
    return {
      type: json.cell_type, source: json.source, count: json.execution_count ?? null,
      outputs: (json.outputs || []).map(o => ({type: o.output_type, name: o.name || null,
                                               text: o.text || (o.output_type === 'error' ? o.ename + ': ' + o.evalue : '')})),
      shown: area ? area.textContent.replace(/\u2007/g, ' ') : '',  // tqdm's widgets space with figure spaces
      images: area ? [...area.querySelectorAll('img')].map(img => [img.naturalWidth, img.naturalHeight]) : [],
      bars: area ? area.querySelectorAll('.widget-hprogress').length : 0,
      tables,
    };
  });
  return {dirty: panel.context.model.dirty, kernel: kernel ? kernel.status : null,
          kernelName: panel.sessionContext.kernelDisplayName, cells};
}"""

KERNEL_INFO_JS = """async (name) => {
  const panel = [...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === name);
  await panel.sessionContext.session.kernel.info;
}"""


@dataclass
class Seen:
    """What one notebook looked like: on opening, and after running all cells."""

    on_open: dict
    after_run: dict
    dialogs: list[str]
    widget_errors: int

    def cell(self, snippet: str) -> dict:
        """The code cell whose source holds `snippet`."""
        return next(c for c in self.after_run["cells"] if c["type"] == "code" and snippet in c["source"])


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) or set XRAYLIB_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def lab(s3_server, tiny_dataset, tmp_path_factory):
    """JupyterLab on a scratch folder holding the committed notebooks, byte for byte, and the tiny
    dataset in a bucket of the loopback S3 server (the kernels inherit its endpoint)."""
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    root = tmp_path_factory.mktemp("lab-root")
    for name in NOTEBOOKS.values():
        shutil.copyfile(ROOT / "notebooks" / name, root / name)
    bucket = f"browser-{uuid.uuid4().hex[:12]}"
    locals3.create_bucket(bucket)
    data = f"s3://{bucket}/chest_xray"
    storage.upload_directory(tiny_dataset, data)
    home = tmp_path_factory.mktemp("lab-home")
    # The app object in the page (window.jupyterapp) is what STATE_JS reads and runs commands with.
    with jupyter_lab(root, home, args=["--LabApp.expose_app_in_browser=True"],
                     env={"XRAYLIB_CACHE_DIR": str(home / "xraylib-cache"), "OMP_NUM_THREADS": "1"}) as server:
        yield SimpleNamespace(page_url=server.page_url, data=data, run=f"s3://{bucket}/runs/browser")


def state(page, name: str) -> dict | None:
    return page.evaluate(STATE_JS, name)


def screenshot(page, name: str) -> None:
    """The whole notebook in one picture: the window made as tall as the notebook."""
    scroller = "document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer')"
    height = page.evaluate(f"() => {scroller}.scrollHeight")
    page.set_viewport_size({"width": 1280, "height": min(max(900, height + 200), 16000)})
    page.evaluate(f"() => {{ {scroller}.scrollTop = 0; }}")
    page.wait_for_timeout(1500)  # layout and images settle
    page.screenshot(path=str(OUTPUT / name))
    page.set_viewport_size({"width": 1280, "height": 900})


def open_and_run(browser, lab, name: str, parameters: str) -> Seen:
    """Open notebook `name`, wait for its kernel, append `parameters` to the parameters cell as a
    person would type them, run all cells and wait for them."""
    page = browser.new_page()
    dialogs: list[str] = []
    try:
        page.goto(lab.page_url(name))
        deadline = time.monotonic() + 120
        while True:  # the kernel starts, or a dialog asks for one
            seen = state(page, name)
            if page.locator(".jp-Dialog").count():
                dialogs.append(page.locator(".jp-Dialog").first.text_content())
                page.keyboard.press("Escape")
            if seen and seen["kernel"] == "idle":
                break
            assert time.monotonic() < deadline, f"{name}: the kernel was not ready within 120 s ({seen})"
            page.wait_for_timeout(250)
        page.evaluate(KERNEL_INFO_JS, name)  # JupyterLab writes the kernel's language_info then
        page.wait_for_timeout(1500)
        on_open = state(page, name)
        on_open["tab_marked_modified"] = page.locator(".jp-mod-dirty").count() > 0
        screenshot(page, f"{Path(name).stem}-opened.png")

        editor = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".cm-content")  # the parameters cell
        editor.click()
        page.keyboard.press("Control+End")
        page.keyboard.insert_text("\n" + parameters)
        page.keyboard.press("Escape")
        assert state(page, name)["cells"][1]["source"].endswith(parameters)

        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        deadline = time.monotonic() + RUN_TIMEOUT
        settled = 0
        while settled < 2:  # two looks in a row: idle, and every code cell ran or one failed
            page.wait_for_timeout(500)
            seen = state(page, name)
            code = [c for c in seen["cells"] if c["type"] == "code"]
            failed = any(o["type"] == "error" for c in code for o in c["outputs"])
            settled = settled + 1 if seen["kernel"] == "idle" and (failed or all(c["count"] for c in code)) else 0
            assert time.monotonic() < deadline, f"{name}: the cells did not finish within {RUN_TIMEOUT} s"
        page.wait_for_timeout(1000)  # widgets and images render
        after_run = state(page, name)
        widget_errors = page.get_by_text("Error displaying widget").count()
        screenshot(page, f"{Path(name).stem}-ran.png")
        return Seen(on_open, after_run, dialogs, widget_errors)
    finally:
        page.close()


@pytest.fixture(scope="module")
def train_seen(browser, lab) -> Seen:
    parameters = "\n".join([f'data = "{lab.data}"', f'out = "{lab.run}"', f"epochs = {EPOCHS}", "image_size = 32",
                            "batch_size = 16", 'weights = "none"', 'device = "cpu"'])
    return open_and_run(browser, lab, NOTEBOOKS["train"], parameters)


@pytest.fixture(scope="module")
def test_seen(browser, lab, train_seen) -> Seen:
    parameters = "\n".join([f'model = "{lab.run}"', f'data = "{lab.data}"', f'out = "{lab.run}/evaluation"',
                            f'new_images = "{lab.data}/val"'])
    return open_and_run(browser, lab, NOTEBOOKS["test"], parameters)


def assert_opened_cleanly(seen: Seen) -> None:
    assert seen.dialogs == [], "a dialog asked for a kernel"
    assert seen.on_open["kernelName"] == "Python 3 (ipykernel)"
    assert not seen.on_open["dirty"] and not seen.on_open["tab_marked_modified"], (
        "JupyterLab marked the untouched notebook as modified: it rewrites something of the committed file"
    )


def assert_ran_cleanly(seen: Seen) -> None:
    code = [c for c in seen.after_run["cells"] if c["type"] == "code"]
    errors = [o["text"] for c in code for o in c["outputs"] if o["type"] == "error"]
    assert errors == []
    assert all(c["count"] for c in code)
    stderr = [o["text"] for c in code for o in c["outputs"] if o["type"] == "stream" and o["name"] == "stderr"]
    assert stderr == [], "warnings or errors printed in a cell"
    assert seen.widget_errors == 0, "'Error displaying widget' in an output"


def assert_text_left_numbers_right(table: dict) -> None:
    for column, align in enumerate(table["align"]):
        numeric = all(_is_number(row[column]) for row in table["cells"])
        assert align == ("right" if numeric else "left"), (table["header"][column], align)


def test_train_notebook_in_jupyterlab(train_seen):
    assert_opened_cleanly(train_seen)
    assert_ran_cleanly(train_seen)
    training = train_seen.cell("train(cfg")
    # The finished bars stay, each with its count and time: loading the images, then one per epoch.
    assert training["bars"] == 1 + EPOCHS
    for epoch in range(1, EPOCHS + 1):
        assert f"epoch {epoch}/{EPOCHS}: 100%" in training["shown"]
    assert "loading images: 100%" in training["shown"]
    assert "(none weights)" not in training["shown"]
    curves = train_seen.cell("training_curves_figure")
    assert len(curves["images"]) == 1 and curves["images"][0][0] > 0
    for cell in ("settings_table", "class_counts_table", "metrics_table"):
        for table in train_seen.cell(cell)["tables"]:
            assert_text_left_numbers_right(table)


def test_test_notebook_in_jupyterlab(test_seen):
    assert_opened_cleanly(test_seen)
    assert_ran_cleanly(test_seen)
    evaluating = test_seen.cell("evaluate_model(")
    assert evaluating["bars"] == 1 and "loading images: 100%" in evaluating["shown"]
    assert "evaluated 40 images in " in evaluating["shown"]
    matrix = test_seen.cell("confusion_matrix_figure")
    assert len(matrix["images"]) == 1
    width, height = matrix["images"][0]
    assert width > 300 and height > 300, "the confusion matrix is not shown"
    images_and_patients = test_seen.cell("metrics_table(")["tables"]
    assert len(images_and_patients) == 2 and images_and_patients[0]["header"][2] == "95% interval"
    for table in images_and_patients:
        assert_text_left_numbers_right(table)
    for cell in ("operating_points_table(", "subgroups_table(", "comparison_table("):
        (table,) = test_seen.cell(cell)["tables"]
        assert_text_left_numbers_right(table)
    for cell in ("reliability_figure", "grad_cam_figure"):
        assert len(test_seen.cell(cell)["images"]) == 1
    (predictions,) = test_seen.cell("predictions_table(")["tables"]
    assert_text_left_numbers_right(predictions)
    assert predictions["cells"] and not any(row[0].startswith("s3://") for row in predictions["cells"])
