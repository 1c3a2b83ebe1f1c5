"""Locations over real HTTP to the loopback S3 server: listing, reads, writes, cache, upload."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.s3proxy import Faults, S3Proxy
from xraylib import dataset, storage
from xraylib.errors import LocationError


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A counting proxy in front of the S3 server; boto3 goes through it for this test."""
    with S3Proxy(s3_server.endpoint_url) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def test_listing_returns_every_key_beyond_the_first_thousand(bucket, s3_client):
    # The prototype listed one page: 1,000 keys. The real PNEUMONIA folder holds 3,875.
    keys = [f"big/PNEUMONIA/person{i}_bacteria_{i}.jpeg" for i in range(1234)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3_client.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    listed = storage.list_objects(f"s3://{bucket}/big")
    assert len(listed) == 1234
    assert sorted(o.relpath for o in listed) == sorted(k.removeprefix("big/") for k in keys)


def test_listing_a_folder_does_not_take_keys_that_only_share_its_prefix(bucket, s3_client):
    s3_client.put_object(Bucket=bucket, Key="data/a.jpeg", Body=b"1")
    s3_client.put_object(Bucket=bucket, Key="data-old/b.jpeg", Body=b"2")
    assert [o.relpath for o in storage.list_objects(f"s3://{bucket}/data")] == ["a.jpeg"]


def test_write_then_read_round_trips_on_s3_and_locally(bucket, tmp_path):
    payload = os.urandom(300_000)
    for location in (f"s3://{bucket}/dir/blob.bin", str(tmp_path / "dir" / "blob.bin")):
        storage.write_bytes(location, payload)
        assert storage.read_bytes(location) == payload
        assert storage.exists(location)
        [info] = storage.list_objects(location)
        assert info.size == len(payload)


def test_local_write_leaves_no_partial_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_missing_bucket_and_missing_key_name_the_object(s3_server, bucket):
    with pytest.raises(LocationError, match=r"bucket 'no-such-bucket-here' does not exist"):
        storage.list_objects("s3://no-such-bucket-here/train")
    with pytest.raises(LocationError, match=rf"s3://{bucket}/nope.jpeg: no such object"):
        storage.read_bytes(f"s3://{bucket}/nope.jpeg")


def test_second_load_makes_no_get_and_a_changed_object_is_fetched_again(bucket, s3_client, proxy, cache_dir, tiny_dataset):
    storage.upload_directory(tiny_dataset / "test", f"s3://{bucket}/test")
    index = dataset.list_images(f"s3://{bucket}/test")
    proxy.reset_counts()
    first = dataset.load_images(index, 32)
    assert proxy.count("GET", f"/{bucket}/test/") == len(index)

    proxy.reset_counts()
    index = dataset.list_images(f"s3://{bucket}/test")
    again = dataset.load_images(index, 32)
    assert proxy.count("GET", f"/{bucket}/test/") == 0
    assert (again.pixels.numpy() == first.pixels.numpy()).all()

    # Replace one image with another picture: only that one is fetched again.
    changed = index.records[0].obj
    key = changed.location.removeprefix(f"s3://{bucket}/")
    other = (tiny_dataset / "test" / index.records[-1].obj.relpath).read_bytes()
    s3_client.put_object(Bucket=bucket, Key=key, Body=other)
    proxy.reset_counts()
    index = dataset.list_images(f"s3://{bucket}/test")
    third = dataset.load_images(index, 32)
    assert proxy.count("GET", f"/{bucket}/test/") == 1
    assert (third.pixels[0] == first.pixels[-1]).all()


def test_cache_paths_stay_inside_the_cache_for_hostile_keys(tmp_path):
    for key in ["../../etc/passwd", "a b/ü ñ.jpeg", "/abs/x.jpeg", "..", "x/../../y.jpeg"]:
        obj = storage.ObjectInfo(f"s3://bkt/{key}", key, 1, "etag")
        path = storage.cache_path(obj, tmp_path / "cache")
        assert path.resolve().is_relative_to((tmp_path / "cache").resolve())


def test_odd_keys_upload_list_and_load(bucket, tmp_path):
    import numpy as np

    from xraylib.synthetic import chest_image, encode

    rng = np.random.default_rng(0)
    for cls in ("NORMAL", "PNEUMONIA"):
        folder = tmp_path / "src" / cls / "sub dir ü"
        folder.mkdir(parents=True)
        for name in ("with space.jpeg", "ünïcode-ñ.jpeg", "..dots...jpeg"):
            (folder / name).write_bytes(encode(chest_image(rng, cls != "NORMAL", 40, 40)))
    report = storage.upload_directory(tmp_path / "src", f"s3://{bucket}/odd")
    assert report.uploaded == 6
    loaded = dataset.load_images(dataset.list_images(f"s3://{bucket}/odd"), 16)
    assert len(loaded) == 6


def test_upload_is_idempotent_and_sends_only_what_is_missing(bucket, s3_client, tiny_dataset, proxy):
    dest = f"s3://{bucket}/chest_xray"
    first = storage.upload_directory(tiny_dataset, dest)
    n_images = sum(1 for p in tiny_dataset.rglob("*.jpeg"))
    assert (first.uploaded, first.unchanged) == (n_images, 0)
    assert first.ignored == ("train/NORMAL/.DS_Store",)

    # Every object arrived whole: S3's MD5 matches the local file.
    for path in list(tiny_dataset.rglob("*.jpeg"))[:20]:
        key = "chest_xray/" + path.relative_to(tiny_dataset).as_posix()
        etag = s3_client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        assert etag == hashlib.md5(path.read_bytes()).hexdigest()

    # An interrupted upload: two objects missing. The re-run sends exactly those.
    missing = ["chest_xray/train/NORMAL/" + p.name for p in sorted((tiny_dataset / "train" / "NORMAL").glob("*.jpeg"))[:2]]
    for key in missing:
        s3_client.delete_object(Bucket=bucket, Key=key)
    proxy.reset_counts()
    second = storage.upload_directory(tiny_dataset, dest)
    assert (second.uploaded, second.unchanged) == (2, n_images - 2)
    assert proxy.count("PUT") == 2


def test_fetch_location_of_a_missing_local_file_names_it(tmp_path):
    with pytest.raises(LocationError, match=r"nothing-here\.pt"):
        storage.fetch_location(str(tmp_path / "nothing-here.pt"))


def test_local_listing_follows_linked_folders_once_and_names_a_broken_link(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (root / "NORMAL", elsewhere):
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"img{i}.jpeg").write_bytes(b"x" * (i + 1))
    (root / "PNEUMONIA").symlink_to(elsewhere, target_is_directory=True)  # a class folder kept on another disk
    (root / "NORMAL" / "loop").symlink_to(root, target_is_directory=True)
    listed = [o.relpath for o in storage.list_objects(str(root))]
    assert listed == ["NORMAL/img0.jpeg", "NORMAL/img1.jpeg", "PNEUMONIA/img0.jpeg", "PNEUMONIA/img1.jpeg"]

    (root / "NORMAL" / "gone.jpeg").symlink_to(tmp_path / "deleted.jpeg")
    with pytest.raises(LocationError, match=r"NORMAL/gone\.jpeg cannot be read .*broken link"):
        storage.list_objects(str(root))


def test_local_write_failures_name_the_path_and_cache_failures_name_the_setting(tmp_path, tiny_dataset):
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(LocationError, match=r"cannot write .*a-file/run/model\.pt: Not a directory"):
        storage.write_bytes(str(tmp_path / "a-file" / "run" / "model.pt"), b"weights")
    index = dataset.list_images(str(tiny_dataset), split="test")
    with pytest.raises(LocationError, match=r"a-file/cache.*set XRAYLIB_CACHE_DIR"):
        dataset.load_images(index, image_size=16, cache_dir=tmp_path / "a-file" / "cache")


def test_join_handles_both_schemes():
    assert storage.join("s3://b/x/", "train", "NORMAL") == "s3://b/x/train/NORMAL"
    assert storage.join("/data", "train") == str(Path("/data") / "train")


@pytest.fixture
def kms_proxy(s3_server, monkeypatch):
    """A proxy that answers as S3 does for a bucket with SSE-KMS default encryption: no ETag is an MD5."""
    with S3Proxy(s3_server.endpoint_url, kms=True) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def test_a_kms_encrypted_bucket_reads_and_a_rerun_of_upload_sends_nothing(bucket, tiny_dataset, kms_proxy):
    dest = f"s3://{bucket}/chest_xray"
    n_images = sum(1 for p in tiny_dataset.rglob("*.jpeg"))
    assert storage.upload_directory(tiny_dataset, dest).uploaded == n_images
    [listed] = storage.list_objects(f"{dest}/test/NORMAL/{sorted((tiny_dataset / 'test' / 'NORMAL').glob('*.jpeg'))[0].name}")
    assert listed.version != hashlib.md5(storage.read_bytes(listed.location)).hexdigest()  # as S3 lists a KMS object

    kms_proxy.reset_counts()
    again = storage.upload_directory(tiny_dataset, dest)
    assert (again.uploaded, again.unchanged) == (0, n_images)
    assert kms_proxy.count("PUT") == 0

    loaded = dataset.load_images(dataset.list_images(dest, split="test"), 32)
    reference = dataset.load_images(dataset.list_images(str(tiny_dataset), split="test"), 32)
    assert (loaded.pixels.numpy() == reference.pixels.numpy()).all()


@pytest.mark.parametrize("fault", ["cut_body", "corrupt_body"])
def test_a_kms_object_cut_short_or_damaged_in_transit_is_read_again(bucket, kms_proxy, fault):
    # The ETag is no MD5 here: the length, and the CRC32 that S3 keeps with the object, tell.
    payload = os.urandom(200_000)
    storage.write_bytes(f"s3://{bucket}/x/scan.jpeg", payload)
    kms_proxy.faults = Faults(**{fault: 1.0}, limit=2, only_methods=("GET",))
    kms_proxy.reset_counts()
    assert storage.read_bytes(f"s3://{bucket}/x/scan.jpeg") == payload
    assert kms_proxy.injected[fault] == 2
    assert kms_proxy.count("GET") == 3
