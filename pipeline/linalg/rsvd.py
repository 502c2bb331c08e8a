"""Randomized SVD and PCA of a dask array (Halko, Martinsson & Tropp 2011).

Range finder with a Gaussian sketch and ``power_iters`` subspace iterations, each product
re-orthonormalised (TSQR for the tall side, a small QR for the short side): the accurate
default that dask's ``svd_compressed(iterator='power')`` is not. ``center=True`` is PCA:
every product with ``A`` is corrected for the column mean ``μ`` instead of forming
``A − 1μᵀ`` — ``(A − 1μᵀ)X = AX − 1(μᵀX)`` and ``(A − 1μᵀ)ᵀQ = AᵀQ − μ(1ᵀQ)``.

Passes over ``A`` (each pass is one read when ``A`` is not kept in memory):

1. ``Y = AΩ`` together with the column sums (``μ``) and ``‖A‖²_F``;
2. ``2 × power_iters`` passes: ``Z = AᵀQ`` then ``Y = AZ``;
3. ``B = QᵀA`` together with ``‖A − 1μᵀ‖²_F`` (exact total variance, now that μ is known).

The tall ``m × l`` sketches (``l = rank + oversample``) are kept on the cluster between
passes; they are ``l / n`` of the input's size. ``single_pass=True`` is the sketch of Tropp,
Yurtsever, Udell & Cevher (2017): ``Y = AΩ`` and ``W = ΨA`` from one read, then
``A ≈ Q (ΨQ)⁺ W``; it reads ``A`` once but is less accurate (no power iterations, and the
error of the co-range sketch adds to that of the range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import delayed

from pipeline.backend import array_module, random_state, sum_squares_f64, to_host
from pipeline.errors import InputError
from pipeline.linalg._graph import persist
from pipeline.linalg.tsqr import UNOPTIMIZED, row_blocks, tsqr


@dataclass
class RSVDResult:
    """Factors of ``A (− 1μᵀ) ≈ U diag(S) Vt``.

    Attributes
    ----------
    u : lazy dask array (m, k), columns orthonormal, deterministic signs
    s : (k,) singular values, descending (numpy, float64)
    vt : (k, n) right singular vectors (numpy)
    mean : (n,) column means when centred, else ``None``
    total_sumsq : ``‖A − 1μᵀ‖²_F`` (``‖A‖²_F`` when not centred), float64
    input_sumsq : ``‖A‖²_F``
    passes : passes over ``A`` made so far
    projection : ``True`` when ``U diag(S) Vt`` is the projection ``U Uᵀ(A − 1μᵀ)``, so that
        ``‖A − approx‖² = total_sumsq − Σ s²`` holds exactly (multi-pass); ``False`` for
        the single-pass sketch
    a : the row-blocked input (same row chunks as ``u``)
    """

    u: da.Array
    s: np.ndarray
    vt: np.ndarray
    mean: np.ndarray | None
    total_sumsq: float
    input_sumsq: float
    passes: int
    projection: bool
    a: da.Array


# --------------------------------------------------------------------------- block kernels


def _gaussian(seed: Any, shape: tuple[int, int], like: Any) -> Any:
    return random_state(seed, like).standard_normal(shape).astype(like.dtype, copy=False)


def _times_omega(a: Any, seed: int, width: int) -> Any:
    """``A_i Ω`` with Ω (n × width) drawn from ``seed`` on the block's backend."""
    return a @ _gaussian(seed, (a.shape[1], width), a)


def _times_small(a: Any, z: Any, shift: Any | None) -> Any:
    """``A_i Z − 1 shift`` with the small ``Z`` moved to the block's backend."""
    xp = array_module(a)
    out = a @ xp.asarray(z, dtype=a.dtype)
    if shift is not None:
        out -= xp.asarray(shift, dtype=a.dtype)[None, :]
    return out


