"""Loading images from S3: xraylib (cold and warm cache) against the prototype's loop, side by side.

    python benchmarks/bench_s3_loading.py [--images 2000] [--latency-ms 30]

The images (real chest X-rays) go to a loopback S3 server; every request then passes a proxy
that adds `--latency-ms` before answering, standing for real S3's time to first byte. The
prototype's loop: a paginated listing, then `download_fileobj` one key after another, then
decode. xraylib: `list_images` + `load_images`, first with an empty cache, then again.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import real_train_folder  # noqa: E402

from tests.s3proxy import S3Proxy  # noqa: E402
from xraylib import dataset, locals3, storage  # noqa: E402

IMAGE_SIZE = 128


def prototype_loop(bucket: str, prefix: str) -> int:
    """The prototype's loader, with its bugs fixed (it paginates and decodes), kept serial."""
    import boto3
    import numpy as np
    from PIL import Image

    s3 = boto3.client("s3")
    keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])]
    images = []
    for key in keys:
        buffer = io.BytesIO()
        s3.download_fileobj(bucket, key, buffer)
        buffer.seek(0)
        images.append(np.asarray(Image.open(buffer).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE))))
    return len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    args = parser.parse_args()
    source = real_train_folder()
    per_class = args.images // 2
    with tempfile.TemporaryDirectory() as tmp, locals3.local_s3_server() as server:
        subset = Path(tmp) / "subset"
        for cls in ("NORMAL", "PNEUMONIA"):
            (subset / cls).mkdir(parents=True)
            for path in sorted((source / cls).glob("*.jpeg"))[:per_class]:
                (subset / cls / path.name).symlink_to(path)
        locals3.create_bucket("bench")
        storage.upload_directory(subset, "s3://bench/data")
        with S3Proxy(server.endpoint_url, latency=args.latency_ms / 1000) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            results = {}
            started = time.perf_counter()
            n = prototype_loop("bench", "data/")
            results["prototype"] = time.perf_counter() - started
            cache = Path(tmp) / "cache"
            for label in ("xraylib cold", "xraylib warm"):
                proxy.reset_counts()
                started = time.perf_counter()
                loaded = dataset.load_images(dataset.list_images("s3://bench/data"), IMAGE_SIZE, cache_dir=cache)
                results[label] = time.perf_counter() - started
                assert len(loaded) == n
                print(f"{label}: {results[label]:.2f}s, {n / results[label]:.0f} images/s, "
                      f"{proxy.count('GET', '/bench/data/')} object GETs", flush=True)
            print(f"prototype: {results['prototype']:.2f}s, {n / results['prototype']:.0f} images/s")
    print(f"{n} images behind {args.latency_ms:.0f} ms per request: cold {results['prototype'] / results['xraylib cold']:.1f}x, "
          f"warm {results['prototype'] / results['xraylib warm']:.1f}x faster than the prototype loop")


if __name__ == "__main__":
    main()
