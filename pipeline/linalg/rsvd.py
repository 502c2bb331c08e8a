"""Randomized SVD and PCA of a dask array (Halko, Martinsson & Tropp 2011; block Krylov of
Musco & Musco 2015).

``center=True`` is PCA: every product with ``A`` is corrected for the column mean ``μ``
instead of forming ``A − 1μᵀ`` — ``(A − 1μᵀ)X = AX − 1(μᵀX)`` and
``(A − 1μᵀ)ᵀQ = AᵀQ − μ(1ᵀQ)``.

**Passes.** Each pass over ``A`` (one read when ``A`` is not kept in memory) forms
``Y_i = A_i Z`` and ``A_iᵀ Y_i`` from the same block, so one pass applies ``AᵀA`` to a small
``n × l`` basis ``Z`` (``l = rank + oversample``); the column sums (``μ``) and ``‖A‖²_F``
share the first. After the iteration passes one final pass keeps ``Y = AZ`` and returns
``C = AᵀY``, ``YᵀY`` and ``‖A − 1μᵀ‖²_F``: ``Y = QR`` from the column-scaled Gram, and
``B = QᵀA = R⁻ᵀCᵀ`` needs no further pass. When ``Y`` is not graded (σ spanning more than
the working precision) it is orthonormalised by TSQR and ``B`` costs one more pass.

**Iterations** (``iteration``) — what ``Z`` the next pass multiplies:

- ``"power"``: subspace iteration. ``Z`` is the leading left singular vectors of the
  previous ``W = AᵀAZ`` (rotating onto singular directions grades the columns of ``AZ`` by
  σ, so their round-off scales with their own σ and the sketch need not be
  re-orthonormalised between ``A`` and ``Aᵀ``). The first pass multiplies the Gaussian Ω
  itself, so it squares the range of the spectrum: with ``power_iters = 1`` directions
  below ``√ε·σ₁`` converge less than in the classic scheme; from 2 on the later passes
  restore full accuracy. Accuracy of ``σ_i`` improves like ``(σ_{l+1}/σ_i)^(4q+2)``:
  slowly where ``σ_k ≈ σ_{l+1}`` (count data).
- ``"krylov"``: randomized block Krylov (Musco & Musco 2015), as block Lanczos with full
  re-orthogonalisation on the client: every pass multiplies a *new* orthonormal block
  (the previous ``W`` orthogonalised against all blocks so far), and every ``n × l``
  product ``W_j`` is kept on the client, so the basis ``V`` spans the block Krylov space
  ``[Ω, AᵀAΩ, (AᵀA)²Ω, …]`` at one pass per block. Its Rayleigh–Ritz matrix ``VᵀAᵀAV =
  VᵀW`` costs no pass; the final pass multiplies ``A`` by the top ``l`` Ritz vectors (the
  final sketch keeps its width ``l``). Convergence depends on ``√(σ_i/σ_{l+1} − 1)``
  instead of ``log(σ_i/σ_{l+1})``: on the flat count matrix of ``benchmarks/bench_rsvd.py``
  it reaches issue 20's accuracy bars in 0.32× the passes of power iteration.

**When to stop** (``power_iters="auto"``). After every iteration pass the client computes,
without touching ``A``, the singular values the result would have if the final pass came
now: with ``G Λ Gᵀ`` the eigendecomposition of ``ZᵀW = YᵀY``, ``Q = Y G Λ^(-1/2)`` is
orthonormal and ``QᵀA = Λ^(-1/2) Gᵀ Wᵀ`` (for block Krylov the final pass's ``B`` is exactly
this one). Let ``δ_j`` be the largest relative change of a top-``rank`` ``σ_i²`` (an
explained variance, for PCA) since the previous pass, changes within ``ε·σ₁²`` of the
working precision counted as none. The error left is estimated as for a geometrically
converging sequence, ``δ_j · ρ/(1 − ρ)`` with ``ρ = δ_j/δ_{j−1}`` (Aitken's estimate),
but never below ``δ_j`` itself (unknown while the changes do not shrink); iterating stops
once it is at most ``tol``
(:data:`AUTO_TOL`, 1e-3) or when the block Krylov space became invariant, and at
``max_power_iters`` (:data:`AUTO_MAX_POWER_ITERS`, 20) otherwise, unconverged. A fixed
``power_iters`` makes exactly that many iteration passes (``iteration="power"`` is the
scheme of earlier releases, bit for bit) and reports the same estimate.

``power_iters = 0`` is the plain range finder (``Q = orth(AΩ)``, then ``B = QᵀA``).

**Signs.** Centred (PCA): scikit-learn's ``svd_flip(u_based_decision=False)``, as
``sklearn.decomposition.PCA`` — the entry of largest magnitude in each row of ``Vt`` is
positive. Uncentred: the entry of largest magnitude in each column of ``U`` is positive
(``randomized_svd``'s default ``flip_sign``).

The final tall ``m × l`` sketch is kept on the cluster; it is ``l / n`` of the input's size.
``single_pass=True`` is the sketch of Tropp, Yurtsever, Udell & Cevher (2017): ``Y = AΩ``
and ``W = ΨA`` from one read, then ``A ≈ Q (ΨQ)⁺ W``; it reads ``A`` once but is less
accurate (no power iterations, and the error of the co-range sketch adds to that of the
range).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import delayed
from scipy.linalg import solve_triangular

from pipeline.backend import (
    array_module,
    dense_meta,
    gaussian,
    is_sparse,
    like_block,
    sum_squares_f64,
    to_host,
)
from pipeline.cost import Cost
from pipeline.errors import InputError
from pipeline.linalg._graph import fetch, persist, stack_row_blocks, sum_block_pieces
from pipeline.linalg._validation import (
    as_matrix,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_rank,
)
from pipeline.linalg.tsqr import UNOPTIMIZED, row_blocks, tsqr

AUTO = "auto"
# The formula ‖A‖² − Σσ² keeps about log10(‖A‖² / difference) of the float's digits: below
# 1e3 round-off units of ‖A‖² it keeps fewer than 3 of them (float32: a residual_rel
# below ~1e-2), so the residual is measured directly then.
DIRECT_BELOW_EPS = 1e3
ITERATIONS = ("krylov", "power")
# Stop once the estimated largest relative error of a top-k σ² is at most this: every
# explained variance within 0.1 %, a tenth of issue 20's per-component bar (1e-2) and its
# bar for their sum (1e-3). Measured at the stop on the flat 20,000 × 2,000 count matrix
# of benchmarks/bench_rsvd.py: worst component 2.2e-4, sum 1.6e-5.
AUTO_TOL = 1e-3
# Iteration passes at most with power_iters="auto": block Krylov stopped after 10 on that
# matrix; power iteration needs 24 to reach the bars there (and is warned about at 20).
AUTO_MAX_POWER_ITERS = 20


@dataclass
class Convergence:
    """How the iteration passes went: the evidence ``power_iters="auto"`` stops on.

    Attributes
    ----------
    iteration : ``"krylov"`` or ``"power"``
    power_iters_used : iteration passes made (the passes over ``A`` are one more, plus a
        projection pass when the final sketch had to be orthonormalised by TSQR)
    converged : ``power_iters="auto"``: whether the estimate met ``tol`` (or the Krylov
        space became invariant) before ``max_power_iters``; ``None`` for a fixed count
    error_estimate : estimated largest relative error of a top-``rank`` ``σ²`` after the
        last iteration pass (``δ·max(1, ρ/(1 − ρ))``, see the module docstring); ``None``
        when not estimable (fewer than three passes, or changes that did not shrink)
    changes : ``δ`` after each iteration pass from the second on (largest relative change
        of a top-``rank`` ``σ²``)
    """

    iteration: str
    power_iters_used: int
    converged: bool | None
    error_estimate: float | None
    changes: list[float]


@dataclass
class RSVDResult:
    """Factors of ``A (− 1μᵀ) ≈ U diag(S) Vt``.

    Attributes
    ----------
    u : lazy dask array (m, k), columns orthonormal, deterministic signs
    s : (k,) singular values, descending (numpy, the working dtype of the input)
    vt : (k, n) right singular vectors (numpy, the working dtype)
    mean : (n,) column means when centred (the working dtype), else ``None``
    total_sumsq : ``‖A − 1μᵀ‖²_F`` (``‖A‖²_F`` when not centred), float64
    input_sumsq : ``‖A‖²_F``
    passes : passes over ``A`` made so far
    projection : ``True`` when ``U diag(S) Vt`` is the projection ``U Uᵀ(A − 1μᵀ)``, so that
        ``‖A − approx‖² = total_sumsq − Σ s²`` holds exactly (multi-pass); ``False`` for
        the single-pass sketch
    a : the row-blocked input (same row chunks as ``u``)
    s64 : ``s`` in float64 (for metrics: ``Σ s64²`` keeps the digits of
        ``total_sumsq − Σσ²``)
    mean64 : ``mean`` in float64, or ``None``
    convergence : how the iteration passes went (``None`` for the single-pass sketch and
        ``power_iters = 0``)
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
    s64: np.ndarray | None = None
    mean64: np.ndarray | None = None
    convergence: Convergence | None = None

    def __post_init__(self) -> None:
        if self.s64 is None:
            self.s64 = np.asarray(self.s, dtype=np.float64)
        if self.mean64 is None and self.mean is not None:
            self.mean64 = np.asarray(self.mean, dtype=np.float64)

    @property
    def residual_sumsq(self) -> float | None:
        """``‖A (− 1μᵀ) − U diag(S) Vt‖²_F`` from the formula ``total_sumsq − Σσ²`` (float64)
        when the factors are a projection (multi-pass), else ``None``. Below the round-off
        of ``total_sumsq`` the difference has lost its digits (it may even be negative):
        measure the residual directly then."""
        if not self.projection:
            return None
        return self.total_sumsq - float(np.sum(self.s64**2))

    def residual_rule(self, measure_residual: bool | None = None) -> str | None:
        """How the residual is had: ``"direct"`` (one more pass over ``A``), ``"formula"``
        (:attr:`residual_sumsq`, no pass) or ``None`` (single pass: neither).

        ``measure_residual`` forces it (``True``: direct; ``False``: the formula); unasked,
        direct only when the formula's difference is below ``DIRECT_BELOW_EPS`` units of
        ``total_sumsq``'s round-off, where it has lost its digits."""
        formula = self.residual_sumsq
        if measure_residual:
            return "direct"
        if measure_residual is None and formula is not None:
            eps = float(np.finfo(self.a.dtype).eps)
            if formula < DIRECT_BELOW_EPS * eps * self.total_sumsq:
                return "direct"
        return None if formula is None else "formula"


