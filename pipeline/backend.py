"""Array backends: numpy on the host, or a device library (cupy) on GPU workers.

The only module that names cupy (always imported lazily). The rule of the device backend
(README "GPU workers"):

* **Blocks live on the device.** The read task decodes a chunk on the host, copies it to
  the device once (:func:`to_device`) and drops the host buffer; every block kernel then
  receives device arrays and dispatches on them (:func:`array_module`).
* **Small algebra on the host.** Everything n × n, k × k or l × l — Grams after their
  product, Cholesky factors, TSQR's reduction tree, the SVD of a sketch, NMF's ``H`` —
  is numpy. Block kernels return such pieces as numpy arrays (:func:`to_host`, one
  explicit copy per piece), so the client and the scheduler never hold a device array;
  small host matrices go back to a block's device with :func:`like_block`.
* **No implicit conversion.** Device arrays leave the device only through
  :func:`to_host`; random test matrices are drawn on the host with numpy
  (:func:`gaussian`), so a CPU run and a GPU run with the same seed compute the same
  thing up to rounding, whatever the GPU model.

:class:`Device` describes the device library; :func:`device` loads cupy on first use and
:func:`set_device` installs another implementation (the test suite's emulated device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, first_line

if TYPE_CHECKING:
    from distributed import Client

    from pipeline.sections import ClusterSpec, ComputeSpec

BACKENDS = ("numpy", "cupy")


@dataclass(frozen=True)
class Device:
    """A device array library with numpy's API (cupy, or a stand-in for tests).

    Attributes
    ----------
    name : the backend name recorded in metrics (``"cupy"``)
    xp : the array namespace (``cupy``)
    array_type : the type of its arrays
    to_host : explicit device → host copy (``cupy.ndarray.get``)
    solve_triangular : ``cupyx.scipy.linalg.solve_triangular``'s signature
    memory_bytes : total memory of the device this process uses
    """

    name: str
    xp: Any
    array_type: type
    to_host: Callable[[Any], np.ndarray]
    solve_triangular: Callable[..., Any]
    memory_bytes: Callable[[], int]


_device: Device | None = None


def _cupy_device() -> Device:
    import cupy
    from cupyx.scipy.linalg import solve_triangular

    return Device(
        name="cupy",
        xp=cupy,
        array_type=cupy.ndarray,
        to_host=lambda x: x.get(),
        solve_triangular=solve_triangular,
        memory_bytes=lambda: int(cupy.cuda.Device().mem_info[1]),
    )


def device() -> Device:
    """The device library of this process (cupy, loaded on first use).

    Raises
    ------
    ImportError
        When cupy is not installed.
    """
    global _device
    if _device is None:
        _device = _cupy_device()
    return _device


def set_device(dev: Device | None) -> Device | None:
    """Install ``dev`` as this process's device library; return the previous one."""
    global _device
    previous, _device = _device, dev
    return previous


def device_problem() -> str | None:
    """Why this process cannot compute on a device (cupy missing, no GPU), or ``None``."""
    if _device is None:
        import importlib.util

        if importlib.util.find_spec("cupy") is None:
            return "cupy is not installed (pip install 'zarr-factorize[gpu-cu12]' or '[gpu-cu13]')"
        try:
            dev = device()
            dev.xp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA raises its own error types when no GPU is usable
            set_device(None)
            return f"no GPU is visible ({first_line(exc)})"
    return None


def is_device(x: Any) -> bool:
    """True when ``x`` is an array of the device library (checked without importing it)."""
    if isinstance(x, np.ndarray | np.generic):
        return False
    if _device is not None and isinstance(x, _device.array_type):
        return True
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(x: Any) -> Any:
    """The array module of ``x``: ``numpy`` or the device's (``cupy``)."""
    return device().xp if is_device(x) else np


def to_host(x: Any) -> np.ndarray:
    """A numpy array of ``x``: one explicit copy for device arrays, a no-op for numpy."""
    if is_device(x):
        return device().to_host(x)
    return np.asarray(x)


