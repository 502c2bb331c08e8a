"""Block-wise metrics against numpy on the same matrices."""

from __future__ import annotations

import numpy as np
import pytest


def test_metrics_match_numpy(client):
    import dask.array as da

    from pipeline import metrics as mx

    rng = np.random.default_rng(0)
    a = rng.standard_normal((3000, 9)).astype(np.float32)
    q, r = np.linalg.qr(a.astype(np.float64))
    q = (q + 1e-6 * rng.standard_normal(q.shape)).astype(np.float32)  # imperfect on purpose
    xa, xq = da.from_array(a, chunks=(700, 9)), da.from_array(q, chunks=(700, 9))
    res_sq, g, s = da.compute(mx.residual_sq(xa, xq, r), mx.gram(xq), mx.sumsq(xa))
    a64, q64 = a.astype(np.float64), q.astype(np.float64)
    assert res_sq == pytest.approx(np.linalg.norm(a64 - q64 @ r) ** 2, rel=1e-10)
    np.testing.assert_allclose(g, q64.T @ q64, rtol=1e-12, atol=1e-12)
    assert mx.orthogonality_from_gram(g) == pytest.approx(
        np.linalg.norm(q64.T @ q64 - np.eye(9)), rel=1e-10
    )
    assert s == pytest.approx(np.sum(a64**2), rel=1e-12)
    assert mx.relative(4.0, 16.0) == 0.5
    assert mx.relative(0.0, 0.0) == 0.0


def test_residual_needs_matching_row_chunks():
    import dask.array as da

    from pipeline import metrics as mx

    with pytest.raises(ValueError, match="row chunks"):
        mx.residual_sq(da.ones((10, 2), chunks=5), da.ones((10, 2), chunks=2), np.eye(2))
