"""TSQR against numpy.linalg.qr on a real LocalCluster: shapes, chunkings, dtypes, conditioning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import InputError, NonFiniteInputError
from tests.conftest import cond_matrix


def numpy_r(a: np.ndarray) -> np.ndarray:
    """numpy's R with a non-negative diagonal (our convention)."""
    r = np.linalg.qr(a.astype(np.float64), mode="r")
    return r * np.where(np.diag(r) < 0, -1.0, 1.0)[:, None]


def check_qr(a: np.ndarray, q: np.ndarray, r: np.ndarray, tol: float) -> None:
    a64, q64, r64 = (x.astype(np.float64) for x in (a, q, r))
    n = a.shape[1]
    assert q.shape == a.shape and r.shape == (n, n)
    assert q.dtype == a.dtype and r.dtype == a.dtype
    assert np.array_equal(np.triu(r), r), "R must be upper-triangular"
    assert np.all(np.diag(r) >= 0), "R's diagonal must be non-negative"
    assert np.linalg.norm(a64 - q64 @ r64) / np.linalg.norm(a64) < tol
    assert np.linalg.norm(q64.T @ q64 - np.eye(n)) < tol * np.sqrt(n)


CASES = [
    # (shape, input chunks, block_rows)
    ((1000, 20), (100, 20), None),  # many blocks, one column chunk
    ((5000, 50), (333, 7), None),  # 2-D chunked and ragged → rechunked
    ((100, 100), (100, 100), None),  # square, single block
    ((2003, 17), (2003, 17), 300),  # ragged last block gets merged
    ((1024, 8), (64, 8), 16),  # 64 blocks → a tree of three levels (split_every=4)
    ((777, 31), (50, 5), 40),  # irregular everything
]


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-5)])
@pytest.mark.parametrize("shape,chunks,block_rows", CASES)
def test_tsqr_matches_numpy(client, shape, chunks, block_rows, dtype, tol):
    import dask.array as da

    from pipeline.linalg import tsqr

    a = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    res = tsqr(da.from_array(a, chunks=chunks), block_rows=block_rows, split_every=4)
    q = res.q.compute()
    check_qr(a, q, res.r, tol)
    r_ref = numpy_r(a)
    assert np.abs(res.r - r_ref).max() / np.abs(r_ref).max() < tol * 10
    assert res.sumsq == pytest.approx(float(np.sum(a.astype(np.float64) ** 2)), rel=tol)


