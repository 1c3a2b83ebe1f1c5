"""Inference speed: `xraylib evaluate` against a plain fp32 loop, and `xraylib predict` cold start.

    python benchmarks/bench_inference.py [--images 624] [--image-size 224] [--repeats 2]

Both sides run as fresh processes on the same real images (half NORMAL, half PNEUMONIA) with
the same model file, so imports and model loading count for both. The plain loop is
torchvision's ImageFolder with PIL transforms, a DataLoader with one worker, fp32 and
`torch.no_grad()`.
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


def plain_loop(model_path: str, folder: str, image_size: int) -> None:
    """What a user writes by hand to score a folder of images with a saved ResNet50."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, models, transforms

    state = torch.load(model_path, weights_only=True)["state_dict"]
    model = models.resnet50(num_classes=2)
    model.load_state_dict(state)
    model.eval()
    tf = transforms.Compose([
        transforms.Grayscale(num_output_channels=3),
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = DataLoader(datasets.ImageFolder(folder, transform=tf), batch_size=32, num_workers=1)
    probabilities = []
    with torch.no_grad():
        for x, _ in loader:
            probabilities.append(torch.softmax(model(x), 1)[:, 1])
    print(f"plain loop scored {len(torch.cat(probabilities))} images")


def run(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=624)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--plain", nargs=3, metavar=("MODEL", "FOLDER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_loop(args.plain[0], args.plain[1], int(args.plain[2]))
        return

    from xraylib.model import build_resnet50, model_metadata, save_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "test"
        for cls in ("NORMAL", "PNEUMONIA"):
            (folder / cls).mkdir(parents=True)
            for path in sorted((real_train_folder() / cls).glob("*.jpeg"))[-(args.images // 2):]:
                (folder / cls / path.name).symlink_to(path)
        model = str(Path(tmp) / "model.pt")
        save_model(model, build_resnet50("none"),
                   model_metadata(class_names=("NORMAL", "PNEUMONIA"), image_size=args.image_size, threshold=0.5))
        cache = {"XRAYLIB_CACHE_DIR": str(Path(tmp) / "cache")}
        # Alternated and repeated, best of each: this shared machine's speed drifts by 10-20%.
        plains, mines = [], []
        for attempt in range(args.repeats):
            plains.append(run([sys.executable, __file__, "--plain", model, str(folder), str(args.image_size)]))
            print(f"plain fp32 loop: {plains[-1]:.1f}s", flush=True)
            fresh = {"XRAYLIB_CACHE_DIR": str(Path(tmp) / f"cache-{attempt}")}
            mines.append(run([sys.executable, "-m", "xraylib", "evaluate", "--model", model, "--data", str(folder),
                              "--out", str(Path(tmp) / "eval")], fresh))
            print(f"xraylib evaluate (cold cache, writes all its outputs): {mines[-1]:.1f}s", flush=True)
        plain, mine = min(plains), min(mines)
        one = sorted((folder / "NORMAL").iterdir())[0]
        predict = [run([sys.executable, "-m", "xraylib", "predict", "--model", model, str(one)], cache) for _ in range(3)]
        runs = ", ".join(f"{p:.2f}" for p in predict)
        print(f"xraylib predict, one image, cold process: {min(predict):.2f}s best of 3 ({runs})")
        bare = min(run([sys.executable, "-c", "import torch"]) for _ in range(3))
        print(f"  the floor on this machine now, a process that only imports torch: {bare:.2f}s best of 3")
    print(f"evaluate speed-up over the plain loop: {plain / mine:.2f}x on {args.images} images at {args.image_size}px "
          f"(best of {args.repeats}: {plain:.1f}s against {mine:.1f}s)")


if __name__ == "__main__":
    main()
