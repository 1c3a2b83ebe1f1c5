"""Training throughput on this machine's accelerator (or CPU): xraylib's own epoch loop, with its
autocast precision, channels-last memory, fused AdamW and augmentation on the device, against a
plain fp32 loop (contiguous memory, default AdamW, no augmentation), side by side in one run.

    python benchmarks/bench_device_training.py [--image-size 224] [--batch-size 64] [--steps 30]

Images are random pixels held in memory, so this measures the training step alone: no decoding,
no storage. Each side runs a short warm-up (cuDNN's kernel search, the allocator) before it is
timed. Prints images per second of each and the ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from xraylib import config, dataset, storage
from xraylib.model import build_resnet50, resolve_device
from xraylib.training import set_up_training, train_one_epoch


def random_images(n: int, image_size: int, seed: int) -> dataset.LoadedImages:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    records = tuple(
        dataset.ImageRecord(storage.ObjectInfo(f"memory/{i}.png", f"{i}.png", 0, "0"), int(label), str(i))
        for i, label in enumerate(labels.tolist())
    )
    return dataset.LoadedImages(pixels, labels, records, ("NORMAL", "PNEUMONIA"))


def images_per_second(epoch: Callable[[dataset.LoadedImages], None], data: dataset.LoadedImages,
                      warmup: dataset.LoadedImages, device: torch.device) -> float:
    """`epoch` over `warmup` untimed (cuDNN's kernel search, the allocator), then over `data` timed."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    epoch(warmup)
    synchronize()
    started = time.perf_counter()
    epoch(data)
    synchronize()
    return len(data) / (time.perf_counter() - started)


def xraylib_loop(data: dataset.LoadedImages, warmup: dataset.LoadedImages, *, batch_size: int,
                 device: torch.device, precision: str) -> float:
    """Images per second of `training.train_one_epoch`, set up as `training.train` sets it up."""
    network = build_resnet50("none")
    optimizer, amp_dtype, scaler = set_up_training(network, device=device, precision=precision, lr=1e-4,
                                                   weight_decay=config.TrainConfig.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)
    print(f"xraylib loop: {device.type}, autocast {amp_dtype}, channels-last, fused AdamW, augmentation on", flush=True)

    def epoch(part: dataset.LoadedImages) -> None:
        train_one_epoch(network, optimizer, scheduler, torch.nn.CrossEntropyLoss(), part, batch_size=batch_size,
                        device=device, amp_dtype=amp_dtype, augment=config.TrainConfig.augment, generator=generator,
                        scaler=scaler)

    return images_per_second(epoch, data, warmup, device)


def plain_loop(data: dataset.LoadedImages, warmup: dataset.LoadedImages, *, batch_size: int,
               device: torch.device) -> float:
    """Images per second of the loop a user writes by hand: fp32, default memory format and AdamW."""
    torch.backends.cudnn.benchmark = False  # PyTorch's default, which the other side changed
    network = build_resnet50("none").to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(part: dataset.LoadedImages) -> None:
        network.train()
        for pixels, labels, _ in dataset.iter_batches(part, batch_size, shuffle=True):
            x = pixels.to(device).unsqueeze(1).float().div(255).expand(-1, 3, -1, -1)
            optimizer.zero_grad()
            loss_fn(network(x), labels.to(device)).backward()
            optimizer.step()

    return images_per_second(epoch, data, warmup, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each side")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default=config.TrainConfig.precision, choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}", flush=True)
    data = random_images(args.batch_size * args.steps, args.image_size, seed=1)
    warmup = random_images(args.batch_size * args.warmup_steps, args.image_size, seed=2)
    ours = xraylib_loop(data, warmup, batch_size=args.batch_size, device=device, precision=args.precision)
    print(f"xraylib loop: {ours:.1f} img/s at {args.image_size}px, batch {args.batch_size}", flush=True)
    plain = plain_loop(data, warmup, batch_size=args.batch_size, device=device)
    print(f"plain fp32 loop: {plain:.1f} img/s", flush=True)
    print(f"speed-up: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
