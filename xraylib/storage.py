"""Locations: where data, models and outputs live, local or on S3, behind one interface.

A location is a string: `s3://bucket/prefix` or a local path. Callers use the functions at the
bottom of this module (`list_objects`, `read_bytes`, `write_bytes`, `fetch`, `upload_directory`)
and never branch on the scheme; each scheme is one small handler class.

S3 goes through boto3 with the standard credential chain and region. A custom endpoint (MinIO,
LocalStack, the loopback test server) is set with boto3's own `AWS_ENDPOINT_URL`. The client is
made on first use. Reads retry with backoff and jitter on request errors *and* on bodies cut
mid-stream (checked against Content-Length and the MD5 ETag), so a half-read object is never
returned. Writes are whole or absent: local files are renamed into place, S3 objects are single
PUTs checked by Content-MD5.

Downloads land in a cache (`XRAYLIB_CACHE_DIR`) named by a hash of the object's address and its
ETag: a changed object is fetched again, an unchanged one never is, and no key can escape it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from xraylib import config
from xraylib.errors import LocationError


@dataclass(frozen=True)
class ObjectInfo:
    """One object found under a listed location."""

    location: str  # full address: s3://bucket/key or a local path
    relpath: str  # '/'-separated path below the listed location
    size: int
    version: str  # the S3 ETag, or size and mtime for local files


def is_remote(location: str) -> bool:
    """True when reading `location` goes over the network (worth caching)."""
    return location.startswith("s3://")


def join(location: str, *parts: str) -> str:
    """`location/part/...`, for either scheme."""
    out = location.rstrip("/") if is_remote(location) else str(location)
    for part in parts:
        out = f"{out.rstrip('/')}/{part.strip('/')}" if is_remote(out) else os.path.join(out, part)
    return out


def parse_s3(location: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    if not location.startswith("s3://"):
        raise LocationError(f"{location!r} is not an s3:// location")
    bucket, _, key = location[len("s3://"):].partition("/")
    if not bucket:
        raise LocationError(f"{location!r} names no bucket: write s3://BUCKET/PREFIX")
    return bucket, key


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@functools.cache
def _umask() -> int:
    """The process umask, read once. Linux reports it in /proc; elsewhere it can only be read by
    setting it, which for a moment would let other threads (parallel downloads) create files
    with no mask, so that happens at most once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_file(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see part of it."""
    try:
        _atomic_write_file(path, data)
    except OSError as exc:
        raise LocationError(f"cannot write {path}: {exc.strerror or exc}; "
                            "check that its folder can be written to and the disk has room") from None


def _atomic_write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:80]}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _raise_unreadable(exc: OSError) -> NoReturn:
    raise LocationError(f"{exc.filename} cannot be listed ({exc.strerror or exc}): check its permissions") from None


class LocalHandler:
    """Plain files and folders."""

    def list(self, location: str) -> list[ObjectInfo]:
        root = Path(location).expanduser()
        if root.is_file():
            st = root.stat()
            return [ObjectInfo(str(root), root.name, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")]
        if not root.is_dir():
            raise LocationError(f"{location}: no such file or folder; check the path")
        found = []
        seen_folders = set()
        # Folders that are links are followed (a class folder may live elsewhere), each real folder
        # once, so a link loop ends; a folder that cannot be read stops the listing, never drops out.
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_unreadable, followlinks=True):
            folder = os.stat(dirpath)
            if (folder.st_dev, folder.st_ino) in seen_folders:
                dirnames.clear()
                continue
            seen_folders.add((folder.st_dev, folder.st_ino))
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.endswith(".part") and name.startswith("."):
                    continue  # an interrupted atomic write of ours, never data
                try:
                    st = path.stat()
                except OSError as exc:
                    raise LocationError(f"{path} cannot be read ({exc.strerror or exc}): "
                                        "a broken link? fix it or remove it") from None
                rel = path.relative_to(root).as_posix()
                found.append(ObjectInfo(str(path), rel, st.st_size, f"{st.st_size}-{st.st_mtime_ns}"))
        return found

    def read_bytes(self, location: str) -> bytes:
        try:
            return Path(location).expanduser().read_bytes()
        except FileNotFoundError:
            raise LocationError(f"{location}: no such file; check the path") from None
        except IsADirectoryError:
            raise LocationError(f"{location} is a folder, not a file") from None
        except OSError as exc:
            raise LocationError(f"{location} cannot be read ({exc.strerror or exc}): check its permissions") from None

    def write_bytes(self, location: str, data: bytes) -> None:
        atomic_write_file(Path(location).expanduser(), data)

    def exists(self, location: str) -> bool:
        return Path(location).expanduser().exists()


# Errors worth another try: the connection failed, or the body stopped before its end.
def _retryable_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
        Urllib3Error,
        ConnectionError,
        TimeoutError,
        _CorruptBody,
    )


class _CorruptBody(Exception):
    """The body read does not match its length or MD5: it was cut or damaged in transit."""


def _explain_s3_error(exc: BaseException, location: str) -> LocationError:
    """Turn a boto3 failure into one line that names the object and the fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return LocationError(
            f"no AWS credentials found for {location}: run `aws configure`, set AWS_PROFILE, or set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in SageMaker, attach an execution role)"
        )
    if isinstance(exc, EndpointConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS S3 endpoint")
        return LocationError(f"cannot reach {endpoint} for {location}: check the network and AWS_ENDPOINT_URL")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        bucket, _ = parse_s3(location)
        if code == "NoSuchBucket":
            return LocationError(f"bucket {bucket!r} does not exist ({location}): check the name, or create it")
        if code in ("NoSuchKey", "404", "NotFound"):
            return LocationError(f"{location}: no such object; check the key")
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return LocationError(
                f"access denied to {location}: the credentials in use lack permission for this bucket "
                "(s3:ListBucket, s3:GetObject, s3:PutObject); check the IAM policy or AWS_PROFILE"
            )
        if code in ("ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired"):
            return LocationError(f"AWS credentials have expired reading {location}: refresh them (e.g. `aws sso login`)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"):
            return LocationError(f"AWS rejected the credentials for {location} ({code}): check the access key and secret")
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"):
            region = err.get("Region") or exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
                "x-amz-bucket-region"
            )
            hint = f"set AWS_DEFAULT_REGION={region}" if region else "set AWS_DEFAULT_REGION to the bucket's region"
            return LocationError(f"bucket {bucket!r} is in another region than the one configured ({location}): {hint}")
        return LocationError(f"S3 refused {location}: {code} {err.get('Message', '')}".strip())
    return LocationError(f"S3 request for {location} failed: {exc}")


class S3Handler:
    """Objects in S3, or in any S3-compatible server named by AWS_ENDPOINT_URL."""

    def __init__(self) -> None:
        self._clients: dict[str | None, Any] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """One thread-safe client per endpoint, made on first use."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        with self._lock:
            if endpoint not in self._clients:
                import boto3
                from botocore.config import Config

                self._clients[endpoint] = boto3.session.Session().client(
                    "s3",
                    config=Config(
                        retries={"max_attempts": 3, "mode": "standard"},
                        max_pool_connections=config.S3_WORKERS * 2,
                        connect_timeout=10,
                        read_timeout=30,
                    ),
                )
            return self._clients[endpoint]

    def _call(self, location: str, fn: Callable[[], Any]) -> Any:
        """Run one request; retry transient failures with backoff and jitter, up to a deadline."""
        retryable = _retryable_errors()
        deadline = time.monotonic() + config.S3_RETRY_SECONDS
        for attempt in range(1, config.S3_MAX_ATTEMPTS + 1):
            try:
                return fn()
            except retryable as exc:
                if attempt == config.S3_MAX_ATTEMPTS or time.monotonic() > deadline:
                    raise LocationError(
                        f"gave up on {location} after {attempt} attempts ({type(exc).__name__}: {exc}); "
                        "the network or the S3 endpoint is failing: try again later"
                    ) from None
                time.sleep(min(4.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.5))
            except Exception as exc:
                from botocore.exceptions import BotoCoreError, ClientError

                if isinstance(exc, ClientError | BotoCoreError):
                    raise _explain_s3_error(exc, location) from None
                raise
        raise AssertionError("unreachable")

    def list(self, location: str) -> list[ObjectInfo]:
        bucket, key = parse_s3(location)
        # A location names a "folder": list below it, not keys that merely share its prefix.
        prefix = key if not key or key.endswith("/") else key + "/"

        def list_all() -> list[dict[str, Any]]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [obj for page in pages for obj in page.get("Contents", [])]

        contents = self._call(location, list_all)
        if not contents and key and not key.endswith("/"):
            # Not a folder: maybe a single object.
            head = self._call(location, lambda: self._head(bucket, key))
            if head is not None:
                return [ObjectInfo(location, key.rsplit("/", 1)[-1], head["ContentLength"], head["ETag"].strip('"'))]
        return [
            ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Key"][len(prefix):], obj["Size"], obj["ETag"].strip('"'))
            for obj in contents
            if not obj["Key"].endswith("/")
        ]

    def _head(self, bucket: str, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def read_bytes(self, location: str) -> bytes:
        bucket, key = parse_s3(location)

        def get() -> bytes:
            response = self.client.get_object(Bucket=bucket, Key=key)
            data = response["Body"].read()
            if len(data) != response["ContentLength"]:
                raise _CorruptBody(f"got {len(data)} of {response['ContentLength']} bytes")
            etag = response.get("ETag", "").strip('"')
            # A multipart ETag ("...-N") is no MD5; the length check above is all there is.
            if etag and "-" not in etag and _md5_hex(data) != etag:
                raise _CorruptBody("MD5 of the body does not match its ETag")
            return data

        return self._call(location, get)

    def write_bytes(self, location: str, data: bytes) -> None:
        bucket, key = parse_s3(location)
        if not key:
            raise LocationError(f"{location} names a bucket, not an object: add a key")
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self._call(location, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=md5))

    def exists(self, location: str) -> bool:
        bucket, key = parse_s3(location)
        if not key:
            return self._call(location, lambda: self.client.head_bucket(Bucket=bucket)) is not None
        return self._call(location, lambda: self._head(bucket, key)) is not None


_LOCAL = LocalHandler()
_S3 = S3Handler()


def _handler(location: str) -> LocalHandler | S3Handler:
    return _S3 if is_remote(location) else _LOCAL


def list_objects(location: str) -> list[ObjectInfo]:
    """Every object below `location` (all pages), sorted by path; a file lists as itself."""
    return sorted(_handler(location).list(location), key=lambda o: o.relpath)


def read_bytes(location: str) -> bytes:
    """The whole content of one object, verified."""
    return _handler(location).read_bytes(location)


def write_bytes(location: str, data: bytes) -> None:
    """Store `data` at `location`: readers see the old content or the new, never a part."""
    _handler(location).write_bytes(location, data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def exists(location: str) -> bool:
    return _handler(location).exists(location)


def cache_path(obj: ObjectInfo, cache_dir: Path, kind: str = "objects") -> Path:
    """Where the cache keeps `obj`: named by hashes, so odd keys (`..`, spaces) stay inside."""
    name = hashlib.sha256(obj.location.encode("utf-8")).hexdigest()
    version = hashlib.sha256(obj.version.encode("utf-8")).hexdigest()[:16]
    return cache_dir / kind / name[:2] / f"{name}-{version}"


def write_cache_file(path: Path, data: bytes) -> None:
    """Store one cache entry whole, or fail saying how to point the cache somewhere writable."""
    try:
        atomic_write_file(path, data)
    except LocationError as exc:
        raise LocationError(f"{exc}, or set XRAYLIB_CACHE_DIR to a folder that can be") from None


def fetch(obj: ObjectInfo, cache_dir: Path | None = None) -> Path:
    """A local file holding `obj`: the file itself when local, else a verified cached copy."""
    if not is_remote(obj.location):
        return Path(obj.location)
    path = cache_path(obj, cache_dir or config.default_cache_dir())
    # Entries are renamed into place whole; the size check also catches one damaged since.
    if not path.exists() or path.stat().st_size != obj.size:
        data = read_bytes(obj.location)
        if len(data) != obj.size:
            raise LocationError(f"{obj.location} changed while it was read (listed {obj.size} bytes, got {len(data)}); run again")
        write_cache_file(path, data)
    return path


def fetch_location(location: str, cache_dir: Path | None = None) -> Path:
    """A local file holding the single object at `location` (a model file, an image)."""
    if not is_remote(location):
        path = Path(location).expanduser()
        if not path.is_file():
            raise LocationError(f"{location}: no such file; check the path")
        return path
    matches = [o for o in list_objects(location) if o.location == location]
    if not matches:
        raise LocationError(f"{location}: no such object; check the bucket and key")
    return fetch(matches[0], cache_dir)


def parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int = config.S3_WORKERS, progress: str | None = None
) -> list[Any]:
    """`[fn(x) for x in items]` on a thread pool, in order; the first error cancels the rest and
    is raised. With `progress`, a tqdm bar of that title counts finished items."""
    items = list(items)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=progress, unit="item", leave=True)  # a finished bar stays, with its count and time

    def run(x: Any) -> Any:
        result = fn(x)
        if bar is not None:
            bar.update(1)
        return result

    try:
        if len(items) <= 1 or workers <= 1:
            return [run(x) for x in items]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(run, x) for x in items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()


@dataclass(frozen=True)
class UploadReport:
    uploaded: int
    unchanged: int
    ignored: tuple[str, ...]  # files that are not images, left out

    def __str__(self) -> str:
        return f"uploaded {self.uploaded}, already there {self.unchanged}, ignored {len(self.ignored)} non-image file(s)"


def upload_directory(src: str | Path, dest: str, *, suffixes: tuple[str, ...] = config.IMAGE_SUFFIXES) -> UploadReport:
    """Copy the images below `src` to `dest`, keeping relative paths; skip objects already there
    with the same content (by MD5), so a re-run after an interruption sends only what is missing."""
    src_objects = list_objects(str(src))
    if not src_objects:
        raise LocationError(f"{src}: no files to upload")
    wanted = [o for o in src_objects if o.relpath.lower().endswith(suffixes)]
    ignored = tuple(o.relpath for o in src_objects if not o.relpath.lower().endswith(suffixes))
    try:
        present = {o.relpath: o.version for o in list_objects(dest)}
    except LocationError:
        if not is_remote(dest):
            present = {}
        else:
            raise

    def send(obj: ObjectInfo) -> bool:
        data = read_bytes(obj.location)
        target = join(dest, obj.relpath)
        current = present.get(obj.relpath)
        digest = _md5_hex(data)
        # S3 lists the MD5 as the ETag; a local copy has to be read to compare.
        if current is not None and (current == digest or (not is_remote(dest) and _md5_hex(read_bytes(target)) == digest)):
            return False
        write_bytes(target, data)
        return True

    sent = parallel_map(send, wanted)
    return UploadReport(uploaded=sum(sent), unchanged=len(sent) - sum(sent), ignored=ignored)