def to_device(block: np.ndarray, dtype: Any | None = None) -> Any:
    """``block`` copied to the device once, then cast there to ``dtype`` (when given).

    Casting after the copy moves the stored bytes (e.g. int16 counts), not the wider
    working dtype.
    """
    x = device().xp.asarray(block)
    if dtype is not None and x.dtype != np.dtype(dtype):
        x = x.astype(dtype)
    return x


def is_sparse(x: Any) -> bool:
    """True for a scipy sparse block (sparse blocks always live on the host)."""
    import scipy.sparse

    return scipy.sparse.issparse(x)


def dense_meta(x: Any) -> Any:
    """The meta of a dense result computed from the dask array ``x``'s blocks (a product
    of a sparse block with a dense matrix is dense)."""
    return empty_meta(x.dtype, is_device(x._meta))


def like_block(small: Any, block: Any) -> Any:
    """A small host matrix on ``block``'s backend, in ``block``'s dtype."""
    return array_module(block).asarray(small, dtype=block.dtype)


def empty_meta(dtype: Any, on_device: bool) -> Any:
    """The 0 × 0 meta array dask types a graph with: numpy or a device array."""
    xp = device().xp if on_device else np
    return xp.empty((0, 0), dtype=dtype)


def host_blocks(x: Any) -> Any:
    """The dask array ``x`` with device blocks copied to the host, one task per block
    (unchanged when its blocks are numpy): what is stored leaves the device explicitly."""
    if not is_device(x._meta):
        return x
    meta = np.empty((0,) * x.ndim, dtype=x.dtype)
    return x.map_blocks(to_host, dtype=x.dtype, meta=meta)


def blocks_like(x: Any, ref: Any) -> Any:
    """The dask array ``x`` with its blocks on ``ref``'s backend (e.g. a checkpointed ``W``
    read back from storage for a job that computes on the device)."""
    if is_device(ref._meta) and not is_device(x._meta):
        return x.map_blocks(to_device, dtype=x.dtype, meta=empty_meta(x.dtype, True))
    return x


def gaussian(seed: Any, shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """Standard normal ``shape`` from numpy's generator seeded with ``seed`` (host).

    Drawn on the host on every backend: cupy's default generator sizes its state from the
    GPU's SM count, so two GPU models (or a GPU and the CPU) would draw different numbers
    from one seed.
    """
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype, copy=False)


def solve_right_upper(a: Any, r: Any, *, overwrite: bool = False) -> Any:
    """Return ``a @ inv(r)`` for upper-triangular ``r`` by a triangular solve (TRSM).

    Parameters
    ----------
    a : (m, n) array, numpy or device
    r : (n, n) upper-triangular array (host), nonsingular
    overwrite : the solve may reuse ``a``'s memory (pass only arrays you own)

    Returns
    -------
    (m, n) array of the dtype and backend of ``a`` (C-contiguous for numpy).
    """
    if is_device(a):
        rd = like_block(r, a)
        return device().solve_triangular(rd, a.T, trans="T", lower=False, overwrite_b=overwrite).T
    from scipy.linalg import get_blas_funcs

    # X r = a  <=>  r^T X^T = a^T; a^T of a C-ordered block is a Fortran-ordered view, so
    # BLAS solves in place without a layout change (on a copy unless overwrite is allowed).
    own = overwrite and a.flags.c_contiguous and a.flags.writeable
    at = (a if own else np.array(a, order="C", copy=True)).T
    (trsm,) = get_blas_funcs(("trsm",), (r, at))
    xt = trsm(1.0, np.asarray(r, dtype=at.dtype), at, side=0, lower=0, trans_a=1, overwrite_b=1)
    return xt.T


