"""Labels from a table: a CSV (local or S3) that says which image is positive, instead of class folders.

`index_images` is where training and evaluation get their `dataset.ImageIndex`: from the class
folders below `data` (`dataset.list_images`), or, given a `LabelTable`, from its rows. A row names
an image by its path below `data`, with or without the extension, or by its file name alone when
that is unique below `data` (NIH ChestX-ray14 keeps its images in images_001/images/ ...
images_012/images/ while its table names them `00000001_000.png`). A name that several files
share is not guessed: those rows are counted and left out, and the message asks for the path.

A row is positive when its label equals the positive text, or, for a multi-label cell such as
NIH's `Infiltration|Pneumonia`, lists it; case is ignored, and numbers compare as numbers (`1`
and `1.0`). Several rows for one image (RSNA has one per box) are one image, positive when any
row is. The patient column, when there is one, is the patient the split by patient keeps
together; else a DICOM's Patient ID (hashed, `dicom.patient_key`), else the file name.

Nothing is dropped silently: rows that name no image, names shared by several images, rows
without a label, images no row names and images whose rows disagree on the split are counted and
named in `ImageIndex.unmatched`, and the first line of the run says how many.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from xraylib import config, dataset, dicom, storage
from xraylib.errors import ConfigError, DatasetError

ROWS_WITHOUT_IMAGE = "row(s) name no image below the data location"
AMBIGUOUS_ROWS = "row(s) name a file name that several images share (write the path below the data location)"
ROWS_WITHOUT_LABEL = "row(s) have an empty label"
IMAGES_WITHOUT_ROW = "image(s) have no row in the table"
SPLIT_CONFLICTS = "image(s) whose rows disagree on the split"
OTHER_SPLIT_IMAGES = "image(s) of another split"


@dataclass(frozen=True)
class LabelTable:
    """Where the table is and how to read it; a column left None is the one of the layout its header
    matches (`config.LABEL_LAYOUTS`)."""

    location: str
    image_column: str | None = None
    label_column: str | None = None
    positive: str | None = None
    patient_column: str | None = None
    split_column: str | None = None


def label_table(labels: str | LabelTable | None, **columns: str | None) -> LabelTable | None:
    """A LabelTable from the options `config.LABEL_OPTIONS` name (`labels` is the location); None
    without a location, which means class folders."""
    if labels is None and any(value is not None for value in columns.values()):
        named = ", ".join("--" + name.replace("_", "-") for name, value in columns.items() if value is not None)
        raise ConfigError(f"{named} describe(s) a labels table: pass --labels LOCATION too (or leave them out)")
    if labels is None or isinstance(labels, LabelTable):
        return labels
    return LabelTable(str(labels), **columns)


@dataclass(frozen=True)
class _Columns:
    image: str
    label: str
    positive: str
    patient: str | None
    split: str | None
    layout: str | None


def _resolve_columns(table: LabelTable, header: Sequence[str]) -> _Columns:
    given = {f.name: getattr(table, f.name) for f in dataclasses.fields(table) if f.name != "location"}
    layout = next((name for name, columns in config.LABEL_LAYOUTS.items()
                   if all(columns[key] in header for key in ("image_column", "label_column"))
                   and given["image_column"] in (None, columns["image_column"])), None)
    chosen = {key: value if value is not None else config.LABEL_LAYOUTS.get(layout or "", {}).get(key)
              for key, value in given.items()}
    listed = ", ".join(repr(h) for h in header)
    for key in ("image_column", "label_column"):
        if chosen[key] is None:
            raise DatasetError(f"{table.location} matches no known layout ({', '.join(config.LABEL_LAYOUTS)}): "
                               f"pass --{key.replace('_', '-')} (its columns: {listed})")
    for key in ("image_column", "label_column", "patient_column", "split_column"):
        if chosen[key] is not None and chosen[key] not in header:
            raise DatasetError(f"{table.location} has no column {chosen[key]!r} (--{key.replace('_', '-')}); "
                               f"its columns: {listed}")
    if chosen["positive"] is None:
        raise DatasetError(f"say which label of {table.location}'s column {chosen['label_column']!r} is the positive "
                           "class: pass --positive TEXT")
    return _Columns(chosen["image_column"], chosen["label_column"], chosen["positive"], chosen["patient_column"],
                    chosen["split_column"], layout)


def read_table(location: str) -> tuple[list[str], Iterator[list[str]]]:
    """The header of the CSV at `location`, and its rows as they are read (cells stripped): a caller
    keeps only the cells it needs, not NIH's 112,120 rows of 11 cells."""
    raw = storage.read_bytes(location)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{location} is not a UTF-8 text table: save the labels as CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as exc:
        raise DatasetError(f"{location} cannot be read as CSV ({exc}): check its format") from None
    if not any(header):
        raise DatasetError(f"{location} is empty: it should be a CSV with a header row")

    def rows() -> Iterator[list[str]]:
        try:
            for row in reader:
                yield [cell.strip() for cell in row]
        except csv.Error as exc:
            raise DatasetError(f"{location} cannot be read as CSV (line {reader.line_num}: {exc}): check its format") from None

    return header, rows()


