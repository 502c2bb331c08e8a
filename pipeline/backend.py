"""Array-backend helpers: the only module that names cupy (always imported lazily).

Chunk kernels call these instead of numpy/scipy functions that do not dispatch through
``__array_function__`` (triangular solves, random generators), so the same code runs on
numpy chunks and on cupy chunks from dask-cuda workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_cupy(x: Any) -> bool:
    """True when ``x`` is a cupy array (checked without importing cupy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(x: Any) -> Any:
    """The array module of ``x``: ``numpy`` or ``cupy``."""
    if is_cupy(x):
        import cupy

        return cupy
    return np


def solve_right_upper(a: Any, r: Any, *, overwrite: bool = False) -> Any:
    """Return ``a @ inv(r)`` for upper-triangular ``r`` by a triangular solve (TRSM).

    Parameters
    ----------
    a : (m, n) array
    r : (n, n) upper-triangular array, nonsingular
    overwrite : the solve may reuse ``a``'s memory (pass only arrays you own)

    Returns
    -------
    (m, n) C-contiguous array of the dtype of ``a``.
    """
    if is_cupy(a):
        from cupyx.scipy.linalg import solve_triangular

        return solve_triangular(r, a.T, trans="T", lower=False, overwrite_b=overwrite).T
    from scipy.linalg import get_blas_funcs

    # X r = a  <=>  r^T X^T = a^T; a^T of a C-ordered block is a Fortran-ordered view, so
    # BLAS solves in place without a layout change (on a copy unless overwrite is allowed).
    own = overwrite and a.flags.c_contiguous and a.flags.writeable
    at = (a if own else np.array(a, order="C", copy=True)).T
    (trsm,) = get_blas_funcs(("trsm",), (r, at))
    xt = trsm(1.0, np.asarray(r, dtype=at.dtype), at, side=0, lower=0, trans_a=1, overwrite_b=1)
    return xt.T


def solve_upper(r: Any, b: Any) -> Any:
    """Return ``inv(r) @ b`` for a small upper-triangular ``r`` (dispatching to cupy)."""
    if is_cupy(r):
        from cupyx.scipy.linalg import solve_triangular

        return solve_triangular(r, b, lower=False)
    from scipy.linalg import solve_triangular

    return solve_triangular(r, b, lower=False)


def eye_like(n: int, like: Any) -> Any:
    """Identity of size ``n`` on the backend and dtype of ``like``."""
    xp = array_module(like)
    return xp.eye(n, dtype=like.dtype)


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of ``x`` (no-op for numpy arrays)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def random_state(seed: int | None, like: Any) -> Any:
    """A random generator on the backend of ``like`` (``numpy`` or ``cupy``)."""
    xp = array_module(like)
    return xp.random.default_rng(seed)


ROWS_PER_SLICE = 256  # float64 work in cache-sized slices, never a block-sized copy


def sum_squares_f64(
    a: Any, shift: Any | None = None, q: Any | None = None, r: Any | None = None
) -> tuple[float, Any]:
    """``(Σ d², column sums of a)`` in float64 for ``d = a − shift − q @ r`` (terms optional).

    Works through the block in slices of rows, reusing two preallocated float64 buffers:
    dask workers run with ``MALLOC_TRIM_THRESHOLD_`` set, so a fresh multi-MiB temporary per
    slice would be a fresh ``mmap`` with page faults every time (8× slower, measured).
    """
    xp = array_module(a)
    m, n = a.shape
    rows = min(ROWS_PER_SLICE, m)
    buf = xp.empty((rows, n), dtype=xp.float64)
    tmp = xp.empty((rows, n), dtype=xp.float64) if q is not None else None
    r64 = None if r is None else xp.asarray(r, dtype=xp.float64)
    s64 = None if shift is None else xp.asarray(shift, dtype=xp.float64)[None, :]
    total = 0.0
    colsum = xp.zeros(n, dtype=xp.float64)
    for i in range(0, m, rows):
        k = min(rows, m - i)
        d = buf[:k]
        d[...] = a[i : i + k]
        colsum += d.sum(axis=0)
        if q is not None:
            xp.matmul(q[i : i + k].astype(xp.float64), r64, out=tmp[:k])
            d -= tmp[:k]
        if s64 is not None:
            d -= s64
        total += float(xp.vdot(d.ravel(), d.ravel()))
    return total, colsum