def solve_upper(r: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return ``inv(r) @ b`` for a small upper-triangular ``r`` (host)."""
    from scipy.linalg import solve_triangular

    return solve_triangular(r, b, lower=False)


ROWS_PER_SLICE = 256  # float64 work in cache-sized slices, never a block-sized copy


def sum_squares_f64(
    a: Any, shift: Any | None = None, q: Any | None = None, r: Any | None = None
) -> tuple[float, Any]:
    """``(Σ d², column sums of a)`` in float64 for ``d = a − shift − q @ r`` (terms optional).

    ``shift`` and ``r`` are small host arrays; ``a``, ``q`` and the column sums share one
    backend. Works through the block in slices of rows, reusing two preallocated float64
    buffers: dask workers run with ``MALLOC_TRIM_THRESHOLD_`` set, so a fresh multi-MiB
    temporary per slice would be a fresh ``mmap`` with page faults every time (8× slower,
    measured). The sum accumulates on the block's backend and is read once at the end (one
    host sync per block on a device, not one per slice).
    """
    if is_sparse(a) and q is None:
        return _sparse_sum_squares(a, shift)
    xp = array_module(a)
    m, n = a.shape
    rows = min(ROWS_PER_SLICE, m)
    buf = xp.empty((rows, n), dtype=xp.float64)
    tmp = xp.empty((rows, n), dtype=xp.float64) if q is not None else None
    r64 = None if r is None else xp.asarray(to_host(r), dtype=xp.float64)
    s64 = None if shift is None else xp.asarray(to_host(shift), dtype=xp.float64)[None, :]
    total = xp.zeros((), dtype=xp.float64)
    colsum = xp.zeros(n, dtype=xp.float64)
    for i in range(0, m, rows):
        k = min(rows, m - i)
        d = buf[:k]
        d[...] = a[i : i + k].toarray() if is_sparse(a) else a[i : i + k]
        colsum += d.sum(axis=0)
        if q is not None:
            xp.matmul(q[i : i + k].astype(xp.float64), r64, out=tmp[:k])
            d -= tmp[:k]
        if s64 is not None:
            d -= s64
        total += xp.vdot(d.ravel(), d.ravel())
    return float(total), colsum


def _sparse_sum_squares(a: Any, shift: Any | None) -> tuple[float, np.ndarray]:
    """:func:`sum_squares_f64` of a canonical sparse block, exactly and without densifying.

    With ``shift`` (PCA's mean μ): ``Σ_nz (a − μ_j)² + Σ_j (rows − nnz_j) μ_j²`` — the
    stored entries and the implicit zeros separately, so no ``‖A‖² − m‖μ‖²`` cancellation.
    """
    a = a.tocsr()
    m, n = a.shape
    data, cols = a.data.astype(np.float64), a.indices
    colsum = np.bincount(cols, weights=data, minlength=n)
    if shift is None:
        return float(data @ data), colsum
    mu = np.asarray(to_host(shift), dtype=np.float64)
    d = data - mu[cols]
    zeros = m - np.bincount(cols, minlength=n)
    return float(d @ d + zeros @ (mu * mu)), colsum


# --------------------------------------------------------------------------- resolution


def check_backend_available(compute: ComputeSpec, cluster: ClusterSpec) -> None:
    """Refuse ``compute.backend: cupy`` before anything starts when this machine cannot
    use it (local kinds; an ``address`` cluster's workers are asked at compute time).

    Raises
    ------
    ConfigError
    """
    if compute.backend != "cupy" or cluster.kind == "address":
        return
    problem = device_problem()
    if problem:
        raise ConfigError(f"compute.backend: cupy cannot run here: {problem}")


def resolve_backend(compute: ComputeSpec, cluster: ClusterSpec, client: Client | None) -> str:
    """``numpy`` or ``cupy`` for this job on this cluster.

    ``auto`` is cupy on ``local-cuda`` and on an ``address`` cluster whose every worker
    can use a GPU; an explicit ``cupy`` the workers cannot honour is refused.

    Raises
    ------
    ConfigError
    """
    choice, kind = compute.backend, cluster.kind
    if choice == "numpy" or (choice == "auto" and kind == "local"):
        return "numpy"
    if client is None:
        problems = {"this process": device_problem()}
    else:
        problems = client.run(device_problem)
    bad = {worker: p for worker, p in problems.items() if p}
    if not bad and problems:
        return "cupy"
    if choice == "auto" and kind != "local-cuda":
        return "numpy"
    worker, problem = next(iter(bad.items()), ("the cluster", "it has no workers"))
    raise ConfigError(f"compute.backend: cupy cannot run on {worker}: {problem}")
