"""Locations: where data, models and outputs live, local or on S3, behind one interface.

A location is a string: `s3://bucket/prefix` or a local path. Callers use the functions at the
bottom of this module (`list_objects`, `read_bytes`, `write_bytes`, `fetch`, `upload_directory`)
and never branch on the scheme; each scheme is one small handler class.

S3 goes through boto3 with the standard credential chain and region. A custom endpoint (MinIO,
LocalStack, the loopback test server) is set with boto3's own `AWS_ENDPOINT_URL`. The client is
made on first use. botocore retries requests, throttling included; xraylib reads a body again
when it arrives cut short or damaged (checked against its length, the CRC32 or SHA checksum S3
keeps with the object, and the ETag where that is the body's MD5), so a half-read object is never
returned. All tries of one object share one budget of attempts and one deadline, which also ends
a read that stalls (see `config.S3_MAX_ATTEMPTS`). Writes are whole or absent: local files are
renamed into place, S3 objects are single PUTs checked by Content-MD5 and stored with a CRC32.

Downloads land in a cache (`XRAYLIB_CACHE_DIR`) named by a hash of the object's address and its
ETag: a changed object is fetched again, an unchanged one never is, and no key can escape it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import math
import os
import random
import re
import tempfile
import threading
import time
import zlib
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

    def holds(self, obj: ObjectInfo, data: bytes) -> bool:
        """Whether the listed file `obj` holds exactly `data`."""
        return obj.size == len(data) and self.read_bytes(obj.location) == data

    def exists(self, location: str) -> bool:
        return Path(location).expanduser().exists()


# What can go wrong while a body is read, after botocore has handed over the response: the
# connection drops or stalls, the body stops short, or it does not match its checksum.
def _body_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import FlexibleChecksumError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, FlexibleChecksumError, Urllib3Error, OSError)


class _CorruptBody(Exception):
    """The body read does not match its length, checksum or MD5: it was cut or damaged in transit."""


class _OutOfTime(Exception):
    """The object's deadline passed: no try starts after it, and a read in progress is ended."""


class _Tries(threading.local):
    """The tries of the object this thread is working on (set by `S3Handler._call`), counted by the
    hooks below on every request botocore sends, its own retries included."""

    started: float | None = None
    deadline = math.inf
    count = 0
    last = ""  # what went wrong last: an S3 error code or an exception's name

    def restart(self) -> None:
        self.started, self.count, self.last = time.monotonic(), 0, ""
        self.deadline = self.started + config.S3_RETRY_SECONDS

    def spent(self) -> bool:
        return self.count >= config.S3_MAX_ATTEMPTS or time.monotonic() > self.deadline


_TRIES = _Tries()


def _count_try(**_: Any) -> None:
    """botocore's before-send hook: one more try; none starts after the deadline. (botocore sleeps
    its backoff itself, so its last sleep, at most 20 s, may end past the deadline.)"""
    if _TRIES.started is None:
        return
    if _TRIES.count and time.monotonic() > _TRIES.deadline:
        raise _OutOfTime
    _TRIES.count += 1


def _stop_retrying(response: Any = None, caught_exception: BaseException | None = None, operation: Any = None,
                   **_: Any) -> None:
    """botocore's needs-retry hook, run before its own: once the object's tries or time are spent,
    a failed try ends botocore's retries by raising what it got; otherwise botocore decides.
    Raised, not answered with False: botocore before 1.44 reads any answer but None as a delay, and
    False as "retry at once", for ever."""
    if _TRIES.started is None:
        return None
    if caught_exception is not None:
        if not isinstance(caught_exception, _OutOfTime):
            _TRIES.last = type(caught_exception).__name__
        if _TRIES.spent():
            raise caught_exception
    elif response is not None and response[1].get("Error"):
        _TRIES.last = str(response[1]["Error"].get("Code", ""))
        if _TRIES.spent():
            from botocore.exceptions import ClientError

            raise ClientError(response[1], operation.name if operation is not None else "request")
    return None


def _etag_is_md5(response: dict[str, Any]) -> bool:
    """S3 documents the ETag as the body's MD5 only for an object stored in one part, unencrypted
    or encrypted with S3's own keys; with KMS keys (SSE-KMS) or a customer's key (SSE-C) it is not."""
    etag = str(response.get("ETag", "")).strip('"')
    return (re.fullmatch(r"[0-9a-f]{32}", etag) is not None
            and not str(response.get("ServerSideEncryption", "")).startswith("aws:kms")
            and not response.get("SSECustomerAlgorithm"))


def _watch(body: Any, deadline: float) -> threading.Timer | None:
    """Shut the connection under `body` at `deadline`, which ends a read stalled there: botocore's
    read timeout bounds each wait for bytes, not a body that trickles in or stalls between them.
    None where urllib3 cannot do that (before 2.3); its read timeout is then the bound."""
    shutdown = getattr(getattr(body, "_raw_stream", None), "shutdown", None)
    if shutdown is None:
        return None

    def stop() -> None:
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # the read has just finished
            shutdown()

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), stop)
    timer.daemon = True
    timer.start()
    return timer