def _psi(seed: int, block: int, rows: int, width: int, like: Any) -> Any:
    """Rows of Ψ (width × m) that act on row block ``block`` (regenerated, never stored)."""
    return _gaussian([seed, 1, block], (width, rows), like)


def _psi_times(a: Any, seed: int, width: int, block_info: Any = None) -> Any:
    """``Ψ_i A_i`` stacked as a (width, n) piece; summed over blocks outside."""
    i = block_info[0]["chunk-location"][0]
    return _psi(seed, i, a.shape[0], width, a) @ a


def _psi_ones(a: Any, seed: int, width: int, block_info: Any = None) -> Any:
    """``Ψ_i 1`` as a (width, 1) piece (the centring term of the co-range sketch)."""
    i = block_info[0]["chunk-location"][0]
    return _psi(seed, i, a.shape[0], width, a).sum(axis=1, keepdims=True)


def _block_sumsq_centred(a: Any, mean: Any) -> Any:
    total, _ = sum_squares_f64(a, shift=mean)
    return array_module(a).full((1, 1), total)


def _block_stats(a: Any, _salt: Any = None) -> Any:
    """``[column sums…, ‖A_i‖²]`` of a block as one (1, n + 1) float64 row."""
    xp = array_module(a)
    total, colsum = sum_squares_f64(a)
    return xp.concatenate([colsum, xp.full((1,), total)])[None, :]


def _block_extremes(u: Any) -> Any:
    """The signed entry of largest magnitude in each column of a block, as (1, k)."""
    xp = array_module(u)
    idx = xp.argmax(xp.abs(u), axis=0)
    return u[idx, xp.arange(u.shape[1])][None, :]


# --------------------------------------------------------------------------- helpers


