"""The notebooks: finding them, passing them parameters, running them headless, and the tables they show.

`run_notebook` executes the train or test notebook with papermill in a kernel of *this* Python
(a kernelspec made on the fly in a temporary folder put first on JUPYTER_PATH, so a `python3`
kernel of another environment is never picked up), writes the executed notebook to a local
temporary file with any AWS secret from the environment blanked out, and stores it through
`xraylib.storage`, so an s3:// output uses the same credentials and endpoint as everything else.
A cell that fails raises `NotebookError` naming the cell and the exception; the executed notebook,
with the traceback, is stored all the same.

`metrics_table`, `class_counts_table`, `settings_table`, `operating_points_table`, `subgroups_table`
and `comparison_table` are what the notebooks display.
"""

from __future__ import annotations

import ast
import contextlib
import html
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xraylib import storage
from xraylib.errors import ConfigError, XrayError

NOTEBOOKS = {"train": "train_classifier.ipynb", "test": "test_classifier.ipynb", "sagemaker": "sagemaker_training_job.ipynb"}
NOTEBOOK_DIR = "notebooks"
KERNEL_NAME = "python3"  # what the notebooks' metadata names, so plain `papermill` runs them too
# Environment variables whose values never go into an executed notebook.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_SECRET_NAME = re.compile(r"secret|password|passwd|token|credential|access_key", re.IGNORECASE)


class NotebookError(XrayError):
    """A cell of an executed notebook raised an exception."""


# ---------------------------------------------------------------------------------------------
# Parameters


def parse_value(text: str) -> Any:
    """A `-p NAME VALUE` value as papermill reads it: int, float, True/False (any case), None, else
    the string. Only `None` is None: `none` stays a string, since `-p weights none` means no
    pretrained weights."""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    if text.strip() == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_parameters(pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """`[["epochs", "3"], ["data", "s3://b/x"]]` -> `{"epochs": 3, "data": "s3://b/x"}`."""
    parameters: dict[str, Any] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"a parameter is a NAME and a VALUE, got {list(pair)!r}")
        name, value = pair
        if not name.isidentifier():
            raise ConfigError(f"parameter name {name!r} is not a Python identifier")
        parameters[name] = parse_value(value)
    return parameters


def notebook_path(name: str) -> Path:
    """The notebook file for 'train', 'test', or a path. The short names are looked up in
    ./notebooks, then in the notebooks folder of the source tree this package comes from."""
    tried: list[Path] = []
    if name in NOTEBOOKS:
        for folder in (Path.cwd() / NOTEBOOK_DIR, Path(__file__).resolve().parents[1] / NOTEBOOK_DIR):
            candidate = folder / NOTEBOOKS[name]
            if candidate.is_file():
                return candidate
            tried.append(candidate)
    else:
        candidate = Path(name).expanduser()
        if candidate.is_file() and candidate.suffix == ".ipynb":
            return candidate
        tried.append(candidate)
    raise ConfigError(
        f"notebook {name!r} not found (tried {', '.join(str(p) for p in tried)}): pass 'train', 'test' or the path "
        "of a .ipynb file, or run from the folder that holds notebooks/"
    )


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The names the `parameters` cell of a notebook assigns, with their literal defaults."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            names: dict[str, Any] = {}
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            try:
                                names[target.id] = ast.literal_eval(node.value)
                            except ValueError:
                                names[target.id] = None
            return names
    return {}


def default_output(path: Path, parameters: Mapping[str, Any]) -> str:
    """`<out>/<notebook>.executed.ipynb` when the run has an `out` location, else in the working folder."""
    filename = f"{path.stem}.executed.ipynb"
    out = parameters.get("out")
    return storage.join(str(out), filename) if out else str(Path.cwd() / filename)


# ---------------------------------------------------------------------------------------------
# Running


@contextlib.contextmanager
def this_python_kernel() -> Iterator[str]:
    """A `python3` kernelspec that starts this interpreter, first on JUPYTER_PATH for the block.

    papermill asks jupyter_client for the kernel the notebook names; on its own that finds
    whatever `python3` spec comes first (a user-wide one, another conda env, SageMaker's), whose
    Python may lack xraylib (papermill issues 251 and 856). The kernel inherits os.environ."""
    with tempfile.TemporaryDirectory(prefix="xraylib-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        spec = {
            # Kernel log warnings (e.g. "running over TCP without encryption", on loopback) are noise
            # in a headless run; the cells' own output and errors are all kept.
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--IPKernelApp.log_level=ERROR"],
            "display_name": f"Python 3 ({sys.prefix})",
            "language": "python",
            "metadata": {"debugger": True},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
        saved = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (tmp, saved) if p)
        try:
            yield KERNEL_NAME
        finally:
            if saved is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = saved


