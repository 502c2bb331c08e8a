"""The device (GPU) backend, proven on the CPU with an emulated device, and on a real GPU
under the ``gpu`` marker.

The emulated device (:mod:`tests.fake_device`) refuses what cupy refuses (implicit
conversion to numpy, numpy arrays mixed into device arithmetic) and counts what crosses
between host and device. Every method runs as a job with ``compute.backend: cupy`` on a
real threaded LocalCluster (the emulation lives in this process), and the tests check

* the jobs complete, factors and metrics equal the numpy run's to rounding;
* every block kernel received a device block for every row block, never a numpy one;
* the client never received a device array (everything gathered is host numpy);
* blocks reach the device once per read (host → device copies of the input's size).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pipeline import backend
from pipeline.errors import ConfigError
from pipeline.methods import METHODS
from tests.conftest import factorize_cmd, job_dict, one_line_exit, write_array
from tests.fake_device import DEVICE, KERNEL_BLOCKS, STATS, FakeDeviceArray, xp


def run_job(*args: Any, **kwargs: Any) -> dict:
    """:func:`pipeline.run_job`, imported on first use (collection imports no Dask)."""
    from pipeline import run_job

    return run_job(*args, **kwargs)


# --------------------------------------------------------------------------- the emulation


def test_emulated_device_refuses_what_cupy_refuses():
    host = np.arange(6.0).reshape(3, 2)
    STATS.reset()
    d = xp.asarray(host)
    assert STATS.transfers == 1 and STATS.transferred_bytes == host.nbytes
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(d)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array(d)
    for mixed in (lambda: d + np.ones(2), lambda: np.ones(2) * d, lambda: d @ np.eye(2)):
        with pytest.raises(TypeError, match="Unsupported type"):
            mixed()
    with pytest.raises(TypeError, match="Unsupported type"):
        xp.concatenate([d, host])
    with pytest.raises(TypeError, match="Unsupported type"):
        d[0] = np.zeros(2)
    with pytest.raises(AttributeError):
        xp.random.default_rng(0)
    host_copy = np.zeros((3, 2))
    with pytest.raises(TypeError, match="Implicit conversion"):
        host_copy[...] = d


def test_emulated_device_computes_like_numpy_and_counts_syncs():
    from tests import fake_device

    host = np.random.default_rng(0).standard_normal((5, 3))
    d = xp.asarray(host)
    STATS.reset()
    g = d.T @ d
    total = xp.trace(g)
    assert isinstance(g, FakeDeviceArray) and isinstance(total, FakeDeviceArray)
    assert total.shape == () and STATS.syncs == 0  # reductions stay on the device
    assert float(total) == pytest.approx(np.trace(host.T @ host))
    assert STATS.syncs == 1
    np.testing.assert_array_equal(g.get(), host.T @ host)
    assert STATS.syncs == 2
    q, r = xp.linalg.qr(d)
    assert isinstance(q, FakeDeviceArray)
    np.testing.assert_allclose((q @ r).get(), host, atol=1e-14)
    d2 = d * np.float64(2.0) + 1  # numpy scalars and Python numbers are fine
    np.testing.assert_array_equal(d2.get(), host * 2 + 1)
    buf = xp.empty((2, 3))
    buf[...] = d[:2]  # views alias like device memory does
    buf -= d[:2]
    assert float(xp.abs(buf).max()) == 0.0
    out = xp.empty((5, 5))
    assert xp.matmul(d, d.T, out=out) is out
    x = fake_device.solve_triangular(xp.asarray(np.triu(host[:3])), d[:3], lower=False)
    assert isinstance(x, FakeDeviceArray)


def test_backend_helpers_move_data_only_explicitly():
    previous = backend.set_device(DEVICE)
    try:
        block = np.ones((4, 2), dtype=np.int16)
        d = backend.to_device(block, np.float64)
        assert backend.is_device(d) and d.dtype == np.float64
        assert backend.array_module(d) is xp and backend.array_module(block) is np
        small = backend.like_block(np.eye(2), d)
        assert backend.is_device(small)
        assert backend.to_host(d @ small).dtype == np.float64
        assert not backend.is_device(np.float64(1.0))
        np.testing.assert_array_equal(
            backend.gaussian(3, (2, 2), np.float32), backend.gaussian(3, (2, 2), np.float32)
        )
    finally:
        backend.set_device(previous)


# --------------------------------------------------------------------------- jobs on the device

# Block kernels whose first argument is a row block (of A, or of a tall factor formed on the
# cluster): (module, function name).
BLOCK_KERNELS = [
    ("pipeline.linalg._kernels", "factor_block"),
    ("pipeline.linalg._kernels", "block_q"),
    ("pipeline.linalg.rsvd", "_power_block"),
    ("pipeline.linalg.rsvd", "_times_omega"),
    ("pipeline.linalg.rsvd", "_times_small"),
    ("pipeline.linalg.rsvd", "_block_cross"),
    ("pipeline.linalg.rsvd", "_psi_times"),
    ("pipeline.linalg.rsvd", "_block_stats"),
    ("pipeline.linalg.rsvd", "_block_extremes"),
    ("pipeline.linalg.nmf", "block_step"),
    ("pipeline.linalg.nmf", "block_stats"),
    ("pipeline.linalg.nmf", "_signed_sumsq"),
    ("pipeline.metrics", "_block_residual_sq"),
    ("pipeline.metrics", "_block_gram"),
    ("pipeline.metrics", "_block_sumsq"),
]


@dataclasses.dataclass
class Seen:
    """What the spied kernels received and what the client gathered."""

    blocks: dict[str, list[str]] = dataclasses.field(default_factory=lambda: KERNEL_BLOCKS)
    gathered_device: list[str] = dataclasses.field(default_factory=list)

    def kernel_types(self) -> set[str]:
        return {t for types in self.blocks.values() for t in types}


def _device_arrays_in(obj: Any, seen: set[int] | None = None) -> list[str]:
    """Paths of device arrays anywhere inside ``obj`` (containers and dataclasses)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, FakeDeviceArray):
        return [repr(obj)]
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in _device_arrays_in(v, seen)]
    if isinstance(obj, list | tuple | set):
        return [p for v in obj for p in _device_arrays_in(v, seen)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [p for f in dataclasses.fields(obj) for p in _device_arrays_in(getattr(obj, f.name))]
    return []


@pytest.fixture
def device_spies(monkeypatch) -> Iterator[Seen]:
    """The emulated device installed; block kernels and the client's gather spied on."""
    import importlib

    from distributed import Client

    from tests import fake_device

    seen = Seen()
    for module_name, name in BLOCK_KERNELS:
        module = importlib.import_module(module_name)
        real = getattr(module, name)

        takes_info = "block_info" in inspect.signature(real).parameters

        def spy(block, *args, _real=real, _name=name, _info=takes_info, block_info=None, **kw):
            fake_device.record_kernel(_name, block)
            if _info:  # map_blocks passes block_info only to functions that name it
                kw["block_info"] = block_info
            return _real(block, *args, **kw)

        monkeypatch.setattr(module, name, spy)
    real_gather = Client.gather

    def gather(self, futures, *args, **kwargs):
        result = real_gather(self, futures, *args, **kwargs)
        seen.gathered_device.extend(_device_arrays_in(result))
        return result

    monkeypatch.setattr(Client, "gather", gather)
    previous = backend.set_device(DEVICE)
    STATS.reset()
    KERNEL_BLOCKS.clear()
    yield seen
    backend.set_device(previous)


@pytest.fixture
def threaded_client(client):
    """The session's LocalCluster of threads (``client``): the emulated device lives in
    this process."""
    return client


ROWS, COLS, CHUNK = 3000, 12, 500  # 6 row blocks

# Every registered method runs its registry ``example`` (a method added to the registry is
# run on the device without editing this file), and these variants beside it.
VARIANTS = {
    "tsqr-r-only": {"method": "tsqr", "q": False},
    "svd-pca": {"method": "svd", "center": True, "rank": 5},
    "rsvd-residual": {"method": "rsvd", "rank": 4, "measure_residual": True},
    "rsvd-pca": {"method": "rsvd", "rank": 4, "center": True},
    "rsvd-single-pass": {"method": "rsvd", "rank": 4, "single_pass": True, "center": True},
    "rsvd-no-power": {"method": "rsvd", "rank": 4, "power_iters": 0},
    "nmf-hals": {"method": "nmf", "rank": 3, "max_iter": 6, "tol": 0},
    "nmf-mu-random": {
        "method": "nmf",
        "rank": 3,
        "solver": "mu",
        "init": "random",
        "max_iter": 6,
        "tol": 0,
    },
}
CASES = {
    name: {**spec, "block_rows": CHUNK}
    for name, spec in [
        *((n, m.example) for n, m in METHODS.items() if m.input == "matrix" and not m.needs_sparse),
        *VARIANTS.items(),
    ]
}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Any:
    """A non-negative, numerically rank-5 float64 matrix in 6 row chunks (all methods)."""
    path = tmp_path_factory.mktemp("device") / "a.zarr"
    rng = np.random.default_rng(7)
    a = rng.random((ROWS, 5)) @ rng.random((5, COLS)) + 0.01 * rng.random((ROWS, COLS))
    write_array(path, a, chunks=(CHUNK, COLS))
    return path


def _run(tmp_path, matrix, name: str, method: dict, backend_name: str, client) -> dict:
    job = job_dict(
        tmp_path,
        str(matrix),
        name=f"{name}-{backend_name}",
        methods=[method],
        compute={"backend": backend_name},
        output={"url": str(tmp_path / "out")},
    )
    return run_job(job, client=client)["methods"][method["method"]]


def _factors(tmp_path, name: str, method: str) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(tmp_path / "out" / name / "factors.zarr", mode="r")[method]
    return {key: group[key][...] for key in group.array_keys()}


# Metrics of the run, not of the numbers: time, cluster, backend, worker memory.
RUN_DEPENDENT = {"seconds", "dask", "backend", "memory"}


def _same_numbers(host: Any, dev: Any, path: str = "") -> None:
    """Metrics equal to rounding (floats), exactly otherwise (counts, names)."""
    if isinstance(host, dict):
        assert host.keys() - RUN_DEPENDENT == dev.keys() - RUN_DEPENDENT, path
        for key in host.keys() - RUN_DEPENDENT:
            _same_numbers(host[key], dev[key], f"{path}.{key}")
    elif isinstance(host, list):
        assert len(host) == len(dev), path
        for i, (h, d) in enumerate(zip(host, dev, strict=True)):
            _same_numbers(h, d, f"{path}[{i}]")
    elif isinstance(host, float):
        assert dev == pytest.approx(host, rel=1e-9, abs=1e-12), path
    else:
        assert host == dev, path


@pytest.mark.parametrize("name", list(CASES))
def test_every_method_runs_on_device_blocks_and_matches_numpy(
    name, tmp_path, matrix, threaded_client, device_spies
):
    method = CASES[name]
    host = _run(tmp_path, matrix, name, method, "numpy", threaded_client)
    assert host["backend"] == "numpy"
    host_kernels = device_spies.kernel_types()
    assert host_kernels == {"ndarray"}, host_kernels
    device_spies.blocks.clear()
    STATS.reset()

    dev = _run(tmp_path, matrix, name, method, "cupy", threaded_client)
    assert dev["backend"] == "cupy"
    # every spied kernel got device blocks only, one per row block at least
    assert device_spies.kernel_types() == {"FakeDeviceArray"}, device_spies.blocks
    blocks = ROWS // CHUNK
    assert all(len(types) >= blocks for types in device_spies.blocks.values()), {
        k: len(v) for k, v in device_spies.blocks.items()
    }
    assert device_spies.gathered_device == [], device_spies.gathered_device[:5]
    # the input went to the device: one copy of its bytes per read from storage
    reads = dev.get("reads_from_storage", 1)
    assert STATS.transferred_bytes >= ROWS * COLS * 8 * reads
    _same_numbers(host, dev)
    want, got = (
        _factors(tmp_path, f"{name}-numpy", method["method"]),
        _factors(tmp_path, f"{name}-cupy", method["method"]),
    )
    assert want.keys() == got.keys() and want
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_integer_input_is_cast_on_the_device(tmp_path, threaded_client, device_spies):
    counts = np.random.default_rng(1).integers(0, 50, size=(1200, 6)).astype(np.int16)
    write_array(tmp_path / "counts.zarr", counts, chunks=(300, 6))
    job = job_dict(
        tmp_path,
        str(tmp_path / "counts.zarr"),
        methods=[{"method": "tsqr", "q": False}],
        compute={"backend": "cupy"},
    )
    STATS.reset()
    report = run_job(job, client=threaded_client)
    assert report["methods"]["tsqr"]["backend"] == "cupy"
    # the stored int16 bytes crossed, not the float64 working copy
    assert STATS.transferred_bytes < counts.nbytes * 2


def test_nmf_checkpoint_and_resume_on_the_device(
    tmp_path, matrix, threaded_client, device_spies, monkeypatch
):
    """A device run stopped after a checkpoint resumes to the uninterrupted result."""
    from pipeline.methods import nmf as nmf_method

    method = {"method": "nmf", "rank": 3, "max_iter": 8, "tol": 0, "checkpoint_every": 2}
    method["block_rows"] = CHUNK
    reference = _run(tmp_path, matrix, "ref", method, "cupy", threaded_client)
    real_save = nmf_method._save

    def save_then_stop(store, st, w, spec, a):
        real_save(store, st, w, spec, a)
        if st.iteration >= 4:
            raise RuntimeError("stopped after the checkpoint")

    monkeypatch.setattr(nmf_method, "_save", save_then_stop)
    with pytest.raises(RuntimeError, match="stopped"):
        _run(tmp_path, matrix, "stop", method, "cupy", threaded_client)
    monkeypatch.setattr(nmf_method, "_save", real_save)
    assert (tmp_path / "out" / ".stop-cupy.checkpoint").exists()
    device_spies.blocks.clear()
    resumed = _run(tmp_path, matrix, "stop", {**method, "resume": True}, "cupy", threaded_client)
    assert resumed["resumed_from"] == 4 and resumed["iterations"] == 8
    assert device_spies.kernel_types() == {"FakeDeviceArray"}  # W came back to the device
    _same_numbers(reference["history"], resumed["history"])
    want, got = _factors(tmp_path, "ref-cupy", "nmf"), _factors(tmp_path, "stop-cupy", "nmf")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.e2e
def test_cupy_backend_refused_in_one_line_without_a_device(tmp_path, monkeypatch):
    """Explicit ``compute.backend: cupy`` on a machine without cupy or a GPU is exit 2."""
    from pipeline.config import load_config
    from pipeline.jobs import precheck
    from tests.conftest import write_job

    previous = backend.set_device(None)
    try:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a)
        )
        write_array(tmp_path / "a.zarr", np.ones((20, 3)))
        path = write_job(
            tmp_path, job_dict(tmp_path, str(tmp_path / "a.zarr"), compute={"backend": "cupy"})
        )
        with pytest.raises(ConfigError, match=r"compute.backend: cupy cannot run here: cupy is"):
            precheck(load_config(path))
    finally:
        backend.set_device(previous)
    if importlib.util.find_spec("cupy") is None:  # this machine: the real CLI says so too
        proc = subprocess.run(
            [*factorize_cmd(), "validate", str(path)], capture_output=True, text=True, timeout=120
        )
        line = one_line_exit(proc)
        assert "compute.backend: cupy cannot run here: cupy is not installed" in line


# --------------------------------------------------------------------------- a real GPU

HAS_GPU = importlib.util.find_spec("cupy") is not None and backend.device_problem() is None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs cupy and a visible CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_every_method_on_a_real_gpu_matches_numpy(name, tmp_path, matrix, threaded_client):
    backend.set_device(None)  # the real cupy
    method = CASES[name]
    host = _run(tmp_path, matrix, name, method, "numpy", threaded_client)
    dev = _run(tmp_path, matrix, name, method, "cupy", threaded_client)
    assert dev["backend"] == "cupy"
    want, got = (
        _factors(tmp_path, f"{name}-numpy", method["method"]),
        _factors(tmp_path, f"{name}-cupy", method["method"]),
    )
    for key in want:  # a GPU's BLAS rounds differently: agree to the problem's conditioning
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-8, err_msg=key)
    assert dev.get("residual_rel") == pytest.approx(host.get("residual_rel"), rel=1e-6, abs=1e-12)
