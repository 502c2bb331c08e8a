"""Per-block pure functions used by the dask graphs in this package.

Row blocks are numpy or device (cupy) arrays; everything n × n — Grams once formed,
Cholesky factors, the reduction tree — is numpy on the host (see :mod:`pipeline.backend`):
a block's Gram is copied to the host once, and host factors go back to the block's device
with :func:`~pipeline.backend.like_block` only to be applied to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.backend import array_module, like_block, solve_right_upper, solve_upper, to_host
from pipeline.errors import NonFiniteInputError

# A Cholesky QR round is accepted when the Gram of its input is this close to I
# (‖G − I‖_F). Below it, Q has κ ≤ 1.2 and one more round gives orthogonality O(u)
# (Yamamoto et al. 2015); above it the block falls back to a safer path.
GRAM_GUARD = 0.1

# Shifted CholeskyQR3 (Fukaya et al. 2020): the shift s = 11(mn + n(n+1))·u·‖A‖²_F makes
# the first Cholesky succeed for κ(A) up to ~1/u and leaves κ(Q₁)² ≲ ‖A‖²/s, so the Gram
# defect after the second round, O(mn·u·κ(Q₁)²), is O(1) by design, not small: at κ(A) =
# 1e12 with n = 64 it grows with the block's rows, ~0.03 at 20,000 rows, 0.1-0.5 at 65,536
# (κ(Q₂) ≈ 1.1-1.7), past GRAM_GUARD. Such a Q₂ is well conditioned, so one more unguarded
# round takes it to orthogonality O(u) (CholeskyQR of an input with κ ≪ u^(-1/2) is
# orthogonal to O(u·κ²); Yamamoto et al. 2015, measured ~3e-15), and the guarded final
# round is the fourth. That costs one TRSM + Gram per block in each pass, instead of a
# Householder QR (~5× the time of the whole Cholesky chain).
SHIFTED_EXTRA_ROUNDS = 1

# A Cholesky factor computed from a Gram within this defect of I is well conditioned
# (κ ≤ √((1 + δ)/(1 − δ)) = 2 at δ = 0.6): applying it as a product with its small explicit
# inverse (GEMM) instead of a triangular solve (TRSM, 3-4× slower per flop here) errs by
# O(κ·u), as the solve does (Higham 2002, §14.3). The guarded final factor always
# qualifies; so does the fourth-round factor of shifted CholeskyQR (defect 0.1-0.5).
WELL_CONDITIONED = 0.6


@dataclass(frozen=True)
class BlockFactor:
    """How one row block ``A_i`` was factorized as ``A_i = Q_i R_i``.

    Attributes
    ----------
    r : (n, n) upper-triangular, non-negative diagonal.
    chain : Cholesky factors ``(R1, R2[, R3[, R4]])`` with ``Q_i = A_i R1⁻¹ R2⁻¹ …``
        applied in this order, or ``()`` when the block used Householder QR.
    method : ``"cholqr2"``, ``"scholqr3"``, ``"scholqr4"`` (shifted, with the extra
        round of :data:`SHIFTED_EXTRA_ROUNDS`) or ``"householder"``.
    sumsq : ``‖A_i‖²_F``.
    folded : how many trailing factors of ``chain`` are well conditioned
        (:data:`WELL_CONDITIONED`), so :func:`block_q` applies them as one small product.
    """

    r: Any
    chain: tuple[Any, ...]
    method: str
    sumsq: float
    folded: int = 1


def _chol_upper(g: np.ndarray) -> np.ndarray | None:
    """Upper Cholesky factor of ``g``, or ``None`` when ``g`` is not numerically SPD."""
    try:
        r = np.linalg.cholesky(g).T
    except np.linalg.LinAlgError:
        return None
    return r if np.isfinite(r).all() else None


def _gram(q: Any) -> np.ndarray:
    """``qᵀq`` formed on ``q``'s backend, on the host."""
    return to_host(q.T @ q)


def _gram_defect(g: np.ndarray) -> float:
    return float(np.linalg.norm(g - np.eye(g.shape[0], dtype=g.dtype)))


def _householder_r(a: Any) -> np.ndarray:
    r = to_host(array_module(a).linalg.qr(a, mode="r"))
    return _positive_diagonal(r)[0]