# --------------------------------------------------------------------------- block kernels


def _gaussian(seed: Any, shape: tuple[int, int], like: Any) -> Any:
    """Gaussian test matrix drawn on the host (any backend draws the same numbers), then
    moved to ``like``'s backend and dtype."""
    return like_block(gaussian(seed, shape, like.dtype), like)


def _times_omega(a: Any, seed: int, width: int) -> Any:
    """``A_i Ω`` with Ω (n × width) drawn from ``seed``."""
    return a @ _gaussian(seed, (a.shape[1], width), a)


def _times_small(a: Any, z: Any | None, shift: Any | None) -> Any:
    """``A_i Z − 1 shift`` with the small host ``Z`` (``None``: the identity) and ``shift``
    moved to the block's backend."""
    if z is not None:
        out = a @ like_block(z, a)
    else:
        out = a.toarray() if is_sparse(a) else a.copy()
    if shift is not None:
        out -= like_block(shift, a)[None, :]
    return out


def _psi(seed: int, block: int, rows: int, width: int, like: Any) -> Any:
    """Rows of Ψ (width × m) that act on row block ``block`` (regenerated, never stored)."""
    return _gaussian([seed, 1, block], (width, rows), like)


def _psi_times(a: Any, seed: int, width: int, block_info: Any = None) -> np.ndarray:
    """``Ψ_i A_i`` stacked as a (width, n) host piece; summed over blocks outside."""
    i = block_info[0]["chunk-location"][0]
    return to_host(_psi(seed, i, a.shape[0], width, a) @ a)


