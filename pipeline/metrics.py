"""Quality metrics computed block by block on the cluster, in float64.

Nothing here gathers ``A`` or a tall factor to the client: each function returns a lazy
dask value whose blocks reduce to a scalar or a small ``n × n`` matrix, so callers can
compute metrics in the same ``dask.compute`` as the factor writes and read ``A`` once.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from pipeline.backend import array_module, sum_squares_f64, to_host

# Every per-block piece is a small float64 host array (device blocks reduce on the device
# inside the task, see pipeline.backend), so the sums never move device arrays around.
_HOST64 = np.empty((0, 0), dtype=np.float64)


def _block_residual_sq(a: Any, q: Any, r: Any, shift: Any | None = None) -> np.ndarray:
    total, _ = sum_squares_f64(a, shift=shift, q=q, r=r)
    return np.full((1, 1), total)


def _block_gram(q: Any) -> np.ndarray:
    q64 = q.astype(array_module(q).float64)
    return to_host(q64.T @ q64)


def _block_sumsq(a: Any) -> np.ndarray:
    total, _ = sum_squares_f64(a)
    return np.full((1, 1), total)


def residual_sq(a: da.Array, q: da.Array, r: Any, shift: Any | None = None) -> da.Array:
    """Lazy ``‖A − Q R − 1 shiftᵀ‖²_F`` (float64) over row blocks; ``a``, ``q`` share row chunks.

    ``shift`` (a row vector, e.g. PCA's column means) is optional.
    """
    if a.chunks[0] != q.chunks[0]:
        raise ValueError("a and q must have the same row chunks")
    a1 = a.rechunk({1: -1})
    q1 = q.rechunk({1: -1})
    parts = da.map_blocks(
        _block_residual_sq,
        a1,
        q1,
        r,
        shift,
        chunks=((1,) * a1.numblocks[0], (1,)),
        dtype=np.float64,
        meta=_HOST64,
    )
    return parts.sum()


def gram(q: da.Array) -> da.Array:
    """Lazy ``QᵀQ`` (k × k, float64) summed over row blocks."""
    q1 = q.rechunk({1: -1})
    k, nblocks = q1.shape[1], q1.numblocks[0]
    parts = da.map_blocks(  # one k × k Gram per row block, stacked along rows
        _block_gram,
        q1,
        chunks=((k,) * nblocks, (k,)),
        dtype=np.float64,
        meta=_HOST64,
    )
    return parts.reshape(nblocks, k, k).sum(axis=0)


def sumsq(a: da.Array) -> da.Array:
    """Lazy ``‖A‖²_F`` (float64)."""
    parts = da.map_blocks(
        _block_sumsq,
        a,
        chunks=((1,) * a.numblocks[0], (1,) * a.numblocks[1]),
        dtype=np.float64,
        meta=_HOST64,
    )
    return parts.sum()


def orthogonality_from_gram(g: Any) -> float:
    """``‖G − I‖_F`` for a computed Gram matrix ``G = QᵀQ``."""
    g = to_host(g).astype(np.float64)
    return float(np.linalg.norm(g - np.eye(g.shape[0])))


def relative(num_sq: float, den_sq: float) -> float:
    """``sqrt(num_sq / den_sq)``; 0 when both are 0 (an all-zero input)."""
    if den_sq == 0:
        return 0.0 if num_sq == 0 else float("inf")
    return float(np.sqrt(max(num_sq, 0.0) / den_sq))


def spectrum_shares(s: np.ndarray, total_sumsq: float, rows: int, centred: bool) -> dict:
    """What the kept singular values ``s`` hold of ``total_sumsq`` (float64).

    Centred (PCA): ``explained_variance`` ``σᵢ²/(m − 1)``, ``explained_variance_ratio``
    ``σᵢ²/‖A − 1μᵀ‖²`` and ``total_variance``; otherwise ``energy_retained``
    ``Σσᵢ²/‖A‖²`` (the share model-compression users read).
    """
    s = np.asarray(s, dtype=np.float64)
    ratio = s**2 / total_sumsq if total_sumsq > 0 else np.zeros_like(s)
    if not centred:
        return {"energy_retained": float(ratio.sum())}
    dof = max(rows - 1, 1)
    return {
        "explained_variance": (s**2 / dof).tolist(),
        "explained_variance_ratio": ratio.tolist(),
        "total_variance": total_sumsq / dof,
    }