def _read_body(response: dict[str, Any]) -> bytes:
    """The body of a GetObject answer, whole and verified, or `_CorruptBody` / `_OutOfTime`."""
    length = int(response["ContentLength"])
    if _TRIES.started is not None:
        _TRIES.deadline = _TRIES.started + config.S3_RETRY_SECONDS + length / config.S3_MIN_BYTES_PER_SECOND
    timer = _watch(response["Body"], _TRIES.deadline)
    try:
        # A body carrying a checksum (x-amz-checksum-crc32, ...) is checked by botocore as it ends.
        data = response["Body"].read()
    except _body_errors() as exc:
        if time.monotonic() > _TRIES.deadline:
            raise _OutOfTime from None
        raise _CorruptBody(f"{type(exc).__name__}: {exc}") from None
    finally:
        if timer is not None:
            timer.cancel()
    if len(data) != length:
        raise _CorruptBody(f"got {len(data)} of {length} bytes")
    if _etag_is_md5(response) and _md5_hex(data) != response["ETag"].strip('"'):
        raise _CorruptBody("MD5 of the body does not match its ETag")
    return data


# The flexible checksums S3 may keep with an object that the standard library computes, as the
# fields HeadObject returns them in (base64 of the digest).
_CHECKSUMS: dict[str, Callable[[bytes], bytes]] = {
    "ChecksumCRC32": lambda data: zlib.crc32(data).to_bytes(4, "big"),
    "ChecksumSHA256": lambda data: hashlib.sha256(data).digest(),
    "ChecksumSHA1": lambda data: hashlib.sha1(data, usedforsecurity=False).digest(),
}

_THROTTLING_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                     "TooManyRequestsException", "RequestThrottled", "BandwidthLimitExceeded")


