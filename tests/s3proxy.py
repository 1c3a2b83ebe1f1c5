"""An HTTP reverse proxy on loopback between boto3 and the S3 server, for tests and benchmarks.

It forwards every request to the upstream server and can, per request:
- count it (method and path), so a test can assert that a warm cache makes no GET;
- add latency before answering (real S3's time to first byte);
- inject faults: drop the connection before answering, reset it (RST), or send the headers
  with the full Content-Length and then only part of the body before closing.
"""

from __future__ import annotations

import http.client
import random
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
    """Probabilities per request; `only_methods` limits faults to those methods."""

    drop: float = 0.0
    reset: float = 0.0
    cut_body: float = 0.0
    only_methods: tuple[str, ...] = ("GET", "PUT", "HEAD")
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


class S3Proxy:
    def __init__(self, upstream: str, *, latency: float = 0.0, faults: Faults | None = None) -> None:
        self.upstream = urlsplit(upstream)
        self.latency = latency
        self.faults = faults or Faults()
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
                    if key.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
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
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _pick_fault(self, method: str) -> str | None:
        f = self.faults
        if method not in f.only_methods:
            return None
        r = f.rng.random()
        for name, p in (("drop", f.drop), ("reset", f.reset), ("cut_body", f.cut_body)):
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
        self.server.shutdown()
        self.server.server_close()