def _psi_ones(a: Any, seed: int, width: int, block_info: Any = None) -> np.ndarray:
    """``Ψ_i 1`` as a (width, 1) host piece (the centring term of the co-range sketch)."""
    i = block_info[0]["chunk-location"][0]
    psi = gaussian([seed, 1, i], (width, a.shape[0]), a.dtype)
    return psi.sum(axis=1, keepdims=True)


def _block_sumsq_centred(a: Any, mean: Any) -> np.ndarray:
    total, _ = sum_squares_f64(a, shift=mean)
    return np.full((1, 1), total)


def _block_stats(a: Any) -> np.ndarray:
    """``[column sums…, ‖A_i‖²]`` of a block as one (1, n + 1) float64 host row."""
    total, colsum = sum_squares_f64(a)
    return np.concatenate([to_host(colsum), [total]])[None, :]


def _block_colsum(x: Any) -> np.ndarray:
    """Column sums of a block as a (1, k) float64 host row."""
    return to_host(x.sum(axis=0, dtype=array_module(x).float64))[None, :]


def _power_block(
    a: Any,
    z: Any,
    shift: Any | None,
    seed: int | None,
    stats: bool,
    final: bool,
    mean: Any | None,
) -> tuple[Any, dict[str, Any]]:
    """One row block's share of a pass: ``Y_i = A_i Z − 1 shiftᵀ`` and ``A_iᵀ Y_i``.

    ``Z`` is the Gaussian Ω drawn from ``seed`` when ``seed`` is given (pass 1, where
    ``stats`` adds the column sums and ``‖A_i‖²``). ``final`` keeps ``Y_i`` (returned
    first, else ``None``) and adds ``Y_iᵀY_i`` and, with ``mean``, ``‖A_i − 1μᵀ‖²``. The
    small pieces come back as float64 host arrays in a dict, summed over blocks outside.
    """
    xp = array_module(a)
    if seed is not None:
        z = gaussian(seed, z, a.dtype)  # z is Ω's shape here
    y = _times_small(a, z, shift)
    out = {
        "c": to_host(a.T @ y).astype(np.float64),
        "ysum": to_host(y.sum(axis=0, dtype=xp.float64)),
    }
    if stats:
        total, colsum = sum_squares_f64(a)
        out["sumsq"], out["colsum"] = np.array(total), to_host(colsum)
    if not final:
        return None, out
    y64 = y.astype(xp.float64)
    out["gram"] = to_host(y64.T @ y64)
    if mean is not None:
        out["centred_sumsq"] = np.array(sum_squares_f64(a, shift=mean)[0])
    return y, out


def _block_extremes(u: Any) -> np.ndarray:
    """The signed entry of largest magnitude in each column of a block, as (1, k) host."""
    xp = array_module(u)
    idx = xp.argmax(xp.abs(u), axis=0)
    return to_host(u[idx, xp.arange(u.shape[1])])[None, :]


# --------------------------------------------------------------------------- helpers


def _power_pass(
    a: da.Array,
    z: Any,
    mean: np.ndarray | None,
    *,
    seed: int | None = None,
    stats: bool = False,
    final: bool = False,
) -> tuple[list[Any] | None, dict[str, np.ndarray]]:
    """Run one pass of :func:`_power_block` over all row blocks; sum the small pieces.

    One task per block and a plain sum on the client: measured 15–20 % faster per pass
    than the same products as dask-array expressions (fewer tasks, no reduction graph).
    Returns the kept ``Y`` blocks (persisted ``Delayed``, ``final`` only) and the sums.
    """
    shift = mean @ z if mean is not None and seed is None else None
    zd = delayed(z, pure=True)
    blocks = a.to_delayed(optimize_graph=False)[:, 0].tolist()
    steps = [
        delayed(_power_block, nout=2, pure=True)(
            b, zd, shift, seed, stats, final, mean if final else None
        )
        for b in blocks
    ]
    ys, outs = [s[0] for s in steps], [s[1] for s in steps]
    if final:
        ys, outs = persist(ys, outs)
        outs = fetch(*outs)
    else:
        outs = dask.compute(*outs)
    sums = {key: sum(np.asarray(o[key], dtype=np.float64) for o in outs) for key in outs[0]}
    return (ys if final else None), sums


