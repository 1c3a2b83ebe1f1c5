"""Helpers the benchmark scripts share: the real images, a patient-level hold-out, timing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for tests.realdata

from tests.realdata import NOT_FOUND, REAL_DATA
from xraylib import dataset


def real_train_folder() -> Path:
    if not REAL_DATA.is_dir():
        raise SystemExit(NOT_FOUND)
    return REAL_DATA


def make_holdout_root(source: Path, dest: Path, holdout_fraction: float = 0.15, seed: int = 1234) -> tuple[int, int]:
    """Lay out `dest/train/<CLASS>/` and `dest/test/<CLASS>/` as symlinks to `source`'s images,
    split by patient, so that no patient of the held-out `test/` is ever trained on."""
    index = dataset.list_images(str(source))
    train, test = dataset.split_by_patient(index, holdout_fraction, seed)
    for split, part in (("train", train), ("test", test)):
        for record in part.records:
            link = dest / split / record.obj.relpath
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(record.obj.location)
    return len(train), len(test)


@contextmanager
def timed(label: str, results: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    results[label] = time.perf_counter() - start
    print(f"{label}: {results[label]:.1f}s", flush=True)
