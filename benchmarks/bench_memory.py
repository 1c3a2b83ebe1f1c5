"""Peak memory of training at 224 px, batch 32: the resident set of `xraylib train`, measured
by the kernel (the child's maximum RSS) over three epochs, against the 6 GB target. One epoch is
not enough: the resident set grows by about 1 GB in the second epoch (4.2 to 5.2 GB), then levels off.

    python benchmarks/bench_memory.py [--per-class 128] [--image-size 224] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import make_subset
from common import real_train_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "subset"
        make_subset(real_train_folder(), folder, args.per_class)
        command = [sys.executable, "-m", "xraylib", "train", "--data", str(folder), "--out", str(Path(tmp) / "out"),
                   "--epochs", "3", "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                   "--weights", "none"]
        started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "XRAYLIB_CACHE_DIR": str(Path(tmp) / "cache")})
        seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # Linux reports KiB
    print(f"peak resident memory of `xraylib train` at {args.image_size}px, batch {args.batch_size}: {peak_gb:.2f} GB "
          f"({peak_gb / 6:.0%} of the 6 GB target), {seconds:.0f}s")


if __name__ == "__main__":
    main()