def _positive_diagonal(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip rows of ``r`` so its diagonal is ≥ 0; return ``(r, signs)``."""
    signs = np.where(np.diagonal(r) < 0, -1, 1).astype(r.dtype)
    return r * signs[:, None], signs


def _inverse(r: np.ndarray) -> np.ndarray:
    return solve_upper(r, np.eye(r.shape[0], dtype=r.dtype))


def _times_inverse(q: Any, r: np.ndarray, defect: float | None, own: bool) -> Any:
    """``q @ inv(r)``: a product with the small inverse when ``r`` came from a Gram within
    :data:`WELL_CONDITIONED` of I, else a triangular solve (``own``: ``q`` may be reused)."""
    if defect is not None and defect <= WELL_CONDITIONED:
        return q @ like_block(_inverse(r), q)
    return solve_right_upper(q, r, overwrite=own)


def _cholqr_chain(
    a: Any, g: np.ndarray, shift: float, rounds: int, extra: int = 0
) -> tuple[tuple[np.ndarray, ...], int] | None:
    """Cholesky QR rounds on ``a`` (with Gram ``g``): ``(factors, folded)``, or ``None``.

    The first round factors ``g`` (plus ``shift · I`` when shifted), the next
    ``rounds − 2`` repair what it left, and the final round is taken only when the Gram of
    its input is within :data:`GRAM_GUARD`. When that guard trips, up to ``extra`` more
    unguarded rounds are taken before it is checked again; the final round is never taken
    on an input whose defect exceeds the guard. ``folded`` counts the trailing factors that
    came from Grams within :data:`WELL_CONDITIONED` of I.
    """
    n = g.shape[0]
    r = _chol_upper(g + shift * np.eye(n, dtype=g.dtype) if shift else g)
    if r is None:
        return None
    chain, defects = [r], [None]  # defects: of the Gram each factor was computed from
    q = a
    while True:
        q = _times_inverse(q, chain[-1], defects[-1], own=q is not a)
        g = _gram(q)
        defect = _gram_defect(g)
        # Only a final round is guarded: after a shifted first round Q may still be far
        # from orthonormal, which the rounds before the final one repair.
        final = len(chain) >= rounds - 1 and defect <= GRAM_GUARD
        if not final and len(chain) >= rounds - 1 + extra:
            return None
        r = _chol_upper(g)
        if r is None:
            return None
        chain.append(r)
        defects.append(defect)
        if final:
            folded = 1  # the final factor passed the guard
            while folded < len(defects) - 1 and defects[-1 - folded] <= WELL_CONDITIONED:
                folded += 1
            return tuple(chain), folded


def factor_block(a: Any, row_offset: int = 0) -> BlockFactor:
    """Factorize one row block: guarded Cholesky QR, Householder QR as the fallback.

    Parameters
    ----------
    a : (m_i, n) array with m_i ≥ n
    row_offset : index of the block's first row in the whole matrix (for error messages)

    Raises
    ------
    NonFiniteInputError
        When the block holds NaN or Inf.
    """
    xp = array_module(a)
    if not bool(xp.isfinite(a).all()):
        bad = int(xp.argmax(~xp.isfinite(a).all(axis=1)))
        raise NonFiniteInputError(
            f"input holds NaN or Inf (first at row {row_offset + bad}); "
            "clean or mask the data before factorizing"
        )
    m, n = a.shape
    g = _gram(a)
    sumsq = float(np.trace(g))
    if not np.isfinite(sumsq):
        raise NonFiniteInputError(
            f"input overflows {a.dtype} in rows {row_offset}-{row_offset + m - 1} "
            "(‖A_i‖² is not finite); rescale the data"
        )
    found, method = _cholqr_chain(a, g, 0.0, rounds=2), "cholqr"
    if found is None:
        u = float(np.finfo(a.dtype).eps) / 2
        shift = 11.0 * (m * n + n * (n + 1)) * u * sumsq
        found, method = _cholqr_chain(a, g, shift, rounds=3, extra=SHIFTED_EXTRA_ROUNDS), "scholqr"
    if found is None:
        return BlockFactor(_householder_r(a), (), "householder", sumsq)
    chain, folded = found
    r = chain[0]
    for rk in chain[1:]:
        r = rk @ r
    return BlockFactor(r, chain, f"{method}{len(chain)}", sumsq, folded)


def block_q(a: Any, factor: BlockFactor, transform: Any | None = None) -> Any:
    """Recompute ``Q_i`` (m_i × n) of a block factorized by :func:`factor_block`, times
    ``transform`` when given.

    The Cholesky factors are applied by triangular solves in order, except the trailing
    well-conditioned ones (the guarded last one at least, κ ≤ 1.2; see
    :data:`WELL_CONDITIONED`): ``R_k⁻¹ ⋯ R_last⁻¹ · transform`` is formed as a small n × n
    matrix and applied in one matrix product, saving passes of TRSM over the block and
    block-sized temporaries.
    """
    if factor.chain:
        cut = len(factor.chain) - factor.folded
        q = a
        for rk in factor.chain[:cut]:
            q = solve_right_upper(q, rk, overwrite=q is not a)
        last = factor.chain[-1]
        small = np.eye(last.shape[0], dtype=last.dtype) if transform is None else transform
        for rk in reversed(factor.chain[cut:]):
            small = solve_upper(rk, small)
        return q @ like_block(small, q)
    q, r = array_module(a).linalg.qr(a)
    _, signs = _positive_diagonal(to_host(r))
    q = q * like_block(signs, q)[None, :]
    return q if transform is None else q @ like_block(transform, q)


def stack_qr(*rs: np.ndarray, root: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """QR of the vertically stacked ``R`` factors of a tree node (host).

    Returns ``(q, r)`` with ``q`` of shape (k·n, n). At the root the diagonal of ``r`` is
    made non-negative (the sign flip is folded into ``q``).
    """
    q, r = np.linalg.qr(np.concatenate(rs, axis=0))
    if root:
        r, signs = _positive_diagonal(r)
        q = q * signs[None, :]
    return q, r


def child_transform(node_q: Any, index: int, parent: Any | None) -> Any:
    """The ``n × n`` piece of a node's ``q`` for child ``index``, times the parent's."""
    n = node_q.shape[1]
    piece = node_q[index * n : (index + 1) * n]
    return piece if parent is None else piece @ parent


def summarize(*factors: BlockFactor) -> dict[str, Any]:
    """Total ``‖A‖²_F`` and how many blocks took each path."""
    counts: dict[str, int] = {}
    for f in factors:
        counts[f.method] = counts.get(f.method, 0) + 1
    return {"sumsq": float(sum(f.sumsq for f in factors)), "block_methods": counts}


def block_r(factor: BlockFactor) -> Any:
    """The ``R_i`` of a block factor."""
    return factor.r
