"""Shared fixtures and the suite's two tiers.

Tiers (see README, Development): a test is ``e2e`` when it uses a fixture that starts real
processes or servers (:data:`E2E_FIXTURES`: the process cluster, Prefect servers, moto's
S3, the ``factorize`` CLI) or is marked ``e2e`` by hand (the few that start processes
themselves). The marks are set here at collection; ``pytest -m "not e2e"`` is the fast
tier, in which starting a process fails the test (:func:`_fast_tier_starts_no_process`),
so a test cannot slip into the wrong tier unnoticed.

Modules import no Prefect, Dask, distributed or Zarr at import time (collection stays
fast): those imports live in the tests and fixtures that use them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

# Before anything imports prefect: stay offline, keep PREFECT_HOME out of the repo. Under
# pytest-xdist each worker has a home of its own (its own lasting server, database, record).
_PREFECT_HOME = os.environ.get("PREFECT_HOME") or tempfile.mkdtemp(prefix="zf-prefect-home-")
if os.environ.get("PYTEST_XDIST_WORKER"):
    _PREFECT_HOME = str(Path(_PREFECT_HOME) / os.environ["PYTEST_XDIST_WORKER"])
    Path(_PREFECT_HOME).mkdir(parents=True, exist_ok=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# One BLAS thread per thread of work: the in-process cluster's 2 worker threads, the
# worker processes and a second pytest-xdist worker share 2 cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Fixtures that start real processes or servers: a test using any of them (directly or
# through another fixture) is in the end-to-end tier.
E2E_FIXTURES = frozenset(
    {
        "dist_client",  # the session's LocalCluster of worker processes
        "prefect_server",  # the session's lasting Prefect server
        "prefect_harness",  # in-process flow runs on the lasting server
        "s3",  # moto's S3 server
        "cli",  # `factorize …` subprocesses (run_cli)
        "cluster_client",  # test_worker_faults: a fresh process cluster per test
        "small_client",  # test_worker_faults: a process cluster of small workers
        "scheduler_file",  # test_cluster_kinds: a dask scheduler process
        "prefect_home",  # test_interrupt: runs with their own temporary servers
    }
)


# Modules whose end-to-end tests take longest (minutes on 2 cores): under pytest-xdist they
# start first, and the fast modules fill in around them. Only an order: a module missing
# here runs all the same.
LONGEST_FIRST = (  # measured: --durations=0 of a CI run, seconds per module, longest first
    "test_sparse",
    "test_operations",
    "test_benchmarks",
    "test_plan",
    "test_s3",
    "test_nmf",
    "test_credentials",
    "test_server",
    "test_interrupt",
    "test_cli",
    "test_device",
    "test_compress",
    "test_als",
    "test_linalg_api",
    "test_flow",
    "test_worker_faults",
    "test_progress",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def order(item: pytest.Item) -> int:
        name = item.module.__name__.rpartition(".")[2]
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=order)  # stable: the order within a module is kept
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """In a test that is not ``e2e``, starting a process fails the test: the fast tier
    stays fast, and a test that needs a process says so (a fixture of E2E_FIXTURES, or
    ``@pytest.mark.e2e``)."""
    if request.node.get_closest_marker("e2e") is not None:
        return

    import multiprocessing.process

    from distributed import Nanny

    message = (
        f"{request.node.nodeid} starts a process but is not marked e2e: use a fixture "
        "of conftest.E2E_FIXTURES (cli, dist_client, …) or mark it @pytest.mark.e2e"
    )

    def refuse(*args, **kwargs):
        raise AssertionError(message)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    # A process cluster's nanny: refused when made, the cluster fails to start at once (a
    # nanny whose process fails to start leaves a LocalCluster waiting for it).
    monkeypatch.setattr(Nanny, "__init__", refuse)


# --------------------------------------------------------------------------- clusters


@pytest.fixture(scope="session", autouse=True)
def _workers_forked_from_a_preloaded_server():
    """The worker processes of the clusters this process starts are forked from one
    forkserver that imported distributed, numpy and the rest once (distributed's own suite
    does the same): a LocalCluster of 2 workers starts in ~0.3 s instead of ~2.5 s of two
    fresh interpreters importing them, which the suite does dozens of times. BLAS threads are
    1 in the forkserver already (set above). The product's ``spawn`` is what every
    ``factorize`` subprocess of the suite uses (dask's config is not inherited)."""
    import dask

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        yield


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
    """The fast tier's cluster, the session's default client: a real distributed scheduler
    with 2 workers × 1 thread in this process (no process to start, nothing pickled
    between processes)."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster:
        with Client(cluster, set_as_default=True) as c:
            yield c


@pytest.fixture(scope="session")
def dist_client():
    """A real 2-worker LocalCluster of processes shared by the session (end-to-end tier),
    passed explicitly (``run_job(client=…)``) or by its address (``kind: address`` jobs of
    CLI subprocesses and flow runs); not the default client."""
    with two_workers("4GiB") as c:
        yield c


# --------------------------------------------------------------------------- servers


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


@pytest.fixture(scope="session")
def prefect_harness(prefect_server):
    """Flow runs in this process against the session's lasting Prefect server (no second
    server: every test that needs one shares it); heartbeats off (each costs ~1 s a run)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    updates = {PREFECT_API_URL: prefect_server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    with temporary_settings(updates=updates):
        yield


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 for the session (see tests/s3server.py)."""
    from s3server import moto_server

    with moto_server() as server:
        yield server


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- the CLI


def factorize_cmd() -> list[str]:
    """The installed console script (same interpreter as the tests)."""
    exe = Path(sys.executable).with_name("factorize")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]


def run_cli(
    *args,
    cwd=None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    home: Path | None = None,
    stdout=None,
) -> subprocess.CompletedProcess:
    """``factorize ARGS…`` as a user runs it, output captured as text.

    ``env``: variables added to (a value of ``None``: removed from) this process's
    environment. ``home``: a ``PREFECT_HOME`` of its own (created), without this
    session's ``PREFECT_API_URL``: the run starts a temporary server there. ``stdout``: a
    file to write the output to instead of capturing it.
    """
    full_env = None
    if env is not None or home is not None:
        full_env = dict(os.environ)
        if home is not None:
            home.mkdir(parents=True, exist_ok=True)
            full_env["PREFECT_HOME"] = str(home)
            full_env.pop("PREFECT_API_URL", None)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
    return subprocess.run(
        [*factorize_cmd(), *map(str, args)],
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def cli():
    """:func:`run_cli`, for a test that runs ``factorize`` (which makes it ``e2e``)."""
    return run_cli


def one_line_exit(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one stderr line of a finished ``factorize`` process that exited with ``code``,
    after checking that neither stdout nor stderr holds a traceback."""
    assert proc.returncode == code, (proc.stdout or "")[-4000:] + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in (proc.stdout or "") + proc.stderr, (proc.stdout or "")[-4000:]
    return lines[0]


# --------------------------------------------------------------------------- killing runs

RUN_SCRIPT = """
import sys
from pipeline import run_job
if __name__ == "__main__":
    run_job(sys.argv[1])
"""


def kill_at_checkpoint(tmp_path: Path, job: dict, iteration: int, timeout: float = 240) -> int:
    """Run ``job`` in a process of its own (its own cluster), SIGKILL the whole process
    group once its checkpoint has reached ``iteration``; return the checkpoint's iteration.
    The run must not have finished by then, nor published anything."""
    import json
    import signal
    import time

    path = write_job(tmp_path, job)
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], cwd=REPO, start_new_session=True
    )
    out = Path(job["output"]["url"])
    state = out / f".{job['name']}.checkpoint" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run finished before it could be killed"
        if state.exists() and json.loads(state.read_text())["iteration"] >= iteration:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / job["name"]).exists()
    return json.loads(state.read_text())["iteration"]


