"""A real S3-compatible server on loopback, for the demo and the tests.

`local_s3_server()` starts moto's server mode (`moto[server]`) in a child process on a free
port and points boto3 at it through its own `AWS_ENDPOINT_URL`, with throwaway credentials;
everything xraylib does then goes over HTTP exactly as it would to AWS.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from xraylib.errors import ConfigError

# Throwaway values: the local server accepts any credentials, and these can never reach AWS
# because AWS_ENDPOINT_URL sends every request to loopback.
LOCAL_ENV = {
    "AWS_ACCESS_KEY_ID": "local-test-key",
    "AWS_SECRET_ACCESS_KEY": "local-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class LocalS3Server:
    endpoint_url: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        """The environment variables that make boto3 (and a child process) use this server."""
        return {**LOCAL_ENV, "AWS_ENDPOINT_URL": self.endpoint_url}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_s3(port: int | None = None, timeout: float = 30.0, env: dict[str, str] | None = None) -> LocalS3Server:
    """Start moto's S3 server on 127.0.0.1 and wait until it answers. `env` adds settings of
    moto's own (e.g. INITIAL_NO_AUTH_ACTION_COUNT, to have it check credentials and IAM policies)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise ConfigError("the local S3 server needs moto's server mode: pip install 'moto[server]'") from None
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"the local S3 server exited at start (code {process.returncode}); is port {port} free?")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return LocalS3Server(url, process)
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise ConfigError(f"the local S3 server did not answer on {url} within {timeout:.0f}s")


@contextmanager
def local_s3_server() -> Iterator[LocalS3Server]:
    """Run a loopback S3 server, with this process's boto3 pointed at it, for the `with` block."""
    server = start_local_s3()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def create_bucket(name: str) -> None:
    """Create a bucket on whatever endpoint boto3 is pointed at (the local server)."""
    import boto3

    boto3.session.Session().client("s3").create_bucket(Bucket=name)


def delete_bucket(name: str, endpoint_url: str | None = None) -> None:
    """Delete a bucket and every object version in it, on `endpoint_url` (default: wherever boto3
    is pointed). The local server keeps each object over a few MB in a temporary file until the
    object is deleted, so a long test session that leaves its models behind fills the disk."""
    import boto3

    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint_url)
    while True:  # the first page again each time: a page after deletions is not where it was
        page = s3.list_object_versions(Bucket=name)
        doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                  for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if not doomed:
            break
        for start in range(0, len(doomed), 1000):  # DeleteObjects takes at most 1,000 keys
            s3.delete_objects(Bucket=name, Delete={"Objects": doomed[start:start + 1000], "Quiet": True})
    s3.delete_bucket(Bucket=name)
