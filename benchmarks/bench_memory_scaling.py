"""Peak resident memory of a training run over 20,000 images against the same run over 2,000, side by
side: the decoded pixels live in a file in the cache and are read a batch at a time, so the run's
memory should not grow with the images (in memory, 20,000 x 160 x 160 pixels are 512 MB; 2,000 are 51 MB).

Each size runs in a fresh process (its own peak, `ru_maxrss`) and does what a training run does with
its data: index the images, split them by patient, decode them all into the decoded-image file,
then train the ResNet50 (from scratch) for a limited number of steps, `--steps` (a whole epoch over
20,000 images at 160 px takes hours on a small CPU; the steps are what the network's memory needs),
then read every batch of an epoch, shuffled and augmented as training reads them (no network: it is
the reading that would grow the memory), and score 8 batches of validation images as validation does.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/bench_memory_scaling.py [--sizes 2000 20000] [--image-size 160]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_images(root: Path, count: int, side: int) -> None:
    """`count` small JPEGs in `root/train/<CLASS>/`, half each class, two per patient: 64 generated
    pictures, each written under many names (the run decodes every file all the same)."""
    import numpy as np

    from xraylib import synthetic

    rng = np.random.default_rng(0)
    pictures = {cls: [synthetic.encode(synthetic.chest_image(rng, cls == "PNEUMONIA", side, side)) for _ in range(32)]
                for cls in ("NORMAL", "PNEUMONIA")}
    for cls, encoded in pictures.items():
        folder = root / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count // 2):
            name = f"IM-{i // 2:05d}-{i % 2 + 1:04d}.jpeg" if cls == "NORMAL" else f"person{i // 2}_bacteria_{i}.jpeg"
            (folder / name).write_bytes(encoded[i % len(encoded)])


def measured_run(data: str, image_size: int, batch_size: int, steps: int) -> dict[str, float]:
    """The child's workload (see the module's docstring); returns its figures."""
    import torch

    from xraylib import config, dataset
    from xraylib.evaluate import predict_logits
    from xraylib.model import build_resnet50, inference_network, resolve_device
    from xraylib.training import load_data, set_up_training, train_one_epoch

    torch.set_num_threads(1)
    started = time.perf_counter()
    data_ = load_data(data, image_size=image_size, val_fraction=0.15, seed=0, skip_bad=False, equalize="histogram",
                      log=lambda _: None, progress=False)
    loaded_s = time.perf_counter() - started
    device = resolve_device("cpu")
    network = build_resnet50("none")
    optimizer, amp_dtype, _ = set_up_training(network, device=device, precision="fp32", lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    first_rows = dataset.take_rows(data_.train, range(min(len(data_.train), steps * batch_size)))
    train_one_epoch(network, optimizer, scheduler, torch.nn.CrossEntropyLoss(), first_rows, batch_size=batch_size,
                    device=device, amp_dtype=amp_dtype, augment="acquisition", generator=generator)
    read = 0
    for pixels, _, _ in dataset.iter_batches(data_.train, batch_size, shuffle=True, generator=generator):
        x = dataset.to_model_input(dataset.augment_batch(pixels, generator, "acquisition"), config.IMAGENET_MEAN,
                                   config.IMAGENET_STD)
        read += int(x.shape[0])
    scored = dataset.take_rows(data_.val, range(min(len(data_.val), 8 * batch_size)))
    predict_logits(inference_network(network), scored.pixels, mean=config.IMAGENET_MEAN, std=config.IMAGENET_STD,
                   device=device)
    return {"images": len(data_.train) + len(data_.val), "read": read, "load_s": loaded_s,
            "total_s": time.perf_counter() - started,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000])
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="training steps of the network (default 10)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measured_run(args.child, args.image_size, args.batch_size, args.steps)))
        return
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.sizes:
            root = Path(tmp) / f"images-{count}"
            write_images(root, count, side=args.image_size)
            env = {**os.environ, "XRAYLIB_CACHE_DIR": str(Path(tmp) / f"cache-{count}")}
            command = [sys.executable, __file__, "--child", str(root), "--image-size", str(args.image_size),
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            result = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
            figures[count] = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{count} images: {json.dumps(figures[count])}", flush=True)
    small, large = (figures[n] for n in args.sizes)
    pixels_mb = [n * args.image_size**2 / 1e6 for n in args.sizes]
    print(f"\npeak resident memory of a training run at {args.image_size} px, batch {args.batch_size}, {args.steps} "
          f"training steps + one full shuffled, augmented read of the training images + 8 validation batches, on {cpu_name()}:")
    print(f"  {args.sizes[0]:>6} images ({pixels_mb[0]:.0f} MB of pixels): {small['peak_mb']:.0f} MB  "
          f"(decoding {small['load_s']:.0f} s, run {small['total_s']:.0f} s)")
    print(f"  {args.sizes[1]:>6} images ({pixels_mb[1]:.0f} MB of pixels): {large['peak_mb']:.0f} MB  "
          f"(decoding {large['load_s']:.0f} s, run {large['total_s']:.0f} s)")
    print(f"  ratio {large['peak_mb'] / small['peak_mb']:.3f}; difference {large['peak_mb'] - small['peak_mb']:+.0f} MB "
          f"against {pixels_mb[1] - pixels_mb[0]:.0f} MB more pixels")


if __name__ == "__main__":
    main()