def _leading_basis(w: np.ndarray) -> np.ndarray:
    """Left singular vectors of the small ``W`` (n × l), as a float64 basis.

    Rotating the basis onto singular directions (not any orthonormal basis of ``W``) makes
    the next product's columns graded, ``‖A z_j‖ ≈ σ_j``: the round-off of a product
    column then scales with its own σ_j, not with σ_1, so tail directions keep their
    digits although the sketch is not re-orthonormalised between ``A`` and ``Aᵀ``.
    """
    z, _, _ = np.linalg.svd(w, full_matrices=False)
    return z


def _centred_cross(c: np.ndarray, ysum: np.ndarray | None, mean: np.ndarray | None) -> Any:
    """``(A − 1μᵀ)ᵀY = AᵀY − μ(1ᵀY)`` from ``AᵀY`` and the column sums of ``Y``."""
    c = np.asarray(c, dtype=np.float64)
    return c if mean is None else c - np.outer(mean, ysum)


def _centred_sumsq(a: da.Array, mean: np.ndarray) -> da.Array:
    """Lazy ``‖A − 1μᵀ‖²_F`` (float64, block by block)."""
    return da.map_blocks(
        _block_sumsq_centred,
        a,
        mean,
        chunks=((1,) * a.numblocks[0], (1,)),
        dtype=np.float64,
        meta=np.empty((0, 0), dtype=np.float64),
    ).sum()


def _block_cross(x: Any, y: Any) -> np.ndarray:
    """``X_iᵀ Y_i`` for aligned row blocks, on the host (BLAS reads the transpose in place)."""
    return to_host(x.T @ y)


def _cross(x: da.Array, y: da.Array) -> da.Array:
    """Lazy ``XᵀY`` (float64) for arrays with the same row chunks, one product per block."""
    return sum_block_pieces(x, _block_cross, (x.shape[1], y.shape[1]), y)


def _omega64(seed: int, n: int, width: int, dtype: Any) -> np.ndarray:
    """The blocks' Ω (drawn in their ``dtype`` by :func:`_times_omega`) in float64 on the host."""
    return gaussian(seed, (n, width), dtype).astype(np.float64)


def _centred_sketch(y: da.Array, mean: np.ndarray, seed: int) -> da.Array:
    """Lazy ``(A − 1μᵀ)Ω = Y − 1 (μᵀΩ)`` for ``Y = AΩ``: ``μᵀΩ`` formed on the host from the
    column means and the same Ω, with no computation over ``Y``."""
    shift = (mean @ _omega64(seed, mean.shape[0], y.shape[1], y.dtype)).astype(y.dtype)
    return da.map_blocks(_times_small, y, None, shift, dtype=y.dtype, meta=y._meta)


def _orthonormal_rows(y: da.Array) -> da.Array:
    """Orthonormal basis of the range of a tall in-memory sketch (TSQR), kept on the cluster."""
    (q,) = persist(tsqr(y).q, **UNOPTIMIZED)
    return q


GRAM_MAX_COND = 100.0  # above it, the final sketch is orthonormalised by TSQR


def rsvd_passes(
    power_iters: int | str, single_pass: bool = False, max_power_iters: int = AUTO_MAX_POWER_ITERS
) -> int:
    """Passes over ``A`` that :func:`rsvd` makes: ``power_iters + 1``, at least 2; for
    ``"auto"`` the most it can make, ``max_power_iters + 1``."""
    if single_pass:
        return 1
    iters = max_power_iters if power_iters == AUTO else power_iters
    return max(iters + 1, 2)


# Block-sized arrays a task holds at once: the block (its products with the sketch are
# narrow) and the row chunks a rechunk merges into it.
BLOCK_BUFFERS = 2
# Tall state per row block between passes: the sketch Y, its orthonormal basis Q and U.
SKETCHES_KEPT = 3


def rsvd_cost(
    shape: tuple[int, int],
    *,
    rank: int,
    oversample: int,
    power_iters: int | str,
    single_pass: bool = False,
    measure_residual: bool | None = None,
) -> Cost:
    """What :func:`rsvd` costs for ``rank`` triplets of a matrix of ``shape``: its passes
    (:func:`rsvd_passes`; up to the cap for ``"auto"``), plus a direct residual pass when
    asked for (or, unasked, when the exact formula has lost its digits: see
    :func:`residual_rule`)."""
    width = min(rank + oversample, *shape)
    passes = rsvd_passes(power_iters, single_pass)
    maybe_direct = measure_residual is None and not single_pass
    auto = power_iters == AUTO and not single_pass
    return Cost(
        passes=passes + int(bool(measure_residual) or maybe_direct),
        exact=not (maybe_direct or auto),
        columns=shape[1],
        min_rows=width,
        buffers=BLOCK_BUFFERS,
        keeps=passes > 1 or bool(measure_residual),
        state_columns=SKETCHES_KEPT * width,
    )


# --------------------------------------------------------------------------- convergence


