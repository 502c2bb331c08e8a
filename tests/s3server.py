"""A real S3-compatible server on 127.0.0.1 for tests: moto's, in a thread of the test process.

Subprocesses (``factorize run``) reach it over TCP like any S3 endpoint. ``StalledServer``
accepts connections and never answers, for timeout tests.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Any key works with moto; these are the job's credentials in tests (never real ones).
ACCESS_KEY = "AKIAZFTESTKEY0000001"
SECRET_KEY = "zf-test-secret-Qx81vB2Lm9"


@dataclass(frozen=True)
class S3:
    """A running S3 endpoint and the storage options that reach it."""

    endpoint: str
    server: Any

    def storage_options(self, **over: Any) -> dict[str, Any]:
        """fsspec/s3fs options for this endpoint with literal test credentials."""
        opts = {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "endpoint_url": self.endpoint,
        }
        opts.update(over)
        return opts

    def filesystem(self) -> Any:
        """A fresh s3fs filesystem on this endpoint (no instance cache)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def make_bucket(self, name: str) -> str:
        """Create ``name`` and return ``s3://name``."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def reset(self) -> None:
        """Drop every bucket (moto's reset endpoint)."""
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[S3]:
    """Start moto's S3 server on a free port of 127.0.0.1; stop it on exit."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3(endpoint=f"http://127.0.0.1:{port}", server=server)
    finally:
        server.stop()


@contextmanager
def stalled_server() -> Iterator[str]:
    """An endpoint that accepts TCP connections and never sends a byte; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)  # keep it open, say nothing
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        sock.close()
