"""Classifying unlabelled images with a trained model, from one image to a prefix of any size.

- `predict_images`: a list of `Prediction`s, for a notebook or a few images; `stream_predictions`
  the same one at a time, for the command line's standard output.
- `iter_predictions`: the same in chunks of `config.PREDICT_CHUNK_IMAGES`, each fetched, decoded
  and scored before the next: memory holds one chunk's pixels, however many images there are.
- `predict_to_csv`: writes the predictions to a CSV (local or S3) as they come and, run again,
  scores only the images the CSV lacks. Under torchrun every rank scores its share of each chunk
  and rank 0 writes the one CSV.

A CSV on S3 grows in a local file (in the cache folder) that is uploaded whole, streamed from
disk, every `config.PREDICT_UPLOAD_EVERY_S` and at the end; a re-run starts from the uploaded CSV.
"""

from __future__ import annotations

import csv
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xraylib import config, dataset, distributed, storage
from xraylib.errors import DatasetError, LocationError
from xraylib.model import TrainedModel, inference_dtype, inference_network, load_model

CSV_COLUMNS = ("image", "label", "probability")


@dataclass(frozen=True)
class Prediction:
    image: str
    label: str
    probability: float  # of the positive class

    def __str__(self) -> str:
        return f"{self.image}\t{self.label}\t{self.probability:.4f}"


def as_locations(images: str | Path | Sequence[str | Path]) -> list[str]:
    """One location or several, as a list of strings."""
    locations = [images] if isinstance(images, str | Path) else images  # one string is one location, not its letters
    return [str(i) for i in locations]


def decode_for_model(trained: TrainedModel, names: Sequence[str], *,
                     skip_bad: bool) -> tuple[Any, list[str], list[tuple[str, str]]]:
    """Fetch and decode unlabelled images as `trained` reads them (its size and contrast
    normalization): their uint8 pixels [N, H, W] (None when not one decoded), the names decoded,
    and (name, reason) of those skipped."""
    import torch

    kept, skipped = dataset.decode_each(
        lambda location: dataset.equalize(dataset.decode_image(storage.read_bytes(location), trained.image_size, location),
                                          trained.equalize),
        names, skip_bad=skip_bad)
    if not kept:
        return None, [], skipped
    return torch.from_numpy(np.stack([r for _, r in kept])), [name for name, _ in kept], skipped