def test_r_only_matches_q_mode(client):
    import dask.array as da

    from pipeline.linalg import tsqr

    a = np.random.default_rng(2).standard_normal((3000, 12))
    x = da.from_array(a, chunks=(500, 12))
    r_only = tsqr(x, compute_q=False)
    assert r_only.q is None
    np.testing.assert_allclose(r_only.r, tsqr(x).r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r_only.r, numpy_r(a), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kappa,path", [(1e4, "cholqr2"), (1e12, "scholqr3"), (1e15, None)])
def test_ill_conditioned_stays_orthogonal(client, kappa, path):
    import dask.array as da

    from pipeline.linalg import tsqr

    a = cond_matrix(20000, 30, kappa, seed=3)
    res = tsqr(da.from_array(a, chunks=(5000, 30)))
    if path:
        assert set(res.block_methods) == {path}
    check_qr(a, res.q.compute(), res.r, 1e-14)


@pytest.mark.filterwarnings("ignore:Sending large graph")
def test_kappa_1e12_large_block_takes_fourth_round_not_householder(client):
    """One 65,536 × 64 block at κ = 1e12: the benchmark's block, which used to fall back.

    After shifted CholeskyQR3's second round its Gram defect is ~0.4 (for this seed, with
    any BLAS threading; 40,000-row blocks sit at 0.05-0.15, too close to GRAM_GUARD for a
    stable test), so the guarded third round was refused and the block took Householder
    QR. One more Cholesky round passes the guard.
    """
    import dask.array as da

    from pipeline.linalg import _kernels as kernels
    from pipeline.linalg import tsqr

    a = cond_matrix(65_536, 64, 1e12, seed=3)
    f = kernels.factor_block(a)
    assert f.method == "scholqr4" and len(f.chain) == 4
    # the third and fourth factors are well conditioned: applied as one small product
    assert f.folded == 2
    q = kernels.block_q(a, f)
    assert np.linalg.norm(q.T @ q - np.eye(64)) < 1e-14
    assert np.linalg.norm(a - q @ f.r) / np.linalg.norm(a) < 1e-15
    res = tsqr(da.from_array(a, chunks=(65_536, 64)))  # one block, through the graph
    assert res.block_methods == {"scholqr4": 1}
    check_qr(a, res.q.compute(), res.r, 1e-14)


def test_well_conditioned_factors_as_products_equal_triangular_solves(monkeypatch):
    """Folding the well-conditioned factors (GEMM with small inverses) gives the same Q as
    triangular solves all along, to working precision."""
    from pipeline.linalg import _kernels as kernels

    a = cond_matrix(65_536, 64, 1e12, seed=3)
    folded = kernels.block_q(a, kernels.factor_block(a))
    monkeypatch.setattr(kernels, "WELL_CONDITIONED", -1.0)  # only the guarded last one
    f = kernels.factor_block(a)
    assert f.folded == 1
    solved = kernels.block_q(a, f)
    assert np.abs(folded - solved).max() < 1e-13


def test_guard_still_protects_the_final_round(monkeypatch):
    """With the guard at 0 no final round is accepted: the block falls back to Householder."""
    from pipeline.linalg import _kernels as kernels

    monkeypatch.setattr(kernels, "GRAM_GUARD", 0.0)
    a = cond_matrix(65_536, 64, 1e12, seed=3)
    f = kernels.factor_block(a)
    assert f.method == "householder" and f.chain == ()


def test_vandermonde_kappa_1e16(client):
    import dask.array as da

    from pipeline.linalg import tsqr

    x = np.linspace(0, 1, 50000)
    a = np.vander(x, 20, increasing=True)
    assert np.linalg.cond(a) > 1e13
    res = tsqr(da.from_array(a, chunks=(4000, 20)))
    q = res.q.compute()
    # A lone Q = A R⁻¹ (indirect TSQR) loses all orthogonality here; direct TSQR keeps it.
    check_qr(a, q, res.r, 1e-14)
    indirect = a @ np.linalg.inv(res.r)
    assert np.linalg.norm(indirect.T @ indirect - np.eye(20)) > 1e-3


def test_float32_ill_conditioned(client):
    import dask.array as da

    from pipeline.linalg import tsqr

    a = cond_matrix(8000, 16, 1e5, seed=4, dtype=np.float32)
    res = tsqr(da.from_array(a, chunks=(1000, 16)))
    check_qr(a, res.q.compute(), res.r, 1e-5)


def test_rank_deficient_input(client):
    import dask.array as da

    from pipeline.linalg import tsqr

    rng = np.random.default_rng(5)
    a = rng.standard_normal((3000, 10))
    a[:, 7] = a[:, 2]  # exactly dependent column
    res = tsqr(da.from_array(a, chunks=(1000, 10)))
    check_qr(a, res.q.compute(), res.r, 1e-13)
    assert abs(res.r[7, 7]) < 1e-10 * abs(res.r[0, 0])


def test_non_finite_input_is_reported_with_row(client):
    import dask.array as da

    from pipeline.linalg import tsqr

    a = np.ones((1000, 4))
    a[612, 2] = np.nan
    with pytest.raises(NonFiniteInputError, match="row 612"):
        tsqr(da.from_array(a, chunks=(100, 4)))
    a[612, 2] = np.inf
    with pytest.raises(NonFiniteInputError):
        tsqr(da.from_array(a, chunks=(100, 4)), compute_q=False)


def test_wide_and_complex_are_refused_integers_are_cast(client):
    import dask.array as da

    from pipeline.linalg import tsqr

    with pytest.raises(InputError, match=r"a must be tall .*got shape \(5, 10\); factorize a\.T"):
        tsqr(da.ones((5, 10), chunks=5))
    with pytest.raises(InputError, match="a must have a real numeric dtype, got complex128"):
        tsqr(da.ones((50, 10), chunks=5, dtype=complex))
    a = np.arange(500).reshape(50, 10) % 7 + np.eye(50, 10, dtype=int)
    res = tsqr(da.from_array(a, chunks=5))  # integers are computed in float64
    check_qr(a.astype(np.float64), res.q.compute(), res.r, 1e-13)


def test_row_blocks_span_columns_and_hold_n_rows():
    import dask.array as da

    from pipeline.linalg import row_blocks

    x = da.ones((1050, 30), chunks=(7, 11))
    b = row_blocks(x, block_rows=100)
    assert len(b.chunks[1]) == 1
    assert min(b.chunks[0]) >= 30 and sum(b.chunks[0]) == 1050
    # Storage chunks that already qualify are kept as they are.
    y = da.ones((1000, 10), chunks=(250, 10))
    assert row_blocks(y) is y


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 400),
    n=st.integers(1, 12),
    row_chunk=st.integers(1, 97),
    seed=st.integers(0, 2**16),
)
@example(m=3, n=2, row_chunk=1, seed=0)  # two blocks, the last one short: merged
def test_tsqr_property_any_shape_and_chunking(m, n, row_chunk, seed):
    """Invariant on the threaded scheduler: any tall shape and chunking gives a valid QR."""
    import dask.array as da

    from pipeline.linalg import tsqr

    m = max(m, n)
    a = np.random.default_rng(seed).standard_normal((m, n))
    import dask

    with dask.config.set(scheduler="threads"):
        res = tsqr(da.from_array(a, chunks=(row_chunk, max(1, n // 2))), block_rows=row_chunk)
        q = res.q.compute()
    check_qr(a, q, res.r, 1e-12)
