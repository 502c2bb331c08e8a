"""Shared fixtures: offline Prefect settings, one LocalCluster and one Prefect harness."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

# Before anything imports prefect: stay offline, keep PREFECT_HOME out of the repo.
_PREFECT_HOME = tempfile.mkdtemp(prefix="zf-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
import zarr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def two_workers(memory_limit: str, *, set_as_default: bool = False):
    """A real LocalCluster of 2 worker processes × 1 thread (BLAS single-threaded too)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        memory_limit=memory_limit,
        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    with Client(cluster, set_as_default=set_as_default) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="session")
def client():
    """A real 2-worker LocalCluster (processes) shared by the session, set as default."""
    with two_workers("4GiB", set_as_default=True) as c:
        yield c


@pytest.fixture(scope="session")
def prefect_server():
    """The session's lasting Prefect server (``factorize server start``) in its
    ``PREFECT_HOME``: every ``factorize run`` subprocess of the session uses it, as a
    user's runs do, instead of starting a temporary server each (5–20 s apiece here).
    Stopped at the end; its idle timeout ends it should the session die first."""
    from pipeline.lifetime import start_owned_server, stop_owned_server

    server, _ = start_owned_server(port=free_port(), idle_minutes=15)
    yield server
    stop_owned_server(timeout=5)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args, cwd=None, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """``factorize ARGS…`` as a user runs it, output captured as text."""
    return subprocess.run(
        [*factorize_cmd(), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test database for the session; heartbeats off (each costs ~1 s a run)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


def write_array(path: Path, data: np.ndarray, chunks=None, zarr_format: int = 3, name=None):
    """Write ``data`` as a Zarr array at ``path`` (or as ``name`` inside a group)."""
    chunks = chunks or data.shape
    if name is None:
        arr = zarr.create_array(
            store=str(path),
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            zarr_format=zarr_format,
            overwrite=True,
        )
    else:
        root = zarr.open_group(str(path), mode="a", zarr_format=zarr_format)
        arr = root.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
    if data.size:
        arr[...] = data
    return arr


def job_dict(tmp_path: Path, input_url: str, **over) -> dict:
    """A minimal valid job mapping writing under ``tmp_path/out``."""
    job = {
        "name": "job",
        "input": {"url": input_url},
        "methods": [{"method": "tsqr"}],
        "output": {"url": str(tmp_path / "out")},
    }
    job.update(over)
    return job


def write_job(tmp_path: Path, job: dict, filename: str = "job.yaml") -> Path:
    """Write a job mapping as YAML and return its path."""
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def one_line_exit(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one stderr line of a finished ``factorize`` process that exited with ``code``,
    after checking that neither stdout nor stderr holds a traceback."""
    assert proc.returncode == code, proc.stdout[-4000:] + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-4000:]
    return lines[0]


def factorize_cmd() -> list[str]:
    """The installed console script (same interpreter as the tests)."""
    exe = Path(sys.executable).with_name("factorize")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]


def cond_matrix(m: int, n: int, kappa: float, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """A random m × n matrix with singular values log-spaced from 1 to 1/kappa."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return ((u * np.logspace(0, -np.log10(kappa), n)) @ v.T).astype(dtype)


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 for the session (see tests/s3server.py)."""
    from s3server import moto_server

    with moto_server() as server:
        yield server


class _RunSpecWarnings(logging.Handler):
    """Collects the scheduler's "Detected different `run_spec`" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "run_spec" in message:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_run_spec_redefinitions():
    """Fail any test whose jobs made an in-process scheduler (the session ``client``'s, or
    a test's own LocalCluster) see a key redefined with a different task — distributed's
    "Detected different `run_spec`" warning, which can end in failures and deadlocks."""
    handler = _RunSpecWarnings()
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addHandler(handler)
    try:
        yield handler
    finally:
        scheduler_log.removeHandler(handler)
    if handler.messages:
        pytest.fail(f"the scheduler saw a key redefined: {handler.messages[0][:300]}")
