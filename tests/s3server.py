"""A real S3-compatible server on 127.0.0.1 for tests: moto's, in a thread of the test process.

Subprocesses (``factorize run``) reach it over TCP like any S3 endpoint.
``stalled_server`` accepts connections and never answers, for timeout tests;
``StallingProxy`` forwards to a real server until told to stall, for stalls mid-run.
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


class StallingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (``http://host:port``) that
    forwards faithfully until :meth:`stall`; from then on it accepts connections and
    holds every byte, as an endpoint that stopped answering mid-run does."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self._target = (host, int(port))
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._stalled = threading.Event()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        """The proxy's URL, to use as ``endpoint_url``."""
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def stall(self) -> None:
        """Stop answering: requests in flight and new ones wait for ever."""
        self._stalled.set()

    def close(self) -> None:
        """Close every connection and the listening socket."""
        self._stop.set()
        for conn in list(self._conns):
            conn.close()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            if self._stalled.is_set():
                continue  # held open, never answered
            upstream = socket.create_connection(self._target)
            self._conns.append(upstream)
            for src, dst in ((conn, upstream), (upstream, conn)):
                pump = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self._stalled.is_set() and not self._stop.is_set():
                    self._stop.wait(0.5)
                if self._stop.is_set():
                    return
                dst.sendall(data)
        except OSError:
            pass