def secret_values() -> list[str]:
    """The credential values in the environment that must never be written into a notebook."""
    return [v for k in SECRET_VARIABLES if len(v := os.environ.get(k, "")) >= 4]


def scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
        text = text.replace(json.dumps(secret)[1:-1], "***")  # as it is spelled inside JSON strings
    return text


def collapse_progress(text: str) -> str:
    """Stream text as a terminal shows it: of a line rewritten with carriage returns (progress
    bars) only its last state is kept, and a bar that erased itself leaves no line."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if "\r" in line:
            line = next((part for part in reversed(line.split("\r")) if part.strip()), "")
            if not line:
                continue
        lines.append(line)
    return "\n".join(lines)


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def progress_bar_text(state: Mapping[str, Any], model_id: str) -> str | None:
    """The last state of a notebook progress bar (tqdm's: an HBox of an HTML label, a progress bar
    and an HTML count) as tqdm prints it in a terminal, from a notebook's saved widget `state`;
    None when `model_id` is not such a bar."""
    box = state.get(model_id, {})
    if box.get("model_name") != "HBoxModel":
        return None
    children = [state.get(str(ref).removeprefix("IPY_MODEL_"), {}) for ref in box.get("state", {}).get("children", [])]
    if [c.get("model_name") for c in children] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    label, bar, count = (c.get("state", {}) for c in children)
    share = min(max(float(bar.get("value") or 0) / float(bar.get("max") or 1), 0.0), 1.0)
    filled = round(10 * share)
    label_text, count_text = (html.unescape(part.get("value", "")).replace("\u2007", " ") for part in (label, count))
    return f"{label_text}|{'█' * filled}{' ' * (10 - filled)}|{count_text}"  # tqdm's HTML spaces are figure spaces


def tidy_outputs(notebook_json: str) -> str:
    """Merge each cell's consecutive stdout (or stderr) outputs into one and collapse progress
    bars, as JupyterLab shows them: an executed notebook stays small and readable anywhere. A
    progress bar widget's text fallback, which is what JupyterLab shows once the kernel that drew
    it is gone, says where the bar ended (its count and time), not where it started (0%)."""
    import nbformat

    nb = nbformat.reads(notebook_json, as_version=4)
    widgets = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = progress_bar_text(widgets, view.get("model_id", "")) if isinstance(view, dict) else None
            if text is not None:
                output.data["text/plain"] = text
        merged: list[Any] = []
        for output in cell.outputs:
            previous = merged[-1] if merged else None
            if (output.output_type == "stream" and previous is not None and previous.output_type == "stream"
                    and previous.name == output.name):
                previous.text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = collapse_progress(output.text)
        cell.outputs = merged
    return nbformat.writes(nb)


def _first_line(source: str) -> str:
    line = next((s.strip() for s in source.splitlines() if s.strip() and not s.strip().startswith("#")), "")
    return line if len(line) <= 80 else line[:77] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_failure(path: Path, executed: str, error: Any) -> str:
    """'train_classifier.ipynb cell 5 (`display(...)`) failed: DatasetError: no files...'."""
    # Count cells as in the notebook as written: the cells papermill adds (injected parameters,
    # error markers) do not count.
    index = error.cell_index
    try:
        import nbformat

        added = ("injected-parameters", "papermill-error-cell-tag")
        original = [c for c in nbformat.reads(executed, as_version=4).cells
                    if not set(c.get("metadata", {}).get("tags", [])) & set(added)]
        index = next(i for i, c in enumerate(original)
                     if any(o.get("output_type") == "error" for o in c.get("outputs", []))
                     or c.get("metadata", {}).get("papermill", {}).get("exception") is True)
    except Exception:  # unreadable, or no error output: keep papermill's count
        pass
    return f"{path.name} cell {index} (`{_first_line(error.source)}`) failed: {error.ename}: {_one_line(error.evalue)}"


def run_notebook(name: str, parameters: Mapping[str, Any] | None = None, output: str | None = None, *,
                 echo: bool = True) -> str:
    """Execute a notebook ('train', 'test' or a path) with `parameters` and store the executed
    notebook at `output` (local or s3://; default next to the `out` parameter). Returns where
    it went. With `echo`, the cells' printed output is echoed to this process's stdout and stderr."""
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    path = notebook_path(name)
    parameters = dict(parameters or {})
    sensitive = [k for k in parameters if _SECRET_NAME.search(k)]
    if sensitive:
        raise ConfigError(f"parameter(s) {', '.join(sensitive)} look like credentials: they would be saved in the executed "
                          "notebook; set them in the environment or an AWS profile instead")
    known = notebook_parameters(path)
    unknown = sorted(set(parameters) - set(known))
    if known and unknown:
        raise ConfigError(f"{path.name} has no parameter(s) {', '.join(unknown)}; it takes: {', '.join(known)}")
    output = output or default_output(path, parameters)
    secrets = secret_values()
    with tempfile.TemporaryDirectory(prefix="xraylib-run-") as tmp, this_python_kernel() as kernel:
        local = Path(tmp) / f"{path.stem}.executed.ipynb"
        failure: Exception | None = None
        try:
            papermill.execute_notebook(
                str(path), str(local), parameters=parameters, kernel_name=kernel, progress_bar=False,
                stdout_file=sys.stdout if echo else None, stderr_file=sys.stderr if echo else None,
            )
        except (PapermillExecutionError, DeadKernelError) as exc:
            failure = exc
        if not local.exists():
            raise NotebookError(f"{path.name} did not run: papermill wrote no executed notebook") from failure
        executed = local.read_text(encoding="utf-8")
        with contextlib.suppress(Exception):  # an unreadable notebook is stored as papermill wrote it
            executed = tidy_outputs(executed)
        executed = scrub(executed, secrets)
        storage.write_text(output, executed)
        if isinstance(failure, DeadKernelError):
            raise NotebookError(f"{path.name}: the kernel died ({_one_line(failure)}), most often for lack of memory: "
                                f"lower batch_size or image_size; the executed notebook is at {output}") from None
        if failure is not None:
            message = scrub(_describe_failure(path, executed, failure), secrets)
            raise NotebookError(f"{message}; the executed notebook is at {output}") from None
    return output


# ---------------------------------------------------------------------------------------------
# Tables the notebooks display


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Table:
    """A small table that shows as HTML in a notebook, as Markdown where that is wanted, and as
    aligned text in a terminal or in a notebook's text/plain output. A column of numbers is
    right-aligned, any other column left-aligned (JupyterLab's style right-aligns every cell, which
    leaves text ragged)."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    title: str = ""

    def numeric(self) -> list[bool]:
        """For each column, whether every cell of it is a number."""
        return [bool(self.rows) and all(_is_number(row[i]) for row in self.rows) for i in range(len(self.header))]

    def _repr_html_(self) -> str:
        styles = [' style="text-align: right; font-variant-numeric: tabular-nums"' if n else ' style="text-align: left"'
                  for n in self.numeric()]
        head = "".join(f"<th{style}>{html.escape(h)}</th>" for h, style in zip(self.header, styles, strict=True))
        body = "".join("<tr>" + "".join(f"<td{style}>{html.escape(c)}</td>" for c, style in zip(row, styles, strict=True))
                       + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def _repr_markdown_(self) -> str:
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "".join("---:|" if n else ":---|" for n in self.numeric()))
        lines.extend("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows)
        return "\n".join(lines)

    def __str__(self) -> str:
        widths = [max(len(r[i]) for r in (self.header, *self.rows)) for i in range(len(self.header))]
        numeric = self.numeric()
        lines = [self.title] if self.title else []
        for row in (self.header, *self.rows):
            cells = (c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True))
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    __repr__ = __str__


METRIC_MEANINGS = {
    "accuracy": "share of all images classified correctly",
    "sensitivity": "share of pneumonia images found (recall, true positive rate)",
    "specificity": "share of normal images called normal (true negative rate)",
    "precision": "share of images called pneumonia that are pneumonia",
    "f1": "harmonic mean of precision and sensitivity",
    "roc_auc": "chance a random pneumonia image scores above a random normal one (0.5 = guessing)",
    "pr_auc": "average precision over all thresholds (chance level = share of pneumonia images)",
    "brier": "mean squared gap between the probability and the truth (0 is perfect)",
    "ece": "expected calibration error: mean gap between probability and observed share, over 15 bins (0 is perfect)",
    "threshold": "probability of pneumonia above which an image is called pneumonia",
    "n_images": "images evaluated",
    "n_patients": "patients evaluated",
}


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _interval(bounds: Sequence[Any] | None) -> str:
    from xraylib.model_card import interval

    return interval(bounds)


def metrics_table(metrics: Mapping[str, Any], title: str = "") -> Table:
    """The headline metrics of `compute_metrics` / `evaluate_model`, with what each means, and their
    95% intervals when the metrics carry them (`ci95`)."""
    ci = metrics.get("ci95")
    names = [name for name in METRIC_MEANINGS if name in metrics]
    if not ci:
        return Table(("metric", "value", "meaning"), tuple((n, _format(metrics[n]), METRIC_MEANINGS[n]) for n in names), title)
    rows = tuple((n, _format(metrics[n]), _interval(ci[n]) if n in ci else "", METRIC_MEANINGS[n]) for n in names)
    return Table(("metric", "value", "95% interval", "meaning"), rows, title)


def operating_points_table(metrics: Mapping[str, Any]) -> Table:
    """Sensitivity and specificity at each operating point of an evaluation, with 95% intervals."""
    points = metrics.get("operating_points") or []
    rows = tuple((_format(p["target_sensitivity"]), _format(p["threshold"]), p["chosen_on"], _format(p.get("sensitivity")),
                  _interval(p["ci95"].get("sensitivity")), _format(p.get("specificity")), _interval(p["ci95"].get("specificity")))
                 for p in points)
    return Table(("target sensitivity", "threshold", "chosen on", "sensitivity", "95% interval", "specificity",
                  "95% interval"), rows, "operating points")


def subgroups_table(metrics: Mapping[str, Any]) -> Table:
    """Sensitivity per subgroup of the positive class (file names: bacteria, virus), with 95% intervals."""
    rows = tuple((name, str(g["n_images"]), str(g["n_patients"]), _format(g.get("sensitivity")), _interval(g.get("ci95")),
                  g.get("undefined", "")) for name, g in (metrics.get("subgroups") or {}).items())
    return Table(("subgroup", "images", "patients", "sensitivity", "95% interval", "note"), rows, "subgroups")


def comparison_table(comparison: Any) -> Table:
    """Each metric of model A and model B on the same images, A minus B, and the 95% interval of
    the difference (`compare.Comparison`)."""
    rows = tuple((d.metric, _format(d.a), _format(d.b), _format(d.difference), _interval(d.ci95)) for d in comparison.differences)
    return Table(("metric", "A", "B", "A - B", "95% interval of A - B"), rows, comparison.title())


def class_counts_table(splits: Mapping[str, Any]) -> Table:
    """Images per class for each split. A split is a `dataset.ImageIndex` (`counts()`) or anything
    with `labels` and `class_names` (`dataset.LoadedImages`, `evaluate.Evaluation`)."""
    counted: dict[str, dict[str, int]] = {}
    for split, data in splits.items():
        if hasattr(data, "counts"):
            counted[split] = dict(data.counts())
        else:
            labels = [int(x) for x in (data.labels.tolist() if hasattr(data.labels, "tolist") else data.labels)]
            counted[split] = {cls: labels.count(i) for i, cls in enumerate(data.class_names)}
    classes = list(dict.fromkeys(c for counts in counted.values() for c in counts))
    rows = tuple(
        (split, *(str(counts.get(c, 0)) for c in classes), str(sum(counts.values()))) for split, counts in counted.items()
    )
    return Table(("split", *classes, "total"), rows)


def common_folder(locations: Sequence[str]) -> str:
    """The deepest folder (local) or prefix (s3://bucket/...) that holds all of `locations`; "" when
    they share none (other buckets, or only the file system's root)."""
    folders = [location.split("/")[:-1] for location in locations]
    if not folders:
        return ""
    common: list[str] = []
    for parts in zip(*folders, strict=False):
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    # At least "s3:", "" and the bucket; "" (the root) and a folder; or one folder of a relative path.
    least = 3 if locations[0].startswith("s3://") else 2 if locations[0].startswith("/") else 1
    return "/".join(common) if len(common) >= least else ""


def predictions_table(predictions: Sequence[Any]) -> Table:
    """One row per `predict.Prediction`: the image, the class given, the probability of pneumonia.
    Images are named from the folder or prefix they all share, which the title gives."""
    folder = common_folder([p.image for p in predictions])
    rows = tuple((p.image.removeprefix(folder + "/") if folder else p.image, p.label, f"{p.probability:.4f}")
                 for p in predictions)
    return Table(("image", "predicted", "probability of pneumonia"), rows,
                 f"{len(rows)} image(s)" + (f" in {folder}" if folder else ""))


def settings_table(cfg: Any) -> Table:
    """The values of a `TrainConfig` (or a mapping), one per row."""
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return Table(("parameter", "value"), tuple((k, _format(v)) for k, v in values.items()))


__all__ = [
    "NotebookError",
    "Table",
    "class_counts_table",
    "comparison_table",
    "metrics_table",
    "notebook_path",
    "operating_points_table",
    "parse_parameters",
    "predictions_table",
    "run_notebook",
    "settings_table",
    "subgroups_table",
]