def kill_worker_running(client, prefix: str, stop) -> float | None:
    """SIGKILL the worker process running a task whose key starts with ``prefix``; return
    when it was killed (``None`` when ``stop`` was set first: the job ended)."""
    import signal
    import time

    pids = client.run(os.getpid)
    while not stop.is_set():
        for worker, keys in client.processing().items():
            if any(str(key).strip("('").startswith(prefix) for key in keys):
                os.kill(pids[worker], signal.SIGKILL)
                return time.perf_counter()
        time.sleep(0.01)
    return None


# --------------------------------------------------------------------------- data and jobs


def write_array(path: Path, data: np.ndarray, chunks=None, zarr_format: int = 3, name=None):
    """Write ``data`` as a Zarr array at ``path`` (or as ``name`` inside a group)."""
    import zarr

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


def write_anndata(path: Path, x, obs_names=None, var_names=None) -> Path:
    """``x`` (scipy.sparse or dense) as an AnnData store (Zarr v3) written by ``anndata``
    itself, with ``X`` CSR; rows and columns named ``obs_names``/``var_names`` if given."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    adata = ad.AnnData(X=sp.csr_matrix(x))
    if obs_names is not None:
        adata.obs = pd.DataFrame(index=pd.Index([str(v) for v in obs_names]))
    if var_names is not None:
        adata.var = pd.DataFrame(index=pd.Index([str(v) for v in var_names]))
    with ad.settings.override(zarr_write_format=3):
        adata.write_zarr(path)
    return path


def write_model(path: Path, seed: int = 0) -> Path:
    """A small safetensors checkpoint (written by ``safetensors``) every model method
    accepts: three float32 matrices with decaying spectra, a bias and an int tensor."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)

    def layer(m: int, n: int) -> np.ndarray:
        scale = np.exp(-np.arange(n) / 4.0)
        return (rng.standard_normal((m, n)) * scale) @ np.linalg.qr(rng.random((n, n)))[0]

    tensors = {
        "layers.0.attn.weight": layer(64, 48),
        "layers.0.attn.bias": rng.standard_normal(64),
        "layers.0.mlp.weight": layer(96, 48),
        "layers.1.mlp.weight": layer(48, 96).T.copy(),
        "position_ids": np.arange(16, dtype=np.int64).reshape(1, 16),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in tensors.items()},
        str(path),
    )
    return path


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


def cond_matrix(m: int, n: int, kappa: float, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """A random m × n matrix with singular values log-spaced from 1 to 1/kappa."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return ((u * np.logspace(0, -np.log10(kappa), n)) @ v.T).astype(dtype)


# --------------------------------------------------------------------------- scheduler checks


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
    """Fail any test whose jobs made an in-process scheduler (the ``client``'s and
    ``dist_client``'s, or a test's own LocalCluster) see a key redefined with a different
    task — distributed's "Detected different `run_spec`" warning, which can end in
    failures and deadlocks."""
    handler = _RunSpecWarnings()
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addHandler(handler)
    try:
        yield handler
    finally:
        scheduler_log.removeHandler(handler)
    if handler.messages:
        pytest.fail(f"the scheduler saw a key redefined: {handler.messages[0][:300]}")
