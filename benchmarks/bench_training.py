"""Training speed: `xraylib train` against the plain recipe a user writes by hand, side by side.

    python benchmarks/bench_training.py [--per-class 512] [--epochs 2] [--image-size 128] [--precision P ...]

Both train a ResNet50 from scratch on the same real images (half NORMAL, half PNEUMONIA) with
batch 32 and AdamW. The plain recipe is torchvision's ImageFolder with PIL transforms, one loader
worker, fp32, a class-weighted loss and a 10% validation pass per epoch. xraylib runs as the
command a user types, with no other flags, on a cold cache (with `--precision`, once per value
given, each on a cold cache). Prints the wall times, images per second, validation accuracy of
each, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import real_train_folder

# Each written before its run, keyed by the --precision values it was written for.
PRECISION_PREDICTIONS = {
    # 2026-11-30 (sixth session), when `--precision auto` without a time budget began to race bf16
    # against fp32 on CPUs that claim native bf16.
    frozenset({"auto", "bf16"}): (
        "on the Intel Xeon (family 6 model 207, AVX-512 BF16, no AMX) auto now trains in fp32, which the race finds "
        "faster, where it took bf16 before: auto's run 1.15-1.35x faster than the bf16 run (a bare step is 1.3x "
        "faster; decoding, validation, files and the race itself are not), and faster than the plain fp32 recipe by "
        "more than the bf16 run is"),
    # 2026-11-30 (seventh session), on an AMD EPYC (family 25 model 17, Zen 4), whose races at 96 px
    # had found bf16 1.4-1.8x faster than fp32.
    frozenset({"auto", "fp32"}): (
        "on the AMD EPYC Zen 4 (AVX-512 BF16) auto's race picks bf16: auto's run 1.3-1.7x faster than the fp32 run "
        "(a bare step is 1.4-1.8x faster; decoding, validation, files and the race are not), and at least 1.6x "
        "faster than the plain fp32 recipe, the target the AVX2-only EPYC and the Xeon miss"),
}


def make_subset(source: Path, dest: Path, per_class: int) -> None:
    for cls in ("NORMAL", "PNEUMONIA"):
        (dest / cls).mkdir(parents=True)
        for path in sorted((source / cls).glob("*.jpeg"))[:per_class]:
            (dest / cls / path.name).symlink_to(path)


def plain_recipe(folder: Path, epochs: int, image_size: int, batch_size: int) -> dict[str, float]:
    """What a user writes by hand from the torchvision tutorials."""
    import torch
    from torch.utils.data import DataLoader, random_split
    from torchvision import datasets, models, transforms

    torch.manual_seed(0)
    started = time.perf_counter()
    tf = transforms.Compose([
        transforms.Grayscale(num_output_channels=3),
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    data = datasets.ImageFolder(str(folder), transform=tf)
    n_val = len(data) // 10
    train_set, val_set = random_split(data, [len(data) - n_val, n_val], generator=torch.Generator().manual_seed(0))
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=1)
    val_loader = DataLoader(val_set, batch_size=batch_size, num_workers=1)
    model = models.resnet50(num_classes=2)
    counts = torch.bincount(torch.tensor(data.targets), minlength=2).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accuracy = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((model(x).argmax(1) == y).sum())
        accuracy = correct / n_val
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_per_second": epochs * (len(data) - n_val) / seconds, "val_accuracy": accuracy}


def xraylib_command(folder: Path, out: Path, cache: Path, epochs: int, image_size: int, batch_size: int,
                    precision: str | None = None) -> dict[str, float]:
    import json

    command = [sys.executable, "-m", "xraylib", "train", "--data", str(folder), "--out", str(out), "--epochs", str(epochs),
               "--image-size", str(image_size), "--batch-size", str(batch_size), "--weights", "none",
               *(["--precision", precision] if precision else [])]
    print("$ " + " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "XRAYLIB_CACHE_DIR": str(cache)})
    seconds = time.perf_counter() - started
    history = json.loads((out / "history.json").read_text())
    model_meta = __import__("xraylib.model", fromlist=["load_model"]).load_model(str(out)).metadata
    n_train = model_meta["data_counts"]["train"]
    return {"seconds": seconds, "images_per_second": epochs * n_train / seconds,
            "val_accuracy": history[-1]["val_accuracy"], "val_roc_auc": history[-1]["val_roc_auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", action="append", default=[],
                        help="run xraylib train with this --precision (repeat to compare several); default: the flag "
                             "left out, as a user types it")
    args = parser.parse_args()
    predicted = PRECISION_PREDICTIONS.get(frozenset(args.precision))
    if predicted:
        print(f"predicted: {predicted}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "subset"
        make_subset(real_train_folder(), folder, args.per_class)
        mine = {}
        for i, precision in enumerate(args.precision or [None]):
            mine[precision or "default"] = run = xraylib_command(
                folder, Path(tmp) / f"out{i}", Path(tmp) / f"cache{i}", args.epochs, args.image_size, args.batch_size,
                precision)
            print(f"xraylib train{f' --precision {precision}' if precision else ''}: {run['seconds']:.1f}s, "
                  f"{run['images_per_second']:.1f} img/s, val accuracy {run['val_accuracy']:.3f}, "
                  f"val ROC AUC {run['val_roc_auc']:.3f}", flush=True)
        plain = plain_recipe(folder, args.epochs, args.image_size, args.batch_size)
        print(f"plain recipe:  {plain['seconds']:.1f}s, {plain['images_per_second']:.1f} img/s, "
              f"val accuracy {plain['val_accuracy']:.3f}", flush=True)
    for name, run in mine.items():
        print(f"speed-up of xraylib ({name}) over the plain recipe (its wall time / xraylib's): "
              f"{plain['seconds'] / run['seconds']:.2f}x")
    if len(mine) > 1:
        first, *others = mine
        for name in others:
            print(f"{first} against {name}: {mine[name]['seconds'] / mine[first]['seconds']:.2f}x faster")


if __name__ == "__main__":
    main()