def _explain_s3_error(exc: BaseException, location: str, tries: int = 1) -> LocationError:
    """Turn a boto3 failure into one line that names the object and the fix."""
    from botocore.exceptions import ClientError, ConnectionError, EndpointConnectionError, HTTPClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return LocationError(
            f"no AWS credentials found for {location}: run `aws configure`, set AWS_PROFILE, or set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in SageMaker, attach an execution role)"
        )
    if isinstance(exc, EndpointConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS S3 endpoint")
        return LocationError(f"cannot reach {endpoint} for {location}: check the network and AWS_ENDPOINT_URL")
    if isinstance(exc, ConnectionError | HTTPClientError):  # what botocore retries as transient
        return _gave_up(location, tries, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        bucket, _ = parse_s3(location)
        if code in _THROTTLING_CODES or status == 429:
            return _throttled(location, tries, code or str(status))
        if status >= 500:
            return _gave_up(location, tries, f"{code or status} {err.get('Message', '')}".strip())
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


def _attempts(n: int) -> str:
    return f"{n} attempt{'s' if n != 1 else ''}"


def _throttled(location: str, tries: int, code: str) -> LocationError:
    return LocationError(f"S3 is throttling requests for {location} ({code}) after {_attempts(tries)}: "
                         "too many requests to this bucket at once; try again later")


def _gave_up(location: str, tries: int, reason: str) -> LocationError:
    return LocationError(f"gave up on {location} after {_attempts(tries)} ({reason}); "
                         "the network or the S3 endpoint is failing: try again later")


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

                client = boto3.session.Session().client(
                    "s3",
                    config=Config(
                        retries={"total_max_attempts": config.S3_MAX_ATTEMPTS, "mode": config.S3_RETRY_MODE},
                        max_pool_connections=config.S3_WORKERS * 2,
                        connect_timeout=config.S3_CONNECT_TIMEOUT,
                        read_timeout=config.S3_READ_TIMEOUT,
                    ),
                )
                client.meta.events.register_first("needs-retry.s3", _stop_retrying)
                client.meta.events.register("before-send.s3", _count_try)
                self._clients[endpoint] = client
            return self._clients[endpoint]

    def _call(self, location: str, fn: Callable[[], Any]) -> Any:
        """Run `fn`, the requests for one object, within the object's budget of tries and time
        (`_Tries`); read a body again, with backoff and jitter, when it arrived cut or damaged."""
        from botocore.exceptions import BotoCoreError, ClientError

        _TRIES.restart()
        try:
            while True:
                try:
                    return fn()
                except _CorruptBody as exc:
                    _TRIES.last = str(exc)
                    if _TRIES.spent():
                        raise _gave_up(location, _TRIES.count, str(exc)) from None
                    backoff = min(4.0, 0.1 * 2**_TRIES.count) * random.uniform(0.5, 1.5)
                    time.sleep(max(0.0, min(backoff, _TRIES.deadline - time.monotonic())))
        except _OutOfTime:
            if _TRIES.last in _THROTTLING_CODES:
                raise _throttled(location, _TRIES.count, _TRIES.last) from None
            reason = f"no complete answer within {_TRIES.deadline - _TRIES.started:.0f} s"
            raise _gave_up(location, _TRIES.count, f"{reason}; last: {_TRIES.last}" if _TRIES.last else reason) from None
        except (ClientError, BotoCoreError) as exc:
            raise _explain_s3_error(exc, location, _TRIES.count) from None
        finally:
            _TRIES.started = None

    def list(self, location: str) -> list[ObjectInfo]:
        bucket, key = parse_s3(location)
        # A location names a "folder": list below it, not keys that merely share its prefix.
        prefix = key if not key or key.endswith("/") else key + "/"

        def list_all() -> list[dict[str, Any]]:
            found = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found.extend(page.get("Contents", []))
                _TRIES.restart()  # each page is one request, with tries and a deadline of its own
            return found

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

    def _head(self, bucket: str, key: str, **extra: Any) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=bucket, Key=key, **extra)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def read_bytes(self, location: str) -> bytes:
        bucket, key = parse_s3(location)

        # ChecksumMode asks for the object's checksum, which botocore then checks as the body ends
        # (botocore before 1.36 does not ask by itself).
        return self._call(location, lambda: _read_body(self.client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")))

    def write_bytes(self, location: str, data: bytes) -> None:
        bucket, key = parse_s3(location)
        if not key:
            raise LocationError(f"{location} names a bucket, not an object: add a key")
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        # S3 checks the body against both on arrival, and keeps the CRC32 with the object: where the
        # ETag is no MD5 (KMS or customer keys), that is how a read or `holds` checks the content.
        self._call(location, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=md5,
                                                            ChecksumAlgorithm="CRC32"))

    def holds(self, obj: ObjectInfo, data: bytes) -> bool:
        """Whether the listed object `obj` holds exactly `data`: the ETag tells where it is the
        MD5; else (KMS or customer keys, multipart) a checksum S3 keeps with it, fetched by a HEAD.
        False when there is none that can be compared."""
        if obj.size != len(data):
            return False
        if obj.version == _md5_hex(data):
            return True
        bucket, key = parse_s3(obj.location)
        head = self._call(obj.location, lambda: self._head(bucket, key, ChecksumMode="ENABLED"))
        for field, digest in _CHECKSUMS.items():
            stored = (head or {}).get(field)
            if stored and "-" not in stored:  # "...-N" is a checksum of part checksums
                return base64.b64decode(stored) == digest(data)
        return False

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


def upload_file(path: Path, location: str) -> None:
    """Copy the local file `path` to `location` whole, streamed from disk (S3 multipart for a large
    file), so that memory does not grow with the file."""
    import shutil

    if not is_remote(location):
        target = Path(location).expanduser()
        part = target.with_name(f".{target.name}.part")
        shutil.copyfile(path, part)
        os.replace(part, target)
        return
    from boto3.exceptions import S3UploadFailedError

    bucket, key = parse_s3(location)
    if not key:
        raise LocationError(f"{location} names a bucket, not an object: add a key")
    client = _S3.client
    try:
        _S3._call(location, lambda: client.upload_file(str(path), bucket, key, ExtraArgs={"ChecksumAlgorithm": "CRC32"}))
    except S3UploadFailedError as exc:
        raise LocationError(f"cannot upload {path} to {location}: {exc}; check the bucket and your permissions") from None


def download_file(location: str, path: Path) -> None:
    """Copy the object at `location` into the local file `path`, streamed to disk, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    bucket, key = parse_s3(location)
    client = _S3.client
    _S3._call(location, lambda: client.download_file(bucket, key, str(part)))
    os.replace(part, path)


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
    """Copy the images below `src` (DICOMs without an extension too) to `dest`, keeping relative
    paths; skip objects already there with the same content (by size and MD5, or where the ETag is
    no MD5, as in a bucket encrypted with KMS keys, by the checksum S3 keeps), so a re-run sends only
    what is missing or changed."""
    src_objects = list_objects(str(src))
    if not src_objects:
        raise LocationError(f"{src}: no files to upload")

    from xraylib import dicom

    def is_image(obj: ObjectInfo) -> bool:
        return obj.relpath.lower().endswith(suffixes) or (
            dicom.has_no_extension(obj.relpath) and dicom.is_dicom(read_bytes(obj.location)))

    chosen = parallel_map(is_image, src_objects)
    wanted = [o for o, keep in zip(src_objects, chosen, strict=True) if keep]
    ignored = tuple(o.relpath for o, keep in zip(src_objects, chosen, strict=True) if not keep)
    try:
        present = {o.relpath: o for o in list_objects(dest)}
    except LocationError:
        if not is_remote(dest):
            present = {}
        else:
            raise

    def send(obj: ObjectInfo) -> bool:
        data = read_bytes(obj.location)
        current = present.get(obj.relpath)
        if current is not None and _handler(dest).holds(current, data):
            return False
        write_bytes(join(dest, obj.relpath), data)
        return True

    sent = parallel_map(send, wanted)
    return UploadReport(uploaded=sum(sent), unchanged=len(sent) - sum(sent), ignored=ignored)