def is_positive(cell: str, positive: str) -> bool:
    """Whether a label cell says `positive`: equal to it, or one of the findings of a multi-label
    cell (`config.LABEL_SEPARATOR`), case ignored, numbers compared as numbers."""
    def same(a: str, b: str) -> bool:
        try:
            return float(a) == float(b)
        except ValueError:
            return a.casefold() == b.casefold()

    return any(same(part.strip(), positive.strip()) for part in cell.split(config.LABEL_SEPARATOR))


def class_names(columns: _Columns) -> tuple[str, str]:
    """(negative, positive): for the known layouts, NO PNEUMONIA and PNEUMONIA; else the positive
    text (or `column=text` for a number) and NOT that."""
    if columns.layout is not None:
        return ("NO PNEUMONIA", "PNEUMONIA")
    try:
        float(columns.positive)
        positive = f"{columns.label}={columns.positive}"
    except ValueError:
        positive = columns.positive.upper()
    return (f"NOT {positive}", positive)


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return path[: len(path) - len(name)] + (name.rsplit(".", 1)[0] if "." in name else name)


class _Finder:
    """Finds the object a row's image cell names: its path, its path without the extension, its file
    name, its file name without the extension, in that order; None when there is none, the list of
    them when several share the name."""

    def __init__(self, images: Sequence[storage.ObjectInfo]) -> None:
        self.lookups: list[dict[str, list[storage.ObjectInfo]]] = [defaultdict(list) for _ in range(4)]
        for obj in images:
            name = obj.relpath.rsplit("/", 1)[-1]
            for lookup, key in zip(self.lookups, (obj.relpath, _stem(obj.relpath), name, _stem(name)), strict=True):
                lookup[key].append(obj)

    def find(self, cell: str) -> storage.ObjectInfo | list[storage.ObjectInfo] | None:
        value = cell.replace("\\", "/").strip().removeprefix("./").strip("/")
        if not value:
            return None
        name = value.rsplit("/", 1)[-1]
        for lookup, key in zip(self.lookups, (value, _stem(value), name, _stem(name)), strict=True):
            found = lookup.get(key, [])
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                return found
        return None


@dataclass
class _Entry:
    obj: storage.ObjectInfo
    positive: bool = False
    patient: str | None = None
    splits: set[str] = dataclasses.field(default_factory=set)


