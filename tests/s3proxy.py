"""An HTTP reverse proxy on loopback between boto3 and the S3 server, for tests and benchmarks.

It forwards every request to the upstream server and can, per request:
- count it (method and path), so a test can assert that a warm cache makes no GET;
- add latency before answering (real S3's time to first byte);
- inject faults: drop the connection before answering, reset it (RST), answer 503 SlowDown as S3
  does when throttling, send the headers with the full Content-Length and then only part of the
  body before closing, send a body of the right length with one byte changed, or send half the
  body and then nothing (a stalled read);
- with `kms`, answer as S3 does for objects encrypted with SSE-KMS: the ETag, in headers and in
  listings, is no MD5 of the body, and `x-amz-server-side-encryption: aws:kms` says so.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Faults:
    """Probabilities per request; `only_methods` limits faults to those methods, `limit` to that many
    faults in all (then every request passes), so `throttle=1.0, limit=2` throttles the first two."""

    drop: float = 0.0
    reset: float = 0.0
    throttle: float = 0.0
    cut_body: float = 0.0
    corrupt_body: float = 0.0
    stall_body: float = 0.0
    stall_seconds: float = 60.0
    only_methods: tuple[str, ...] = ("GET", "PUT", "HEAD")
    limit: int | None = None
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message><RequestId>R1</RequestId></Error>")
_LISTED_ETAG = re.compile(rb"<ETag>(&quot;|&#34;|\")?([^<&\"]+)(&quot;|&#34;|\")?</ETag>")


def kms_etag(etag: str) -> str:
    """The ETag S3 would give an SSE-KMS object: stable for one version, but no MD5 of its body."""
    return hashlib.md5(b"kms:" + etag.strip('"').encode(), usedforsecurity=False).hexdigest()


class S3Proxy:
    def __init__(self, upstream: str, *, latency: float = 0.0, faults: Faults | None = None, kms: bool = False) -> None:
        self.upstream = urlsplit(upstream)
        self.latency = latency
        self.faults = faults or Faults()
        self.kms = kms
        self._closing = threading.Event()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = self.path.split("?", 1)[0]
                with proxy._lock:
                    proxy.requests[(self.command, path)] += 1
                    fault = proxy._pick_fault(self.command)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "throttle":
                    self.send_response_only(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOW_DOWN)
                    return
                if proxy.latency:
                    time.sleep(proxy.latency)
                conn = proxy._upstream_connection()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException):
                    proxy._local.conn = None
                    self.send_error(502)
                    return
                self.send_response_only(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        continue
                    if proxy.kms and key.lower() == "etag":
                        value = f'"{kms_etag(value)}"'
                    self.send_header(key, value)
                if proxy.kms and response.status < 300 and self.command in ("GET", "HEAD", "PUT"):
                    self.send_header("x-amz-server-side-encryption", "aws:kms")
                    self.send_header("x-amz-server-side-encryption-aws-kms-key-id",
                                     "arn:aws:kms:us-east-1:000000000000:key/test")
                if proxy.kms and b"<ListBucketResult" in data[:200]:
                    data = _LISTED_ETAG.sub(lambda m: b"<ETag>&quot;" + kms_etag(m.group(2).decode()).encode()
                                            + b"&quot;</ETag>", data)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "cut_body" and len(data) > 1:
                    self.wfile.write(data[: proxy.faults.rng.randrange(0, len(data))])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "stall_body" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    proxy._closing.wait(proxy.faults.stall_seconds)
                    self.close_connection = True
                    return
                if fault == "corrupt_body" and data:
                    at = proxy.faults.rng.randrange(0, len(data))
                    data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _pick_fault(self, method: str) -> str | None:
        f = self.faults
        if method not in f.only_methods or (f.limit is not None and sum(self.injected.values()) >= f.limit):
            return None
        r = f.rng.random()
        for name, p in (("drop", f.drop), ("reset", f.reset), ("throttle", f.throttle), ("cut_body", f.cut_body),
                        ("corrupt_body", f.corrupt_body), ("stall_body", f.stall_body)):
            if r < p:
                self.injected[name] += 1
                return name
            r -= p
        return None

    def _upstream_connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
            self._local.conn = conn
        return conn

    def count(self, method: str, path_prefix: str = "") -> int:
        with self._lock:
            return sum(n for (m, p), n in self.requests.items() if m == method and p.startswith(path_prefix))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.injected.clear()

    def __enter__(self) -> S3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()  # ends stalled answers
        self.server.shutdown()
        self.server.server_close()
