"""Flaky networks, killed uploads, hostile names and bad credentials, with real processes:
a fault-injecting proxy in front of the loopback S3 server, and a second server that checks IAM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.s3proxy import Faults, S3Proxy
from xraylib import config, dataset, locals3, storage
from xraylib.errors import DatasetError, LocationError


@pytest.fixture
def flaky(s3_server, monkeypatch):
    """A proxy that drops, resets or cuts off about a third of all GET, PUT and HEAD requests."""
    with S3Proxy(s3_server.endpoint_url, faults=Faults(drop=0.1, reset=0.1, cut_body=0.15, seed=11)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.mark.timeout(300)
def test_upload_and_load_through_a_flaky_network_lose_and_corrupt_nothing(bucket, tiny_dataset, flaky, s3_client):
    dest = f"s3://{bucket}/flaky"
    report = storage.upload_directory(tiny_dataset, dest)
    images = sorted(tiny_dataset.rglob("*.jpeg"))
    assert report.uploaded == len(images)
    for path in images:  # checked behind the proxy's back, straight from the server
        key = "flaky/" + path.relative_to(tiny_dataset).as_posix()
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.md5(body).hexdigest() == hashlib.md5(path.read_bytes()).hexdigest()

    index = dataset.list_images(dest, split="test")
    loaded = dataset.load_images(index, 32)
    reference = dataset.load_images(dataset.list_images(str(tiny_dataset / "test")), 32, cache_dir=None)
    assert len(loaded) == len(reference)
    assert np.array_equal(loaded.pixels.numpy(), reference.pixels.numpy())
    assert flaky.injected["cut_body"] > 3 and flaky.injected["drop"] > 3 and flaky.injected["reset"] > 3


def test_a_dead_network_gives_up_in_bounded_time_naming_the_object(bucket, s3_server, monkeypatch):
    storage.write_bytes(f"s3://{bucket}/x/scan.jpeg", b"abc" * 1000)
    monkeypatch.setattr(config, "S3_RETRY_SECONDS", 3.0)
    with S3Proxy(s3_server.endpoint_url, faults=Faults(cut_body=1.0, only_methods=("GET",))) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        started = time.monotonic()
        with pytest.raises(LocationError, match=rf"gave up on s3://{bucket}/x/scan\.jpeg after \d+ attempts"):
            storage.read_bytes(f"s3://{bucket}/x/scan.jpeg")
        assert time.monotonic() - started < 30


def test_throttling_is_retried_and_every_object_has_a_bounded_number_of_tries(bucket, s3_server, monkeypatch):
    location = f"s3://{bucket}/x/scan.jpeg"
    storage.write_bytes(location, b"abc" * 1000)
    with S3Proxy(s3_server.endpoint_url, faults=Faults(throttle=1.0, limit=2, only_methods=("GET",))) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert storage.read_bytes(location) == b"abc" * 1000  # S3 said SlowDown twice, then answered
        assert proxy.count("GET") == 3

    # Each try counts once, whoever retries: a request botocore sends again, a body xraylib reads again.
    monkeypatch.setattr(config, "S3_MAX_ATTEMPTS", 3)
    for fault, message in [("throttle", r"S3 is throttling requests for .*scan\.jpeg \(SlowDown\) after 3 attempts"),
                           ("drop", r"gave up on .*scan\.jpeg after 3 attempts"),
                           ("cut_body", r"gave up on .*scan\.jpeg after 3 attempts")]:
        with S3Proxy(s3_server.endpoint_url, faults=Faults(**{fault: 1.0}, only_methods=("GET",))) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            with pytest.raises(LocationError, match=message):
                storage.read_bytes(location)
            assert proxy.count("GET") == 3


def test_a_read_stalled_mid_body_ends_at_the_deadline_naming_the_object(bucket, s3_server, monkeypatch):
    location = f"s3://{bucket}/x/scan.jpeg"
    storage.write_bytes(location, os.urandom(100_000))
    monkeypatch.setattr(config, "S3_RETRY_SECONDS", 2.0)
    # Half the body, then silence for a minute: longer than botocore's read timeout allows for a whole read.
    with S3Proxy(s3_server.endpoint_url, faults=Faults(stall_body=1.0, only_methods=("GET",))) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        started = time.monotonic()
        with pytest.raises(LocationError, match=rf"gave up on {location} after 1 attempt.* within 2 s"):
            storage.read_bytes(location)
        assert time.monotonic() - started < 20
        assert proxy.count("GET") == 1


@pytest.mark.timeout(300)
def test_killed_upload_rerun_sends_only_what_is_missing(bucket, tiny_dataset, s3_server, monkeypatch):
    dest = f"s3://{bucket}/killed"
    images = sorted(tiny_dataset.rglob("*.jpeg"))
    with S3Proxy(s3_server.endpoint_url, latency=0.05) as slow:
        env = {**os.environ, "AWS_ENDPOINT_URL": slow.url}
        process = subprocess.Popen([sys.executable, "-m", "xraylib", "upload", str(tiny_dataset), dest], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while slow.count("PUT") < len(images) // 3 and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    already = {o.relpath for o in storage.list_objects(dest)}
    assert 0 < len(already) < len(images)
    with S3Proxy(s3_server.endpoint_url) as counting:
        monkeypatch.setenv("AWS_ENDPOINT_URL", counting.url)
        report = storage.upload_directory(tiny_dataset, dest)
        assert counting.count("PUT") == len(images) - len(already)
    assert (report.uploaded, report.unchanged) == (len(images) - len(already), len(already))
    for path in images:
        [obj] = storage.list_objects(f"{dest}/{path.relative_to(tiny_dataset).as_posix()}")
        assert obj.version == hashlib.md5(path.read_bytes()).hexdigest()


def test_cache_never_serves_a_partial_file(bucket, cache_dir):
    payload = os.urandom(50_000)
    storage.write_bytes(f"s3://{bucket}/c/blob.bin", payload)
    [obj] = storage.list_objects(f"s3://{bucket}/c/blob.bin")
    path = storage.cache_path(obj, cache_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(payload[:1000])  # as a crash mid-write would leave it, had it not been atomic
    assert storage.fetch(obj, cache_dir).read_bytes() == payload


@pytest.fixture(scope="module")
def iam_server():
    """A second S3 server that checks credentials and IAM policies after its first 5 requests."""
    server = locals3.start_local_s3(env={"INITIAL_NO_AUTH_ACTION_COUNT": "5"})
    session = boto3.session.Session(**{k.lower(): v for k, v in locals3.LOCAL_ENV.items() if k != "AWS_DEFAULT_REGION"},
                                     region_name="us-east-1")
    s3 = session.client("s3", endpoint_url=server.endpoint_url)
    iam = session.client("iam", endpoint_url=server.endpoint_url)
    s3.create_bucket(Bucket="guarded")
    s3.put_object(Bucket="guarded", Key="data/NORMAL/IM-0001-0001.jpeg", Body=b"x")
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}]}
    iam.put_user_policy(UserName="reader", PolicyName="list-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    yield server, key
    server.stop()


def _cli_error(env: dict, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "xraylib", *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    return line


def test_access_denied_and_rejected_credentials_are_one_clear_line(iam_server, tmp_path):
    server, key = iam_server
    reader = {"AWS_ENDPOINT_URL": server.endpoint_url, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
              "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    line = _cli_error(reader, "predict", "--model", "s3://guarded/data/model.pt", str(tmp_path / "x.jpeg"))
    assert "access denied to s3://guarded/data/model.pt" in line and "IAM policy" in line
    assert key["SecretAccessKey"] not in line

    stranger = {**reader, "AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000", "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
    line = _cli_error(stranger, "train", "--data", "s3://guarded/data", "--out", str(tmp_path / "o"))
    assert "s3://guarded/data" in line and "credentials" in line
    assert "wrong-secret-value" not in line


# Property-based checks of the pure parts: location parsing, labels, patients.

_key_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(lambda s: "/" not in s)


@settings(max_examples=200, deadline=None)
@given(bucket=st.from_regex(r"[a-z0-9][a-z0-9.-]{2,20}[a-z0-9]", fullmatch=True), parts=st.lists(_key_text, max_size=4))
def test_s3_locations_parse_back_to_bucket_and_key(bucket, parts):
    key = "/".join(parts)
    assert storage.parse_s3(f"s3://{bucket}/{key}") == (bucket, key)
    joined = storage.join(f"s3://{bucket}", *parts) if parts else f"s3://{bucket}"
    assert storage.parse_s3(joined) == (bucket, key)


@settings(max_examples=200, deadline=None)
@example(other="nORMAL", normal="NORMAL")  # found by hypothesis: NORMAL twice, in two cases
@given(other=st.text(st.characters(whitelist_categories=("Lu", "Ll", "Nd")), min_size=1, max_size=12),
       normal=st.sampled_from(["NORMAL", "normal", "Normal", "nOrMaL"]))
def test_normal_is_negative_in_any_case_and_the_other_folder_positive(other, normal):
    if other.lower() == "normal":
        with pytest.raises(DatasetError):
            dataset.class_roles([normal, other], "here")
        return
    assert dataset.class_roles([other, normal], "here") == (normal, other)


@settings(max_examples=300, deadline=None)
@given(patient=st.integers(0, 10**6), image=st.integers(0, 10**6), series=st.integers(0, 9999),
       kind=st.sampled_from(["bacteria", "virus"]), prefix=st.sampled_from(["", "NORMAL2-"]))
def test_patient_ids_group_every_image_of_one_patient(patient, image, series, kind, prefix):
    assert dataset.patient_id(f"PNEUMONIA/person{patient}_{kind}_{image}.jpeg") == f"PERSON{patient}"
    assert dataset.patient_id(f"{prefix}IM-{patient:04d}-{series:04d}.jpeg") == f"{prefix}IM-{patient:04d}"
    assert dataset.patient_id(f"person{patient}_{kind}_{image}.jpeg") != dataset.patient_id(f"person{patient + 1}_{kind}_1.jpeg")


class _CannedS3:
    """An HTTP server that answers every request with one S3 error, as AWS sends it: for the
    failures a local S3 server cannot produce (a bucket in another region, expired credentials)."""

    def __init__(self, status: int, code: str, extra_xml: str = "", headers: dict[str, str] | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code}</Message>'
                f"{extra_xml}<RequestId>R1</RequestId></Error>").encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("status", "code", "extra", "headers", "expected"),
    [
        (301, "PermanentRedirect", "<Bucket>scans</Bucket>", {"x-amz-bucket-region": "eu-west-1"},
         "bucket 'scans' is in another region than the one configured (s3://scans/train): set AWS_DEFAULT_REGION=eu-west-1"),
        (400, "AuthorizationHeaderMalformed", "<Region>ap-south-1</Region>", {},
         "set AWS_DEFAULT_REGION=ap-south-1"),
        (400, "ExpiredToken", "", {}, "AWS credentials have expired reading s3://scans/train"),
    ],
)
def test_wrong_region_and_expired_credentials_are_one_clear_line(status, code, extra, headers, expected, tmp_path, s3_server):
    canned = _CannedS3(status, code, extra, headers)
    try:
        line = _cli_error({"AWS_ENDPOINT_URL": canned.url}, "train", "--data", "s3://scans/train", "--out", str(tmp_path / "o"))
    finally:
        canned.close()
    assert expected in line