def list_labelled_images(data: str, table: LabelTable, split: str | None = None) -> dataset.ImageIndex:
    """Index the images below `data` that `table` labels. With `split` ('train', 'test') and a split
    column, only the rows of that split (`config.LABEL_SPLIT_VALUES`); without a split column, every row."""
    header, rows = read_table(table.location)
    columns = _resolve_columns(table, header)
    objects = [o for o in storage.list_objects(data) if o.location != table.location]
    if not objects:
        raise DatasetError(f"no files found in {data}: check the location (and that the upload finished)")
    table_name = table.location.rstrip("/").rsplit("/", 1)[-1]
    candidates = [o for o in objects if dataset.is_image_name(o.relpath) or dicom.has_no_extension(o.relpath)]
    finder = _Finder(candidates)

    unmatched: dict[str, list[str]] = {key: [] for key in (ROWS_WITHOUT_IMAGE, AMBIGUOUS_ROWS, ROWS_WITHOUT_LABEL)}
    named: set[str] = set()  # every image some row names, labelled or not
    found: dict[str, _Entry] = {}
    where_is = {name: header.index(name) for name in {columns.image, columns.label, columns.patient, columns.split} if name}

    def cell_of(row: list[str], name: str | None) -> str:
        return row[where_is[name]] if name and where_is[name] < len(row) else ""

    for line, row in enumerate(rows, start=2):
        if not any(row):
            continue  # a blank line
        cell = cell_of(row, columns.image)
        match = finder.find(cell)
        where = f"{table_name} line {line}: {cell or '(empty)'}"
        if match is None:
            unmatched[ROWS_WITHOUT_IMAGE].append(where)
            continue
        if isinstance(match, list):
            unmatched[AMBIGUOUS_ROWS].append(f"{where} ({len(match)} files)")
            continue
        named.add(match.location)
        label = cell_of(row, columns.label)
        if not label:
            unmatched[ROWS_WITHOUT_LABEL].append(where)
            continue
        entry = found.setdefault(match.location, _Entry(match))
        entry.positive = entry.positive or is_positive(label, columns.positive)
        if entry.patient is None and cell_of(row, columns.patient):
            entry.patient = cell_of(row, columns.patient)
        if columns.split:
            entry.splits.add(cell_of(row, columns.split).casefold())

    # A file with no extension that no row names is an image only if it is DICOM: look before counting it.
    no_row = [o for o in candidates if o.location not in named]
    headers = dataset.dicom_headers([o for o in no_row if dicom.has_no_extension(o.relpath)])
    images_without_row = [o.relpath for o in no_row if headers.get(o.location, (True, None))[0]]
    candidate_locations = {o.location for o in candidates}
    ignored = [o.relpath for o in objects
               if o.location not in candidate_locations or not headers.get(o.location, (True, None))[0]]

    conflicts, other_split, chosen = [], [], []
    wanted = {v.casefold() for v in config.LABEL_SPLIT_VALUES.get(split or "", ())}
    for entry in found.values():
        if columns.split and len(entry.splits) > 1:
            conflicts.append(f"{entry.obj.relpath} ({', '.join(sorted(entry.splits))})")
        elif columns.split and split is not None and not entry.splits & wanted:
            other_split.append(entry.obj.relpath)
        else:
            chosen.append(entry)
    if not chosen:
        which = f" of the {split} split ({', '.join(sorted(wanted))} in {columns.split!r})" if columns.split and split else ""
        raise DatasetError(f"no image below {data} has a row{which} in {table.location}: check that --data is the folder "
                           f"the table's {columns.image!r} column is relative to")

    dicom_patients = dataset.dicom_headers([e.obj for e in chosen if e.patient is None])
    records = tuple(
        dataset.ImageRecord(obj=e.obj, label=int(e.positive),
                            patient=e.patient or dicom_patients.get(e.obj.location, (False, None))[1]
                            or dataset.patient_id(e.obj.relpath))
        for e in sorted(chosen, key=lambda e: e.obj.relpath))
    report = [*unmatched.items(), (IMAGES_WITHOUT_ROW, images_without_row), (SPLIT_CONFLICTS, conflicts),
              (OTHER_SPLIT_IMAGES, other_split)]
    return dataset.ImageIndex(root=data, class_names=class_names(columns), records=records, ignored=tuple(ignored),
                              unmatched=tuple((what, tuple(items)) for what, items in report if items))


def index_images(data: str, split: str | None = None, labels: LabelTable | None = None) -> dataset.ImageIndex:
    """The images of `data` and their labels: from `labels` when given, else from the class folders
    (`dataset.list_images`, reading the `split/` folder of a dataset root)."""
    if labels is None:
        return dataset.list_images(data, split=split)
    return list_labelled_images(data, labels, split=split)


__all__ = ["LabelTable", "index_images", "is_positive", "label_table", "list_labelled_images", "read_table"]
