"""Exact thin SVD and PCA of a tall-skinny dask array, built on TSQR.

For ``A`` (m × n, m ≥ n) with a moderate ``n``, the SVD follows from a QR factorization
(the R-SVD of Chan 1982; the TSQR route of Benson, Gleich & Demmel 2013):
``A = Q R`` by :func:`~pipeline.linalg.tsqr.tsqr`, then the small ``R = U_R Σ Vᵀ`` on the
client, so ``A = (Q U_R) Σ Vᵀ``. ``U = Q U_R`` is formed block by block in the pass that
forms ``Q`` — ``U_R`` is folded into each block's ``n × n`` tree transform
(:meth:`TSQRResult.q_times <pipeline.linalg.tsqr.TSQRResult.q_times>`), so ``Q`` itself is
never built or stored.

Why not the Gram matrix: ``eig(AᵀA)`` (scikit-learn's and scanpy's ``covariance_eigh``)
reads ``A`` once too, but squares the condition number — singular values below
``√u · σ₁`` (``u`` the unit round-off; ~1e-8 · σ₁ in float64) are lost. TSQR is backward
stable, ``|σ_i − σ̂_i| ≤ c·u·σ₁`` for every ``i``, so a matrix with κ = 1e12 keeps its
smallest singular values to ~1e-4 relative where the Gram route returns noise.

Passes over ``A``: one for ``R`` (with ``‖A‖²_F``); ``U`` is lazy and reads ``A`` a second
time when computed. ``compute_u=False`` reads ``A`` exactly once.

``center=True`` is exact PCA in the same single pass, without forming ``A − 1μᵀ``. TSQR
runs on the augmented matrix ``Ã = [1/√m · 1, A]`` (the constant column is added to each
row block as it is read, never stored). With ``Ã = Q̃ R̃`` and ``q̃₀ = 1/√m · 1``:
``R̃[0, 0] = 1``, ``R̃[0, 1:] = √m μᵀ`` (``μ`` the column means) and, since
``Q̃[:, 1:] ⊥ 1``, ``A − 1μᵀ = Q̃[:, 1:] R̃[1:, 1:]`` — ``R̃[1:, 1:]`` is the R factor of
the centred matrix. Its SVD gives ``Σ`` and ``Vᵀ``, and ``U = Q̃ [0; U_R]``. The error is
that of a backward-stable QR of ``Ã``, so it grows with the mean only as
``u · ‖a_j‖`` per column (not with ``‖a_j‖²`` as for the covariance matrix).

Signs follow scikit-learn's ``svd_flip(u, v, u_based_decision=False)``: the entry of
largest magnitude in each row of ``Vt`` is positive. It needs no pass over ``U`` and
matches ``sklearn.decomposition.PCA``.

Factors come back in the input's working precision (integers as float64, see
:mod:`pipeline.linalg._validation`); the SVD of the small ``R`` and the metrics are float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np

from pipeline.backend import array_module, to_host
from pipeline.cost import Cost
from pipeline.errors import InputError
from pipeline.linalg._graph import dense_row_blocks
from pipeline.linalg._validation import (
    as_matrix,
    check_bool,
    check_int,
    check_rank,
    check_tall,
)
from pipeline.linalg.tsqr import DEFAULT_BLOCK_BYTES, row_blocks, tsqr, tsqr_cost

TRANSPOSE_HINT = "for a wide matrix take svd(a.T): its U and Vt are the V and Uᵀ of a"


def svd_cost(
    shape: tuple[int, int], *, compute_u: bool, transpose: bool = False, center: bool = False
) -> Cost:
    """What :func:`svd` costs: TSQR's (:func:`~pipeline.linalg.tsqr.tsqr_cost`), ``U``
    in the pass that would form ``Q``; centring widens each block by its constant column."""
    return tsqr_cost(shape, compute_q=compute_u, transpose=transpose, extra_columns=int(center))


@dataclass
class SVDResult:
    """Factors of ``A (− 1μᵀ) = U diag(S) Vt`` (exact up to rounding; truncated to ``rank``).

    Attributes
    ----------
    u : lazy dask array (m, k) with the row chunks of ``a``, columns orthonormal; ``None``
        when ``compute_u=False``. It reads ``a`` once when computed; compute or store it
        with ``**UNOPTIMIZED`` from :mod:`pipeline.linalg.tsqr` (an optimized graph fuses
        the input's tasks and redefines keys the R pass left on the scheduler).
    s : (k,) singular values, descending, in the input's working dtype
    vt : (k, n) right singular vectors (largest-magnitude entry of each row positive)
    mean : (n,) column means when centred, else ``None`` (summed in float64, then cast to
        the working dtype: float32 input gets ``a.astype(float64).mean(0)`` rounded once)
    singular_values_all : all ``n`` singular values (float64), for explained-variance
        ratios and the tail beyond ``k``
    sumsq : ``‖A‖²_F`` (float64, from the pass, accumulated per block in the working dtype)
    centred_sumsq : ``Σ`` of all squared singular values (float64): ``‖A − 1μᵀ‖²_F`` when
        centred, ``‖A‖²_F`` up to rounding otherwise
    passes : passes over ``a``: 1 without ``u``, 2 with it (its read when computed)
    block_methods : how many row blocks took each local QR path (see :func:`tsqr`)
    a : the row-blocked input (without the constant column; same row chunks as ``u``)
    """

    u: da.Array | None
    s: np.ndarray
    vt: np.ndarray
    mean: np.ndarray | None
    singular_values_all: np.ndarray
    sumsq: float
    centred_sumsq: float
    passes: int
    block_methods: dict[str, int] = field(default_factory=dict)
    a: da.Array | None = None

    @property
    def explained_variance(self) -> np.ndarray:
        """``s² / (m − 1)`` (float64), as scikit-learn's ``PCA.explained_variance_``."""
        m = self.a.shape[0]
        return self.singular_values_all[: len(self.s)] ** 2 / max(m - 1, 1)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """``s² / Σ σ²`` over all ``n`` singular values (float64)."""
        s2 = self.singular_values_all[: len(self.s)] ** 2
        total = self.centred_sumsq
        return s2 / total if total > 0 else np.zeros_like(s2)


def _with_constant(block: Any, value: float) -> Any:
    """``[value · 1, block]``: the block with a constant first column (PCA's augmentation)."""
    xp = array_module(block)
    out = xp.empty((block.shape[0], block.shape[1] + 1), dtype=block.dtype)
    out[:, 0] = value
    out[:, 1:] = block
    return out


def _flip_signs(ur: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``svd_flip(u, v, u_based_decision=False)``."""
    idx = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), idx])
    signs[signs == 0] = 1.0
    return ur * signs[None, :], vt * signs[:, None]


def svd(
    a: Any,
    *,
    rank: int | None = None,
    compute_u: bool = True,
    center: bool = False,
    block_rows: int | None = None,
    split_every: int = 16,
) -> SVDResult:
    """Exact thin SVD (or, with ``center``, PCA) of a tall-and-skinny matrix.

    Parameters
    ----------
    a : dask array (or array-like) (m, n) with m ≥ n (m > n when centred), real; integers
        are computed in float64; scipy.sparse blocks are densified one row block of about
        64 MiB per task
    rank : keep the top ``rank`` triplets, ``1 ≤ rank ≤ n``; ``None`` keeps all ``n``
    compute_u : build ``U`` (lazy; a second read of ``a`` when computed). ``False`` reads
        ``a`` once.
    center : subtract the column means implicitly (exact PCA, same single pass)
    block_rows : rows per block (default about 64 MiB per block)
    split_every : fan-in of TSQR's reduction tree

    Returns
    -------
    SVDResult
        ``s``, ``vt``, ``mean`` and the metrics are computed; ``u`` is lazy.

    Raises
    ------
    InputError
        Wide matrix (use ``a.T``), not 2-D, complex or non-numeric dtype, bad ``rank``.
    NonFiniteInputError
        When ``a`` holds NaN or Inf (found during the pass).
    """
    a = dense_row_blocks(as_matrix(a, name="a"), DEFAULT_BLOCK_BYTES)
    m, n = a.shape
    check_tall((m, n), name="a", hint=TRANSPOSE_HINT)
    if rank is not None:
        check_rank(rank, (m, n))
    check_bool(compute_u, "compute_u")
    check_bool(center, "center")
    check_int(split_every, "split_every", low=2)
    if center and m <= n:
        raise InputError(
            f"a must have more rows than columns for center=True, got shape ({m}, {n}); "
            "a centred m × n matrix has rank ≤ m − 1"
        )
    k = n if rank is None else int(rank)

    if center:
        blocked = row_blocks(a, block_rows, min_rows=n + 1)
        value = a.dtype.type(1.0 / np.sqrt(m))
        aug = blocked.map_blocks(
            _with_constant,
            value,
            chunks=(blocked.chunks[0], (n + 1,)),
            dtype=a.dtype,
            meta=blocked._meta,
        )
        res = tsqr(aug, compute_q=compute_u, split_every=split_every, column_sums=True)
        # tsqr keeps these row blocks; should it ever rechunk, slice its blocks instead.
        used = blocked if res.a.chunks[0] == blocked.chunks[0] else res.a[:, 1:]
    else:
        res = tsqr(a, compute_q=compute_u, block_rows=block_rows, split_every=split_every)
        used = res.a

    r = to_host(res.r).astype(np.float64)
    if center:
        # The means from the pass's float64 column sums (R̃₀ⱼ = c·m·μ_j / R̃₀₀ holds them
        # too, but only to the working precision of the QR: a few ulps off in float32).
        mean = res.column_sums[1:] / m
        sumsq = float(res.sumsq) - m * float(value) ** 2  # less the constant column
        r = r[1:, 1:]
    else:
        mean, sumsq = None, float(res.sumsq)
    ur, s_all, vt = np.linalg.svd(r)
    ur, vt = _flip_signs(ur, vt)

    u = None
    if compute_u:
        fold = ur[:, :k]
        if center:  # U = Q̃ [0; U_R]: the constant column's q̃₀ takes no part
            fold = np.vstack([np.zeros((1, k)), fold])
        u = res.q_times(fold.astype(a.dtype))
    return SVDResult(
        u=u,
        s=s_all[:k].astype(a.dtype),
        vt=vt[:k].astype(a.dtype),
        mean=None if mean is None else mean.astype(a.dtype),
        singular_values_all=s_all,
        sumsq=max(sumsq, 0.0),
        centred_sumsq=float(np.sum(s_all**2)),
        passes=2 if compute_u else 1,
        block_methods=dict(res.block_methods),
        a=used,
    )