def _score(trained: TrainedModel, network: Any, amp_dtype: Any, names: Sequence[str], *,
           skip_bad: bool) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Fetch, decode and score `names`: their predictions, and (name, reason) of those skipped."""
    from xraylib.evaluate import predict_probabilities

    pixels, kept, skipped = decode_for_model(trained, names, skip_bad=skip_bad)
    if pixels is None:
        return [], skipped
    probs = predict_probabilities(network, pixels, mean=trained.mean, std=trained.std, temperature=trained.temperature,
                                  bias=trained.calibration_bias, amp_dtype=amp_dtype)
    return ([Prediction(name, trained.class_names[int(p >= trained.threshold)], float(p))
             for name, p in zip(kept, probs.tolist(), strict=True)], skipped)


def iter_predictions(trained: TrainedModel, names: Sequence[str], *, skip_bad: bool = False, precision: str = "auto",
                     log: Callable[[str], None] = print, topology: distributed.Topology = distributed.SINGLE,
                     chunk: int = config.PREDICT_CHUNK_IMAGES) -> Iterator[list[Prediction]]:
    """The predictions of `names`, chunk by chunk, in their order; bad images are reported via `log`
    as they come (and raise ImageDecodeError unless `skip_bad`). Under torchrun (`topology`) every
    rank calls this with the same `names` and scores every W-th image of each chunk of W x `chunk`;
    rank 0 gets each chunk's predictions, the other ranks empty lists. Raises DatasetError when not
    one image could be decoded."""
    # Folding the batch norms costs a fraction of a second: worth it for a batch, not for one image.
    network = inference_network(trained.network) if len(names) >= 16 else trained.network
    amp_dtype = inference_dtype(trained, next(trained.network.parameters()).device, precision)
    step = chunk * topology.world_size
    scored = 0
    for start in range(0, len(names), step):
        block = names[start:start + step]
        mine = block[topology.rank::topology.world_size]
        predictions, skipped = _score(trained, network, amp_dtype, mine, skip_bad=skip_bad)
        gathered = distributed.gather_objects((predictions, skipped), topology)
        if gathered is None:
            yield []
            continue
        # Rank r scored block[r::W]: put the chunk back in the order of `names`.
        position = {name: i for i, name in enumerate(block)}
        predictions = sorted((p for part, _ in gathered for p in part), key=lambda p: position[p.image])
        skipped = sorted((s for _, part in gathered for s in part), key=lambda s: position[s[0]])
        dataset.report_skipped(skipped, log)
        scored += len(predictions)
        yield predictions
    if names and not scored and topology.is_main:
        raise DatasetError(f"none of the {len(names)} images could be decoded: the reasons are listed above")


def stream_predictions(model: str | TrainedModel, images: str | Path | Sequence[str | Path], *, skip_bad: bool = False,
                       precision: str = "auto", device: str | None = None,
                       log: Callable[[str], None] = print) -> Iterator[Prediction]:
    """`predict_images` one prediction at a time, scored a chunk at a time, in bounded memory; a model
    file is loaded onto `device` (the CPU when None)."""
    names, ignored = dataset.find_images(as_locations(images))
    if ignored:
        log(f"ignored {len(ignored)} non-image file(s)")
    if not names:
        return  # nothing asked for (the test notebook's default)
    trained = load_model(model, device=device or "cpu") if isinstance(model, str) else model
    for part in iter_predictions(trained, names, skip_bad=skip_bad, precision=precision, log=log):
        yield from part


def predict_images(model: str | TrainedModel, images: str | Path | Sequence[str | Path], *, skip_bad: bool = False,
                   precision: str = "auto", log: Callable[[str], None] = print) -> list[Prediction]:
    """Classify images, local or S3: `images` is one location or several, each an image file, or a
    folder or prefix that stands for every image below it. Probability is of the positive class. A
    bad image raises ImageDecodeError naming it, unless `skip_bad`, which leaves it out and reports
    it via `log`. `precision` as in `evaluate.evaluate_model`."""
    return list(stream_predictions(model, images, skip_bad=skip_bad, precision=precision, log=log))


@dataclass(frozen=True)
class CsvReport:
    """What `predict_to_csv` did: images scored now, found in the CSV already, skipped as bad."""

    location: str
    scored: int
    already: int
    skipped: int

    def __str__(self) -> str:
        skipped = f", skipped {self.skipped} bad image(s)" if self.skipped else ""
        return f"scored {self.scored} image(s), {self.already} already in {self.location}{skipped}"


def _spool_path(location: str) -> Path:
    """The local file where a CSV bound for S3 grows."""
    digest = hashlib.sha256(location.encode("utf-8")).hexdigest()[:32]
    return config.default_cache_dir() / "predict" / f"{digest}.csv"


def _open_csv(path: Path, shown_as: str) -> tuple[set[str], Any]:
    """The images already in the CSV at `path` and the file open to append rows. A last line cut
    short (the run before was killed while writing it) is dropped, and scored again."""
    done: set[str] = set()
    if path.exists() and path.stat().st_size:
        with path.open("r+b") as f:
            data_end = f.seek(0, 2)
            # A partial last line ends without a newline: cut back to the last whole line.
            f.seek(max(0, data_end - 65536))
            tail = f.read()
            cut = data_end - (len(tail) - tail.rfind(b"\n") - 1) if b"\n" in tail else 0
            if cut != data_end:
                f.truncate(cut)
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is not None and tuple(header) != CSV_COLUMNS:
                raise LocationError(f"{shown_as} is not a predictions CSV (its header is {','.join(header)!r}, expected "
                                    f"{','.join(CSV_COLUMNS)!r}): choose another --csv, or delete it")
            done.update(row[0] for row in reader if row)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists() or path.stat().st_size == 0
    handle = path.open("a", newline="", encoding="utf-8")
    if fresh:
        csv.writer(handle).writerow(CSV_COLUMNS)
        handle.flush()
    return done, handle


def predict_to_csv(model: str | TrainedModel, images: str | Path | Sequence[str | Path], csv_location: str, *,
                   skip_bad: bool = False, precision: str = "auto", device: str = "auto",
                   log: Callable[[str], None] = print) -> CsvReport:
    """Classify every image `images` names (as `predict_images` reads it) into the CSV at
    `csv_location` (local or S3; columns image, label, probability), chunk by chunk, in bounded
    memory. Images already in the CSV are not scored again, so a run that was stopped continues
    where it stopped. Started by torchrun, every rank scores its share and rank 0 writes (and logs)."""
    with distributed.process_group(device) as (topology, torch_device):
        log = log if topology.is_main else (lambda line: None)
        remote = storage.is_remote(csv_location)
        path = _spool_path(csv_location) if remote else Path(csv_location).expanduser()
        handle = None
        todo: list[str] = []
        already = 0
        if topology.is_main:
            names, ignored = dataset.find_images(as_locations(images))
            if ignored:
                log(f"ignored {len(ignored)} non-image file(s)")
            if remote:
                path.unlink(missing_ok=True)
                if storage.exists(csv_location):
                    storage.download_file(csv_location, path)
            done, handle = _open_csv(path, csv_location)
            todo = [name for name in names if name not in done]
            already = len(names) - len(todo)
            log(f"{len(names)} image(s): {already} already in {csv_location}, {len(todo)} to score")
        todo = distributed.broadcast_object(todo, topology)
        trained = load_model(model, device=str(torch_device)) if isinstance(model, str) else model
        scored = 0
        uploaded_at = time.monotonic()
        try:
            for predictions in iter_predictions(trained, todo, skip_bad=skip_bad, precision=precision, log=log,
                                                topology=topology):
                if handle is None:
                    continue
                csv.writer(handle).writerows((p.image, p.label, f"{p.probability:.6f}") for p in predictions)
                handle.flush()
                scored += len(predictions)
                if remote and time.monotonic() - uploaded_at > config.PREDICT_UPLOAD_EVERY_S:
                    storage.upload_file(path, csv_location)
                    uploaded_at = time.monotonic()
        finally:
            if handle is not None:
                handle.close()
                if remote and (scored or not storage.exists(csv_location)):
                    storage.upload_file(path, csv_location)  # what was scored is kept, even when a later chunk failed
        report = CsvReport(csv_location, scored, already, len(todo) - scored)
        log(str(report))
        return report