def _ready_values(z: np.ndarray, w: np.ndarray, k: int, width: int) -> np.ndarray:
    """Top-``k`` singular values of ``QᵀA`` for ``Q`` an orthonormal basis of ``Y = AZ``'s
    leading ``width`` directions, from ``Z`` and ``W = AᵀAZ`` alone (no pass over ``A``).

    With ``ZᵀW = YᵀY = G Λ Gᵀ``: ``Q = Y G Λ^(-1/2)`` and ``QᵀA = Λ^(-1/2) Gᵀ Wᵀ``. Any full
    rank ``Z`` works (the Gaussian Ω too). Directions with ``λ`` at the float64 round-off of
    ``λ₁`` (an exactly rank-deficient ``A``) are left out; missing values read as 0.
    """
    lam, g = _rayleigh_ritz(z, w, width)
    b = (w @ g) / np.sqrt(lam)[None, :]
    s = np.linalg.svd(b, compute_uv=False)
    return np.pad(s[:k], (0, max(k - len(s), 0)))


def _rayleigh_ritz(
    z: np.ndarray, w: np.ndarray, width: int, positive: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The ``width`` largest eigenpairs ``(λ, G)`` of the symmetrised ``ZᵀW``, ``λ``
    descending; with ``positive``, pairs with ``λ ≤ ε₆₄·λ₁·dim`` (no digits) dropped."""
    t = z.T @ w
    lam, g = np.linalg.eigh((t + t.T) / 2)
    lam, g = lam[::-1][:width], g[:, ::-1][:, :width]
    if not positive:
        return lam, g
    keep = lam > np.finfo(np.float64).eps * len(t) * max(lam[0], 0.0)
    return lam[keep], g[:, keep]


def _relative_change(s: np.ndarray, prev: np.ndarray, eps: float) -> float:
    """Largest relative change of ``σᵢ²`` between two passes, changes within ``ε·σ₁²`` (the
    round-off of a product with ``A`` in the working precision) counted as none."""
    d = np.abs(s**2 - prev**2) - eps * max(s[0], prev[0]) ** 2
    d = np.maximum(d, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(d > 0, d / np.maximum(s**2, prev**2), 0.0)
    return float(np.max(rel))


class _Monitor:
    """The evidence after each iteration pass: the values the result would have, their
    changes ``δ`` and the estimated error left (see the module docstring)."""

    def __init__(self, k: int, width: int, eps: float) -> None:
        self.k, self.width, self.eps = k, width, eps
        self.previous: np.ndarray | None = None
        self.changes: list[float] = []

    def add(self, z: np.ndarray, w: np.ndarray) -> None:
        """Record the values ready after a pass that formed ``W = AᵀAZ``."""
        s = _ready_values(z, w, self.k, self.width)
        if self.previous is not None:
            self.changes.append(_relative_change(s, self.previous, self.eps))
        self.previous = s

    @property
    def estimate(self) -> float:
        """Estimated largest relative error of a top-k ``σ²`` (``inf``: not known yet).

        ``δ_j · max(1, ρ/(1 − ρ))`` with ``ρ = δ_j/δ_{j−1}``: the tail of a geometric
        series of changes (Aitken's estimate), never less than the last change itself — a
        first ratio is often far smaller than the later ones (the jump away from the random
        start), and alone it would stop the iteration early.
        """
        if not self.changes:
            return math.inf
        last = self.changes[-1]
        if last == 0.0:
            return 0.0
        if len(self.changes) < 2 or self.changes[-2] == 0.0:
            return math.inf
        rho = last / self.changes[-2]
        return last * max(1.0, rho / (1.0 - rho)) if rho < 1.0 else math.inf

    def result(
        self, iteration: str, used: int, auto: bool, invariant: bool, tol: float
    ) -> Convergence:
        """The record of the run (``invariant``: the Krylov space became invariant, so
        its Ritz values are exact)."""
        est = 0.0 if invariant else self.estimate
        return Convergence(
            iteration=iteration,
            power_iters_used=used,
            converged=(invariant or est <= tol) if auto else None,
            error_estimate=est if math.isfinite(est) else None,
            changes=list(self.changes),
        )


def _next_krylov_block(v: np.ndarray, w: np.ndarray, width: int, eps: float) -> np.ndarray:
    """The next orthonormal block of the Krylov basis ``v``: ``W``'s part outside ``span(v)``
    (projected out twice — "twice is enough", Giraud et al. 2005), at most ``width``
    columns and the room left in ``ℝⁿ``. Directions whose norm fell below the working
    precision of ``‖W‖`` are dropped; an empty block means the space is invariant."""
    rest = w - v @ (v.T @ w)
    rest -= v @ (v.T @ rest)
    u, s, _ = np.linalg.svd(rest, full_matrices=False)
    room = v.shape[0] - v.shape[1]
    scale = np.linalg.norm(w, 2)
    keep = int(np.sum(s > 10 * eps * scale)) if scale > 0 else 0
    return u[:, : min(keep, width, room)]


# --------------------------------------------------------------------------- algorithm


def _is_count(value: Any) -> bool:
    """An int ≥ 0 (not a bool)."""
    try:
        check_int(value, "value", low=0)
    except InputError:
        return False
    return True


def _check_options(power_iters: Any, iteration: Any, tol: Any, max_power_iters: Any) -> str:
    """Refuse bad iteration options; return the iteration scheme (its default: block
    Krylov for ``"auto"``, power iteration — the scheme of earlier releases — for a count)."""
    if power_iters != AUTO and not _is_count(power_iters):
        raise InputError(f"power_iters must be 'auto' or an int ≥ 0, got {power_iters!r}")
    if iteration is not None:
        check_choice(iteration, "iteration", ITERATIONS)
    check_number(tol, "tol")
    check_int(max_power_iters, "max_power_iters", low=1)
    if iteration is None:
        return "krylov" if power_iters == AUTO else "power"
    return iteration


def rsvd(
    a: Any,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int | str = AUTO,
    iteration: str | None = None,
    tol: float = AUTO_TOL,
    max_power_iters: int = AUTO_MAX_POWER_ITERS,
    center: bool = False,
    seed: int = 0,
    single_pass: bool = False,
    block_rows: int | None = None,
    on_pass: Callable[[int], None] | None = None,
) -> RSVDResult:
    """Top-``rank`` SVD of ``a`` (or of its column-centred version: PCA).

    Parameters
    ----------
    a : dask (or numpy) array (m, n), any chunking, dense or scipy.sparse blocks; integers
        and bool are computed in float64, float16 in float32 (see :func:`working_dtype`);
        ``n`` must be moderate (the ``n × (rank + oversample)`` sketches — for block
        Krylov one per iteration pass — are formed on the client)
    rank : number of singular triplets, ``1 ≤ rank ≤ min(m, n)``
    oversample : extra sketch columns; ``rank + oversample`` is capped at ``min(m, n)``
    power_iters : ``"auto"``: iteration passes until the estimated largest relative error of
        a top-``rank`` ``σ²`` is at most ``tol`` (at most ``max_power_iters``); an int: that
        many iteration passes (one pass over ``a`` each, plus one final pass)
    iteration : ``"krylov"`` (randomized block Krylov) or ``"power"`` (subspace iteration);
        ``None``: block Krylov for ``"auto"``, power iteration for a count (exactly the
        scheme of earlier releases)
    tol : the stopping tolerance of ``"auto"`` (:data:`AUTO_TOL`)
    max_power_iters : the cap of ``"auto"`` (:data:`AUTO_MAX_POWER_ITERS`)
    center : subtract the column means implicitly (PCA; signs as scikit-learn's PCA)
    seed : seed of the Gaussian test matrices (an int ≥ 0; drawn on the host, so every
        backend uses the same numbers)
    single_pass : one read of ``a`` (Tropp et al. 2017 sketch); ignores ``power_iters``
    block_rows : rows per block (default about 64 MiB)
    on_pass : called with the number of passes done after each pass of the iterated scheme
        (progress display; not called by the single-pass and ``power_iters = 0`` paths)

    Returns
    -------
    RSVDResult
        ``s``, ``vt`` and ``mean`` are computed; ``u`` is lazy (its blocks come from a
        sketch kept on the cluster, not from ``a``). The factors ``u``, ``s``, ``vt`` and
        ``mean`` are in the working dtype of ``a`` (float32 for float32 input, float64 for
        float64 and integer input); ``s64`` and the sums of squares are float64 whatever
        the input (use them for metrics such as ``total_sumsq − Σσ²``). ``convergence``
        records the iteration passes, whether ``"auto"`` converged and the error estimate.

    Raises
    ------
    InputError
        Bad rank/options, wrong dtype or ndim.
    """
    a = as_matrix(a)
    m, n = a.shape
    check_rank(rank, (m, n))
    check_int(oversample, "oversample", low=0)
    iteration = _check_options(power_iters, iteration, tol, max_power_iters)
    check_bool(center, "center")
    check_int(seed, "seed", low=0)
    check_bool(single_pass, "single_pass")
    if block_rows is not None:
        check_int(block_rows, "block_rows", low=1)
    width = min(rank + oversample, m, n)
    a = row_blocks(a, block_rows, min_rows=width)
    if single_pass:
        return _single_pass(a, rank, width, center, seed)
    if power_iters == 0:
        return _no_power_iters(a, rank, width, center, seed)

    tick = on_pass or (lambda done: None)
    auto = power_iters == AUTO
    iters = max_power_iters if auto else int(power_iters)
    monitor = _Monitor(rank, width, float(np.finfo(a.dtype).eps))
    run = _krylov if iteration == "krylov" else _power
    first, z, used, invariant = run(a, width, center, seed, iters, auto, tol, monitor, tick)
    # Last pass: Y = (A − 1μᵀ)Z kept, with C = (A − 1μᵀ)ᵀY, YᵀY and the exact ‖A − 1μᵀ‖².
    # With Y = QR, B = QᵀA = R⁻ᵀCᵀ: no further pass over A.
    mean, input_sumsq = first
    y_blocks, sums = _power_pass(a, z, mean, final=True)
    passes = used + 1
    tick(passes)
    convergence = monitor.result(iteration, used, auto, invariant, tol)
    y = stack_row_blocks(y_blocks, a, width, "rsvd-sketch")
    c = _centred_cross(sums["c"], sums["ysum"], mean)
    total_sumsq = float(sums["centred_sumsq"]) if center else input_sumsq
    basis = _gram_basis(sums["gram"])
    if basis is not None:  # Q = Y T with R = T⁻¹ from the Gram; B = QᵀA = R⁻ᵀCᵀ
        transform, r = basis
        b = solve_triangular(r, c.T, trans="T")
        res = _finish(y, b, rank, mean, total_sumsq, input_sumsq, passes, True, a, transform)
        return replace(res, convergence=convergence)
    # Y not graded (a spectrum beyond the working precision): R⁻ᵀCᵀ would amplify the
    # round-off of C, so orthonormalise Y with TSQR and project with one more pass.
    q = _orthonormal_rows(y)
    b, _ = _project(a, q, mean, with_total=False)
    res = _finish(q, b, rank, mean, total_sumsq, input_sumsq, passes + 1, True, a)
    return replace(res, convergence=convergence)


def _first_pass(
    a: da.Array, z: Any, center: bool, seed: int | None
) -> tuple[tuple[np.ndarray | None, float], np.ndarray]:
    """Pass 1: the statistics and ``W = (A − 1μᵀ)ᵀ(A − 1μᵀ)Z``, centred afterwards (μ is
    known only at its end): ``(A − 1μᵀ)ᵀ(A − 1μᵀ)Z = AᵀY − μ(1ᵀY)`` with ``Y = AZ``, since
    ``Aᵀ1 = mμ``. ``z`` is Ω's shape when ``seed`` is given (Ω drawn in the blocks).
    Returns ``((μ or None, ‖A‖²), W)``."""
    _, sums = _power_pass(a, z, None, seed=seed, stats=True)
    mean = sums["colsum"] / a.shape[0] if center else None
    return (mean, float(sums["sumsq"])), _centred_cross(sums["c"], sums["ysum"], mean)


def _stop(monitor: _Monitor, used: int, iters: int, auto: bool, tol: float) -> bool:
    """Whether the iteration passes are over: the count reached, or (auto) converged."""
    return used >= iters or (auto and monitor.estimate <= tol)


def _power(
    a: da.Array,
    width: int,
    center: bool,
    seed: int,
    iters: int,
    auto: bool,
    tol: float,
    monitor: _Monitor,
    tick: Callable[[int], None],
) -> tuple[tuple[np.ndarray | None, float], np.ndarray, int, bool]:
    """Subspace iteration: pass 1 multiplies Ω (drawn in the blocks), each next pass the
    leading left singular vectors of the previous ``W``. Returns the first pass's
    statistics, the final pass's basis, the iteration passes made and ``False`` (never
    invariant)."""
    n = a.shape[1]
    first, w = _first_pass(a, (n, width), center, seed)
    tick(1)
    monitor.add(_omega64(seed, n, width, a.dtype), w)
    used = 1
    while not _stop(monitor, used, iters, auto, tol):
        z = _leading_basis(w)
        _, sums = _power_pass(a, z, first[0])
        w = _centred_cross(sums["c"], sums["ysum"], first[0])
        used += 1
        tick(used)
        monitor.add(z, w)
    return first, _leading_basis(w), used, False


def _krylov(
    a: da.Array,
    width: int,
    center: bool,
    seed: int,
    iters: int,
    auto: bool,
    tol: float,
    monitor: _Monitor,
    tick: Callable[[int], None],
) -> tuple[tuple[np.ndarray | None, float], np.ndarray, int, bool]:
    """Randomized block Krylov (block Lanczos with full re-orthogonalisation): each pass
    multiplies a new orthonormal block; the basis ``V`` and ``W = AᵀAV`` stay on the
    client. The final basis is the top ``width`` Ritz vectors of ``VᵀW``. Returns the
    first pass's statistics, that basis, the iteration passes made and whether the Krylov
    space became invariant (the Ritz values are then exact)."""
    n = a.shape[1]
    eps = float(np.finfo(a.dtype).eps)
    v, _ = np.linalg.qr(gaussian(seed, (n, width), np.float64))
    first, w = _first_pass(a, v, center, None)
    tick(1)
    ws = [w]
    monitor.add(v, w)
    used, invariant = 1, False
    while not _stop(monitor, used, iters, auto, tol):
        z = _next_krylov_block(v, ws[-1], width, eps)
        if z.shape[1] == 0:
            invariant = True
            break
        _, sums = _power_pass(a, z, first[0])
        ws.append(_centred_cross(sums["c"], sums["ysum"], first[0]))
        v = np.hstack([v, z])
        used += 1
        tick(used)
        monitor.add(v, np.hstack(ws))
    _, g = _rayleigh_ritz(v, np.hstack(ws), width, positive=False)
    return first, v @ g, used, invariant


def _project(
    a: da.Array, q: da.Array, mean: np.ndarray | None, with_total: bool = True
) -> tuple[np.ndarray, float | None]:
    """``B = Qᵀ(A − 1μᵀ) = QᵀA − (Qᵀ1)μᵀ`` in one pass over A, with ``‖A − 1μᵀ‖²`` from the
    same pass when centred and ``with_total`` (``None`` otherwise)."""
    centred = mean is not None
    b, qsum, total = dask.compute(
        _cross(q, a),
        sum_block_pieces(q, _block_colsum, (1, q.shape[1]))[0] if centred else None,
        _centred_sumsq(a, mean) if centred and with_total else None,
        **UNOPTIMIZED,
    )
    b = to_host(b)
    if centred:
        b = b - np.outer(to_host(qsum), mean)
    return b, None if total is None else float(to_host(total))


def _gram_basis(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(T, R)`` with ``Y T`` orthonormal and ``Y = (Y T) R``, from ``G = YᵀY``.

    Cholesky of the column-scaled Gram (``D⁻¹GD⁻¹ = LLᵀ``, ``R = LᵀD``): its round-off
    grows with the condition of the *scaled* ``Y``, which is close to 1 here because the
    sketch's columns are near-orthogonal with graded norms (the basis was rotated onto
    singular directions). ``None`` when that condition exceeds ``GRAM_MAX_COND`` or
    Cholesky fails — the caller falls back to TSQR.
    """
    d = np.sqrt(np.diag(gram))
    if not np.all(d > 0):
        return None
    scaled = gram / np.outer(d, d)
    if np.linalg.cond(scaled) > GRAM_MAX_COND:
        return None
    try:
        lower = np.linalg.cholesky(scaled)
    except np.linalg.LinAlgError:
        return None
    r = lower.T * d[None, :]
    return solve_triangular(r, np.eye(len(d))), r


def _sketch_and_stats(a: da.Array, seed: int, width: int) -> tuple[da.Array, ...]:
    """Lazy ``Y = AΩ``, column sums and ``‖A‖²`` (one pass when computed together)."""
    n = a.shape[1]
    stats = sum_block_pieces(a, _block_stats, (1, n + 1))[0]
    y = da.map_blocks(
        _times_omega,
        a,
        seed,
        width,
        chunks=(a.chunks[0], (width,)),
        dtype=a.dtype,
        meta=dense_meta(a),
    )
    return y, stats[:n], stats[n]


def _no_power_iters(a: da.Array, rank: int, width: int, center: bool, seed: int) -> RSVDResult:
    """Plain range finder: ``Q = orth(AΩ)`` (pass 1), ``B = QᵀA`` (pass 2)."""
    m = a.shape[0]
    y, colsum, sumsq = _sketch_and_stats(a, seed, width)
    y, colsum, sumsq = persist(y, colsum, sumsq, **UNOPTIMIZED)
    colsum, input_sumsq = (to_host(v) for v in dask.compute(colsum, sumsq, **UNOPTIMIZED))
    mean = colsum / m if center else None
    if center:
        y = _centred_sketch(y, mean, seed)
    q = _orthonormal_rows(y)
    b, total = _project(a, q, mean)  # pass 2, with the exact centred total now μ is known
    total_sumsq = total if total is not None else float(input_sumsq)
    return _finish(q, b, rank, mean, total_sumsq, float(input_sumsq), 2, True, a)


def _single_pass(a: da.Array, rank: int, width: int, center: bool, seed: int) -> RSVDResult:
    m, n = a.shape
    y, colsum, sumsq = _sketch_and_stats(a, seed, width)
    width2 = min(2 * width + 1, m)  # co-range sketch size recommended by Tropp et al.
    w = sum_block_pieces(a, _psi_times, (width2, n), seed=seed, width=width2)
    psi1 = sum_block_pieces(a, _psi_ones, (width2, 1), seed=seed, width=width2) if center else None
    y, w, colsum, sumsq, psi1 = persist(y, w, colsum, sumsq, psi1, **UNOPTIMIZED)  # the one pass
    w, colsum, input_sumsq, psi1 = (
        None if v is None else to_host(v)
        for v in dask.compute(w, colsum, sumsq, psi1, **UNOPTIMIZED)
    )
    mean = colsum / m if center else None
    if center:
        y = _centred_sketch(y, mean, seed)
        w = w - psi1 @ mean[None, :]
    q = _orthonormal_rows(y)
    assert q.chunks[0] == a.chunks[0], "Ψ is generated per row block of A"
    # ΨQ from the kept Q (no pass over A): Σ_i Ψ_i Q_i.
    psi_q = to_host(
        sum_block_pieces(q, _psi_times, (width2, q.shape[1]), seed=seed, width=width2).compute()
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
    transform: np.ndarray | None = None,
) -> RSVDResult:
    """SVD of the small ``B``, rotate ``Q``, fix the signs (see :func:`_signs`).

    The basis is ``q`` itself or, with ``transform``, ``q @ transform``.
    """
    ub, s, vt = np.linalg.svd(b, full_matrices=False)
    ub, s, vt = ub[:, :rank], s[:rank], vt[:rank]
    if transform is not None:
        ub = transform @ ub
    signs = _signs(q, ub, vt, centred=mean is not None)
    u = _times_small_lazy(q, ub * signs[None, :])
    dtype = a.dtype
    return RSVDResult(
        u=u,
        s=s.astype(dtype),
        vt=(vt * signs[:, None]).astype(dtype),
        mean=None if mean is None else mean.astype(dtype),
        total_sumsq=total_sumsq,
        input_sumsq=input_sumsq,
        passes=passes,
        projection=projection,
        a=a,
        s64=s.astype(np.float64),
        mean64=mean,
    )


def _signs(q: da.Array, ub: np.ndarray, vt: np.ndarray, centred: bool) -> np.ndarray:
    """±1 per component, so that the result is deterministic whatever the sketch.

    PCA (``centred``): scikit-learn's ``svd_flip(u_based_decision=False)``, which
    ``sklearn.decomposition.PCA`` applies — the largest-|·| entry of each ``Vt`` row is
    positive (no pass needed). Otherwise ``randomized_svd``'s default: the largest-|·|
    entry of each ``U`` column, found block by block in ``U = Q U_B``.
    """
    if centred:
        ext = vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)]
    else:
        u = _times_small_lazy(q, ub)
        nb = u.numblocks[0]
        parts = da.map_blocks(
            _block_extremes,
            u,
            chunks=((1,) * nb, (ub.shape[1],)),
            dtype=u.dtype,
            meta=np.empty((0, 0), dtype=u.dtype),
        )
        parts = to_host(parts.compute(**UNOPTIMIZED))
        ext = parts[np.argmax(np.abs(parts), axis=0), np.arange(ub.shape[1])]
    signs = np.sign(ext)
    signs[signs == 0] = 1.0
    return signs


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