def _small_qr(z: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(z)
    return q


def _block_cross(x: Any, y: Any) -> Any:
    """``X_iᵀ Y_i`` for aligned row blocks (BLAS reads the transpose in place)."""
    return x.T @ y


def _cross(x: da.Array, y: da.Array) -> da.Array:
    """Lazy ``XᵀY`` (float64) for arrays with the same row chunks, one product per block."""
    nb, (p, q) = x.numblocks[0], (x.shape[1], y.shape[1])
    parts = da.map_blocks(_block_cross, x, y, chunks=((p,) * nb, (q,)), dtype=x.dtype, meta=x._meta)
    return parts.reshape(nb, p, q).sum(axis=0, dtype=np.float64)


def _stacked(a: da.Array, func: Any, piece: tuple[int, int], **kw: Any) -> da.Array:
    """Apply ``func`` to each row block giving a ``piece``-shaped array; sum the pieces."""
    nb, (rows, cols) = a.numblocks[0], piece
    parts = da.map_blocks(
        func, a, chunks=((rows,) * nb, (cols,)), dtype=a.dtype, meta=a._meta, **kw
    )
    return parts.reshape(nb, rows, cols).sum(axis=0, dtype=np.float64)


def _orthonormal_rows(y: da.Array, keep: bool = True) -> da.Array:
    """Orthonormal basis of the range of a tall in-memory sketch.

    ``keep`` persists it on the cluster (for a basis used more than once); otherwise it is
    recomputed from the kept sketch by the one pass that uses it.
    """
    q = tsqr(y).q
    if keep:
        (q,) = persist(q, **UNOPTIMIZED)
    return q


def _check(a: da.Array, rank: int, oversample: int, power_iters: int) -> None:
    if a.ndim != 2:
        raise InputError(f"rsvd needs a 2-D array; got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"rsvd needs a floating-point array; got {a.dtype}")
    m, n = a.shape
    if not 1 <= rank <= min(m, n):
        raise InputError(
            f"rank must be between 1 and {min(m, n)} (the smaller dimension of A, shape "
            f"{(m, n)}); got {rank}"
        )
    if oversample < 0 or power_iters < 0:
        raise InputError("oversample and power_iters must be ≥ 0")


# --------------------------------------------------------------------------- algorithm


def rsvd(
    a: da.Array,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    center: bool = False,
    seed: int = 0,
    single_pass: bool = False,
    block_rows: int | None = None,
) -> RSVDResult:
    """Top-``rank`` SVD of ``a`` (or of its column-centred version: PCA).

    Parameters
    ----------
    a : dask array (m, n), floating point, any chunking; ``n`` must be moderate (the
        ``n × (rank + oversample)`` sketches are formed on the client)
    rank : number of singular triplets, ``1 ≤ rank ≤ min(m, n)``
    oversample : extra sketch columns; ``rank + oversample`` is capped at ``min(m, n)``
    power_iters : subspace iterations (each costs two passes over ``a``)
    center : subtract the column means implicitly (PCA)
    seed : seed of the Gaussian test matrices (drawn on the data's backend)
    single_pass : one read of ``a`` (Tropp et al. 2017 sketch); ignores ``power_iters``
    block_rows : rows per block (default about 64 MiB)

    Returns
    -------
    RSVDResult
        ``s``, ``vt`` and ``mean`` are computed; ``u`` is lazy (its blocks come from a
        sketch kept on the cluster, not from ``a``).

    Raises
    ------
    InputError
        Bad rank/options, wrong dtype or ndim.
    """
    _check(a, rank, oversample, power_iters)
    m, n = a.shape
    width = min(rank + oversample, m, n)
    a = row_blocks(a, block_rows, min_rows=width)
    stats = da.map_blocks(
        _block_stats,
        a,
        chunks=((1,) * a.numblocks[0], (n + 1,)),
        dtype=np.float64,
        meta=a._meta.astype(np.float64),
    ).sum(axis=0)
    colsum, sumsq = stats[:n], stats[n]
    y = da.map_blocks(
        _times_omega, a, seed, width, chunks=(a.chunks[0], (width,)), dtype=a.dtype, meta=a._meta
    )
    if single_pass:
        return _single_pass(a, y, colsum, sumsq, rank, width, center, seed)

    y, colsum, sumsq = persist(y, colsum, sumsq, **UNOPTIMIZED)  # pass 1
    colsum, input_sumsq = (to_host(v) for v in dask.compute(colsum, sumsq, **UNOPTIMIZED))
    mean = colsum / m if center else None
    if center:  # (A − 1μᵀ)Ω = Y − 1 (μᵀΩ), and μᵀΩ is the column mean of Y
        y = y - y.mean(axis=0, dtype=np.float64).astype(a.dtype)
    q = _orthonormal_rows(y, keep=power_iters == 0)
    passes = 1
    for i in range(power_iters):
        z, qsum = dask.compute(
            _cross(a, q), q.sum(axis=0, dtype=np.float64) if center else None, **UNOPTIMIZED
        )
        z = to_host(z).astype(np.float64)
        if center:
            z -= np.outer(mean, to_host(qsum))
        z = _small_qr(z)
        shift = mean @ z if center else None
        zd = delayed(z, pure=True)
        y = da.map_blocks(
            _times_small,
            a,
            zd,
            shift,
            chunks=(a.chunks[0], (width,)),
            dtype=a.dtype,
            meta=a._meta,
        )
        (y,) = persist(y, **UNOPTIMIZED)  # one pass over A; Q is formed from it in memory
        q = _orthonormal_rows(y, keep=i == power_iters - 1)
        passes += 2
    # Last pass: B = Qᵀ(A − 1μᵀ) and, μ now known, the exact ‖A − 1μᵀ‖².
    b = _cross(q, a)
    total = (
        da.map_blocks(
            _block_sumsq_centred,
            a,
            mean,
            chunks=((1,) * a.numblocks[0], (1,)),
            dtype=np.float64,
            meta=a._meta.astype(np.float64),
        ).sum()
        if center
        else None
    )
    qsum = q.sum(axis=0, dtype=np.float64) if center else None
    b, total, qsum = (
        None if v is None else to_host(v) for v in dask.compute(b, total, qsum, **UNOPTIMIZED)
    )
    passes += 1
    if center:
        b = b - np.outer(qsum, mean)
    total_sumsq = float(total) if center else float(input_sumsq)
    return _finish(q, b, rank, mean, total_sumsq, float(input_sumsq), passes, True, a)


def _single_pass(
    a: da.Array,
    y: da.Array,
    colsum: da.Array,
    sumsq: da.Array,
    rank: int,
    width: int,
    center: bool,
    seed: int,
) -> RSVDResult:
    m, n = a.shape
    width2 = min(2 * width + 1, m)  # co-range sketch size recommended by Tropp et al.
    w = _stacked(a, _psi_times, (width2, n), seed=seed, width=width2)
    psi1 = _stacked(a, _psi_ones, (width2, 1), seed=seed, width=width2) if center else None
    y, w, colsum, sumsq, psi1 = persist(y, w, colsum, sumsq, psi1, **UNOPTIMIZED)  # the one pass
    w, colsum, input_sumsq, psi1 = (
        None if v is None else to_host(v)
        for v in dask.compute(w, colsum, sumsq, psi1, **UNOPTIMIZED)
    )
    mean = colsum / m if center else None
    if center:
        y = y - y.mean(axis=0, dtype=np.float64).astype(a.dtype)
        w = w - psi1 @ mean[None, :]
    q = _orthonormal_rows(y)
    assert q.chunks[0] == a.chunks[0], "Ψ is generated per row block of A"
    # ΨQ from the kept Q (no pass over A): Σ_i Ψ_i Q_i.
    psi_q = to_host(
        _stacked(q, _psi_times, (width2, q.shape[1]), seed=seed, width=width2).compute()
    )
    x, *_ = np.linalg.lstsq(psi_q, w, rcond=None)
    # Without centring ‖A‖² is exact from the pass; with it, ‖A‖² − m‖μ‖² may lose digits
    # when the mean dominates — the caller measures the residual directly if it can.
    total = float(input_sumsq) - (m * float(mean @ mean) if center else 0.0)
    return _finish(q, x, rank, mean, max(total, 0.0), float(input_sumsq), 1, False, a)


def _finish(
    q: da.Array,
    b: np.ndarray,
    rank: int,
    mean: np.ndarray | None,
    total_sumsq: float,
    input_sumsq: float,
    passes: int,
    projection: bool,
    a: da.Array,
) -> RSVDResult:
    """SVD of the small ``B``, rotate ``Q``, fix signs (largest |·| of each U column > 0)."""
    ub, s, vt = np.linalg.svd(b, full_matrices=False)
    ub, s, vt = ub[:, :rank], s[:rank], vt[:rank]
    u = _times_small_lazy(q, ub)
    nb = u.numblocks[0]
    ext = da.map_blocks(
        _block_extremes, u, chunks=((1,) * nb, (rank,)), dtype=u.dtype, meta=u._meta
    )
    ext = to_host(ext.compute())
    signs = np.sign(ext[np.argmax(np.abs(ext), axis=0), np.arange(rank)])
    signs[signs == 0] = 1.0
    u = _times_small_lazy(q, ub * signs[None, :])
    return RSVDResult(
        u=u,
        s=s.astype(np.float64),
        vt=vt * signs[:, None],
        mean=mean,
        total_sumsq=total_sumsq,
        input_sumsq=input_sumsq,
        passes=passes,
        projection=projection,
        a=a,
    )


def _times_small_lazy(q: da.Array, z: np.ndarray) -> da.Array:
    return da.map_blocks(
        _times_small,
        q,
        delayed(z, pure=True),
        None,
        chunks=(q.chunks[0], (z.shape[1],)),
        dtype=q.dtype,
        meta=q._meta,
    )
