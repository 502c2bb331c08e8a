"""The public boundary of pipeline.linalg: argument checks, the dtype rule, any chunking.

Case tables re-express the relevant cases of upstream suites (named per row):

- dask ``dask/array/tests/test_linalg.py`` (``test_tsqr``, ``test_tsqr_uncertain``,
  ``test_tsqr_zero_height_chunks``): shapes and chunkings of TSQR;
- scikit-learn ``sklearn/utils/tests/test_extmath.py`` (``test_randomized_svd_*``);
- scikit-learn ``sklearn/decomposition/tests/test_nmf.py`` (``test_parameter_checking``,
  ``test_nmf_fit_nn_output``, ``test_nmf_fit_close``, ``test_nmf_dtype_match``,
  ``test_nmf_float32_float64_consistency``, ``test_nmf_decreasing``).

Numerics are compared in float64 against numpy / scipy / scikit-learn. Distributed cases
run on the session LocalCluster (``client``).
"""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.linalg import (
    as_matrix,
    check_choice,
    check_int,
    check_rank,
    check_tall,
    nmf,
    rsvd,
    tsqr,
    working_dtype,
)

# --------------------------------------------------------------------------- helpers


def numpy_r(a: np.ndarray) -> np.ndarray:
    r = np.linalg.qr(a.astype(np.float64), mode="r")
    return r * np.where(np.diag(r) < 0, -1.0, 1.0)[:, None]


def low_rank_ints(m: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    """An exactly rank-``k`` non-negative integer matrix (the same values in every dtype
    below 2**24, so float32, float64 and integer inputs describe one matrix)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 6, (m, k)) @ rng.integers(0, 6, (k, n))


def unknown_rows(x: da.Array) -> da.Array:
    """``x`` with NaN row chunk sizes and all rows kept (dask's ``test_tsqr_uncertain``)."""
    y = x[x[:, 0] > -np.inf]
    assert np.isnan(y.chunks[0][0])
    return y


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (np.int8, np.float64),
        (np.int32, np.float64),
        (np.uint64, np.float64),
        (np.bool_, np.float64),
        (np.float16, np.float32),
        (np.float32, np.float32),
        (np.float64, np.float64),
    ],
)
def test_working_dtype_rule(dtype, expected):
    assert working_dtype(dtype) == np.dtype(expected)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, "U3", object, "M8[s]"])
def test_working_dtype_refuses_non_real(dtype):
    with pytest.raises(InputError, match=r"^a must have a real numeric dtype, got "):
        working_dtype(dtype)


def test_messages_have_one_wording():
    with pytest.raises(InputError) as e:
        check_rank(9, (4, 7), name="methods[0].rank:")
    assert str(e.value) == (
        "methods[0].rank: must be between 1 and 4 (the smaller dimension of A, shape (4, 7)), got 9"
    )
    with pytest.raises(InputError) as e:
        check_tall((5, 10))
    assert str(e.value) == (
        "a must be tall (rows ≥ columns) for TSQR, got shape (5, 10); "
        "factorize a.T instead (transpose: true in a job)"
    )
    with pytest.raises(InputError) as e:
        check_choice("nndsvdx", "init", ("nndsvd", "nndsvda", "random"))
    assert str(e.value) == "init must be one of 'nndsvd', 'nndsvda', 'random', got 'nndsvdx'"
    with pytest.raises(InputError, match=r"^oversample must be an int ≥ 0, got -1$"):
        check_int(-1, "oversample", low=0)
    for bad in (True, 2.0, "3", None):
        with pytest.raises(InputError, match="rank must be between"):
            check_rank(bad, (4, 7))


def test_as_matrix_casts_wraps_and_sizes_unknown_chunks():
    a = as_matrix(np.ones((4, 3), dtype=np.int16))
    assert isinstance(a, da.Array) and a.dtype == np.float64
    x = da.from_array(np.arange(40.0).reshape(10, 4), chunks=(3, 2))
    b = as_matrix(x[x[:, 0] > 5])  # NaN chunks → computed
    assert b.shape == (8, 4) and not np.isnan(b.chunks[0]).any()
    assert as_matrix(x) is x  # float64, known chunks: untouched (no rechunk)
    with pytest.raises(InputError, match=r"^a must be a 2-D matrix, got 3-D with shape"):
        as_matrix(da.ones((2, 2, 2)))
    with pytest.raises(InputError, match=r"^a must be a non-empty matrix, got shape \(0, 3\)"):
        as_matrix(np.ones((0, 3)))
    with pytest.raises(InputError, match="non-empty"):
        as_matrix(x[x[:, 0] > 1e9])  # empty once the unknown chunks are known


A = da.ones((50, 10), chunks=10)
W = da.ones((5, 10), chunks=5)
NEG = da.from_array(-np.eye(20, 10), chunks=10)

# Every bad argument of the three functions: (function, args, kwargs, message pattern).
# Rows marked sklearn mirror test_nmf.py::test_parameter_checking and
# test_extmath.py's argument checks; the rest are ours.
BAD_ARGUMENTS = [
    # tsqr (dask test_tsqr: wide input raises; ndim/dtype added)
    (tsqr, (W,), {}, r"a must be tall \(rows ≥ columns\) for TSQR, got shape \(5, 10\)"),
    (tsqr, (da.ones((4, 4, 4)),), {}, r"a must be a 2-D matrix, got 3-D"),
    (tsqr, (da.ones((0, 3)),), {}, r"a must be a non-empty matrix, got shape \(0, 3\)"),
    (tsqr, (A.astype(complex),), {}, r"a must have a real numeric dtype, got complex128"),
    (tsqr, (np.array([["x"]]),), {}, r"a must have a real numeric dtype, got <U1"),
    (tsqr, (A,), {"split_every": 1}, r"split_every must be an int ≥ 2, got 1"),
    (tsqr, (A,), {"split_every": 2.5}, r"split_every must be an int ≥ 2, got 2.5"),
    (tsqr, (A,), {"block_rows": 0}, r"block_rows must be an int ≥ 1, got 0"),
    (tsqr, (A,), {"compute_q": "yes"}, r"compute_q must be True or False, got 'yes'"),
    # rsvd (sklearn randomized_svd: n_components > min(shape), negative n_oversamples…)
    (rsvd, (A, 0), {}, r"rank must be between 1 and 10 \(.*shape \(50, 10\)\), got 0"),
    (rsvd, (A, 11), {}, r"rank must be between 1 and 10 .*, got 11"),
    (rsvd, (A, 2.0), {}, r"rank must be between 1 and 10 .*, got 2.0"),
    (rsvd, (A, True), {}, r"rank must be between 1 and 10 .*, got True"),
    (rsvd, (A.astype(complex), 2), {}, r"a must have a real numeric dtype, got complex128"),
    (rsvd, (A, 2), {"oversample": -1}, r"oversample must be an int ≥ 0, got -1"),
    (rsvd, (A, 2), {"power_iters": -1}, r"power_iters must be .auto. or an int ≥ 0, got -1"),
    (rsvd, (A, 2), {"power_iters": 1.5}, r"power_iters must be .auto. or an int ≥ 0, got 1.5"),
    (rsvd, (A, 2), {"power_iters": "x"}, r"power_iters must be .auto. or an int ≥ 0, got .x."),
    (rsvd, (A, 2), {"iteration": "qr"}, r"iteration must be one of .krylov., .power., got .qr."),
    (rsvd, (A, 2), {"tol": -1.0}, r"tol must be ≥ 0, got -1.0"),
    (rsvd, (A, 2), {"max_power_iters": 0}, r"max_power_iters must be an int ≥ 1, got 0"),
    (rsvd, (A, 2), {"seed": -1}, r"seed must be an int ≥ 0, got -1"),
    (rsvd, (A, 2), {"center": "yes"}, r"center must be True or False, got 'yes'"),
    (rsvd, (A, 2), {"single_pass": None}, r"single_pass must be True or False, got None"),
    (rsvd, (A, 2), {"block_rows": -5}, r"block_rows must be an int ≥ 1, got -5"),
    # nmf (sklearn test_parameter_checking: solver, init, negative input, n_components)
    (nmf, (A, 0), {}, r"rank must be between 1 and 10 .*, got 0"),
    (nmf, (A, 11), {}, r"rank must be between 1 and 10 .*, got 11"),
    (nmf, (A, 2), {"solver": "spam"}, r"solver must be one of 'hals', 'mu', got 'spam'"),
    (
        nmf,
        (A, 2),
        {"init": "nndsvdx"},
        r"init must be one of 'nndsvd', 'nndsvda', 'random', got 'nndsvdx'",
    ),
    (nmf, (A, 2), {"max_iter": -1}, r"max_iter must be an int ≥ 0, got -1"),
    (nmf, (A, 2), {"tol": -1}, r"tol must be ≥ 0, got -1"),
    (nmf, (A, 2), {"tol": float("nan")}, r"tol must be ≥ 0, got nan"),
    (nmf, (A, 2), {"tol": "small"}, r"tol must be a real number ≥ 0, got 'small'"),
    (nmf, (A, 2), {"seed": -3}, r"seed must be an int ≥ 0, got -3"),
    (nmf, (A, 2), {"inner_sweeps": 0}, r"inner_sweeps must be an int ≥ 1, got 0"),
    (nmf, (A, 2), {"block_rows": 0}, r"block_rows must be an int ≥ 1, got 0"),
    (nmf, (A.astype(complex), 2), {}, r"a must have a real numeric dtype, got complex128"),
    (nmf, (NEG, 2), {}, r"a must be non-negative for NMF, got a smallest entry of -1"),
]


@pytest.mark.parametrize(
    "func,args,kwargs,pattern",
    BAD_ARGUMENTS,
    ids=[f"{f.__name__}-{i}" for i, (f, *_) in enumerate(BAD_ARGUMENTS)],
)
def test_bad_arguments_are_refused(func, args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as e:  # InputError is a ValueError
        func(*args, **kwargs)
    assert isinstance(e.value, InputError)
    assert " must " in str(e.value) and ", got " in str(e.value)


# --------------------------------------------------------------------------- tsqr

TSQR_SHAPES = [
    # (m, n, chunks) — dask test_linalg.py::test_tsqr rows, then ours
    (20, 10, 10),  # tall, two blocks
    (20, 10, (3, 10)),  # many blocks, each shorter than n (merged to hold n rows)
    (20, 10, ((8, 6, 6), (10,))),  # uneven blocks
    (40, 10, ((15, 5, 5, 8, 7), (10,))),  # uneven blocks
    (128, 2, (16, 2)),  # many blocks
    (131, 2, (16, 2)),  # many blocks, ragged last
    (300, 10, (40, 10)),
    (10, 5, 10),  # single block
    (10, 10, 10),  # square
    (20, 10, (5, 3)),  # 2-D chunked (dask refuses several column chunks; we rechunk)
    (50, 1, 7),  # one column
    (1, 1, 1),  # one entry
]


@pytest.mark.parametrize("m,n,chunks", TSQR_SHAPES)
def test_tsqr_shapes_and_chunkings(client, m, n, chunks):
    a = np.random.default_rng(m * n).standard_normal((m, n))
    res = tsqr(da.from_array(a, chunks=chunks), split_every=2)
    q, r = res.q.compute(), res.r
    assert q.shape == (m, n) and r.shape == (n, n)
    assert np.array_equal(np.triu(r), r)
    np.testing.assert_allclose(q @ r, a, atol=1e-13 * max(1.0, np.abs(a).max()))
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-13)
    np.testing.assert_allclose(r, numpy_r(a), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunks", [(10, 5), (7, 2), (100, 5)])
def test_tsqr_unknown_chunk_sizes(client, chunks):
    """dask test_tsqr_uncertain: row chunks of unknown size (boolean indexing)."""
    a = np.random.default_rng(7).standard_normal((100, 5))
    x = unknown_rows(da.from_array(a, chunks=chunks))
    res = tsqr(x)
    assert res.a.shape == (100, 5)
    np.testing.assert_allclose(res.q.compute() @ res.r, a, atol=1e-12)
    np.testing.assert_allclose(res.r, numpy_r(a), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "dtype,expected,tol",
    [
        (np.float64, np.float64, 1e-13),
        (np.float32, np.float32, 1e-5),
        (np.float16, np.float32, 1e-5),
        (np.int32, np.float64, 1e-13),
        (np.int64, np.float64, 1e-13),
    ],
)
def test_tsqr_dtype_rule(client, dtype, expected, tol):
    a = (low_rank_ints(60, 6, 6, seed=1) + 7 * np.eye(60, 6, dtype=int)).astype(dtype)
    res = tsqr(da.from_array(a, chunks=(20, 6)))
    q = res.q.compute()
    assert q.dtype == expected and res.r.dtype == expected and isinstance(res.sumsq, float)
    a64 = a.astype(np.float64)
    assert np.linalg.norm(a64 - q.astype(np.float64) @ res.r) / np.linalg.norm(a64) < tol
    assert res.sumsq == pytest.approx(float(np.sum(a64**2)), rel=tol)


def test_tsqr_accepts_numpy_input(client):
    a = np.random.default_rng(3).standard_normal((30, 4))
    np.testing.assert_allclose(tsqr(a).r, numpy_r(a), rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------- rsvd


@pytest.mark.parametrize(
    "dtype,expected,rtol",
    [
        (np.float64, np.float64, 1e-10),
        (np.float32, np.float32, 1e-4),
        (np.int32, np.float64, 1e-10),
        (np.int64, np.float64, 1e-10),
    ],
)
def test_rsvd_low_rank_all_dtypes(client, dtype, expected, rtol):
    """sklearn test_randomized_svd_low_rank_all_dtypes: 100 × 500, rank 5 → exact."""
    import scipy.linalg

    a = low_rank_ints(100, 500, 5, seed=2).astype(dtype)
    res = rsvd(da.from_array(a, chunks=(30, 200)), 5)
    u = res.u.compute()
    assert u.dtype == expected and res.s.dtype == expected and res.vt.dtype == expected
    assert res.s64.dtype == np.float64 and isinstance(res.total_sumsq, float)
    s_ref = scipy.linalg.svd(a.astype(np.float64), compute_uv=False)[:5]
    np.testing.assert_allclose(res.s64, s_ref, rtol=rtol)
    approx = (u.astype(np.float64) * res.s64) @ res.vt.astype(np.float64)
    a64 = a.astype(np.float64)
    assert np.linalg.norm(a64 - approx) / np.linalg.norm(a64) < 10 * rtol
    # the formula residual keeps float64 digits whatever the factors' dtype
    assert abs(res.residual_sumsq) <= 1e3 * np.finfo(expected).eps * res.total_sumsq


def test_rsvd_pca_float32_mean_dtype(client):
    a = (low_rank_ints(200, 30, 4, seed=5) + 100).astype(np.float32)
    res = rsvd(da.from_array(a, chunks=(50, 30)), 4, center=True)
    assert res.mean.dtype == np.float32 and res.mean64.dtype == np.float64
    np.testing.assert_allclose(res.mean64, a.astype(np.float64).mean(axis=0), rtol=1e-12)


def test_rsvd_sign_flip_is_deterministic(client):
    """sklearn test_randomized_svd_sign_flip: same signs whatever the random sketch."""
    a = np.random.default_rng(4).standard_normal((300, 40)) * np.logspace(0, -3, 40)
    x = da.from_array(a, chunks=(100, 40))
    r0, r1 = rsvd(x, 5, seed=0, power_iters=4), rsvd(x, 5, seed=1, power_iters=4)
    u0, u1 = r0.u.compute(), r1.u.compute()
    np.testing.assert_allclose(u0, u1, atol=1e-5)  # same signs (a flip would be O(1))
    np.testing.assert_allclose(r0.vt, r1.vt, atol=1e-5)
    assert np.all(u0[np.argmax(np.abs(u0), axis=0), np.arange(5)] > 0)


def test_rsvd_transpose_consistency(client):
    """sklearn test_randomized_svd_transpose_consistency: A and Aᵀ give one approximation."""
    a = low_rank_ints(60, 90, 6, seed=6).astype(np.float64)
    r1 = rsvd(da.from_array(a, chunks=(20, 90)), 6)
    r2 = rsvd(da.from_array(a.T, chunks=(30, 60)), 6)
    np.testing.assert_allclose(r1.s, r2.s, rtol=1e-10)
    a1 = (r1.u.compute() * r1.s) @ r1.vt
    a2 = ((r2.u.compute() * r2.s) @ r2.vt).T
    np.testing.assert_allclose(a1, a2, atol=1e-9 * np.abs(a).max())


@pytest.mark.parametrize(
    "shape,rank,chunks",
    [((1, 5), 1, 1), ((6, 1), 1, 2), ((7, 7), 7, 3), ((40, 12), 3, (4, 5))],
)
def test_rsvd_edge_shapes_and_chunkings(client, shape, rank, chunks):
    a = np.random.default_rng(8).standard_normal(shape)
    res = rsvd(da.from_array(a, chunks=chunks), rank, power_iters=3)
    s_ref = np.linalg.svd(a, compute_uv=False)[:rank]
    np.testing.assert_allclose(res.s, s_ref, rtol=1e-8)
    assert res.u.compute().shape == (shape[0], rank) and res.vt.shape == (rank, shape[1])


def test_rsvd_unknown_chunk_sizes(client):
    a = low_rank_ints(80, 20, 3, seed=9).astype(np.float64)
    res = rsvd(unknown_rows(da.from_array(a, chunks=(15, 7))), 3)
    np.testing.assert_allclose(res.s, np.linalg.svd(a, compute_uv=False)[:3], rtol=1e-10)
    assert res.u.compute().shape == (80, 3)


# --------------------------------------------------------------------------- nmf


def test_nmf_fit_nn_output(client):
    """sklearn test_nmf_fit_nn_output: non-negative factors for every solver and init."""
    a = np.c_[5.0 - np.arange(1, 6), 5.0 + np.arange(1, 6)]
    for solver in ("hals", "mu"):
        for init in ("nndsvd", "nndsvda", "random"):
            res = nmf(a, 2, solver=solver, init=init, max_iter=5)
            assert res.w.compute().min() >= 0 and res.h.min() >= 0, (solver, init)


def test_nmf_fit_close(client):
    """sklearn test_nmf_fit_close: 6 × 5, rank 5, small absolute reconstruction error
    (sklearn gives cd 600 iterations; 100 accelerated HALS iterations reach 0.02)."""
    a = np.abs(np.random.default_rng(42).standard_normal((6, 5)))
    res = nmf(a, 5, max_iter=100, tol=1e-10)
    err = np.linalg.norm(a - res.w.compute() @ res.h)
    assert err < 0.1


@pytest.mark.parametrize(
    "dtype,expected",
    [(np.float64, np.float64), (np.float32, np.float32), (np.int32, np.float64)],
)
def test_nmf_dtype_match(client, dtype, expected):
    """sklearn test_nmf_dtype_match: float32 stays float32; integers are cast to float64."""
    a = low_rank_ints(60, 20, 3, seed=10).astype(dtype)
    res = nmf(da.from_array(a, chunks=(15, 20)), 3, max_iter=10)
    assert res.w.compute().dtype == expected and res.h.dtype == expected
    assert all(isinstance(v, float) for v in res.history) and isinstance(res.sumsq, float)
    a64 = a.astype(np.float64)
    err = np.linalg.norm(a64 - res.w.compute().astype(np.float64) @ res.h) / np.linalg.norm(a64)
    assert err == pytest.approx(res.history[-1], rel=1e-3 if dtype == np.float32 else 1e-8)


def test_nmf_float32_float64_consistency(client):
    """sklearn test_nmf_float32_float64_consistency: the same run in both precisions."""
    a = np.random.default_rng(11).random((80, 25))
    r32 = nmf(da.from_array(a.astype(np.float32), chunks=(20, 25)), 4, max_iter=15, tol=0)
    r64 = nmf(da.from_array(a, chunks=(20, 25)), 4, max_iter=15, tol=0)
    np.testing.assert_allclose(r32.history, r64.history, rtol=1e-4)
    np.testing.assert_allclose(r32.h, r64.h, rtol=1e-2, atol=1e-3 * r64.h.max())


def test_nmf_matches_sklearn_and_decreases(client):
    """sklearn test_nmf_decreasing / test_nmf_close: the objective never increases and
    the error reaches scikit-learn's at the same init and budget."""
    from sklearn.decomposition import NMF

    a = np.abs(np.random.default_rng(12).standard_normal((200, 30)))
    res = nmf(da.from_array(a, chunks=(50, 30)), 5, max_iter=50, tol=1e-6)
    assert np.all(np.diff(res.history) <= 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NMF(5, init="nndsvda", solver="cd", max_iter=50, tol=1e-6, random_state=0)
        w = model.fit_transform(a)
    ref = np.linalg.norm(a - w @ model.components_) / np.linalg.norm(a)
    assert res.history[-1] <= 1.03 * ref


NMF_CHUNKINGS = [
    # (shape, chunks, rank, block_rows) — small inputs and chunkings that used to fail
    ((10, 30), (5, 30), 3, None),  # row blocks shorter than rank + 10 (was: zip() error)
    ((10, 30), (5, 30), 3, 5),  # the same with block_rows
    ((40, 30), (10, 7), 4, None),  # column chunks (was: numpy matmul ValueError)
    ((40, 30), (3, 30), 8, None),  # many tiny row blocks
    ((1, 5), (1, 5), 1, None),  # one row
    ((6, 1), (2, 1), 1, None),  # one column
]


@pytest.mark.parametrize("shape,chunks,rank,block_rows", NMF_CHUNKINGS)
def test_nmf_any_chunking(client, shape, chunks, rank, block_rows):
    a = np.random.default_rng(13).random(shape) + 0.1
    res = nmf(da.from_array(a, chunks=chunks), rank, max_iter=20, block_rows=block_rows)
    w = res.w.compute()
    assert w.shape == (shape[0], rank) and res.h.shape == (rank, shape[1])
    assert w.min() >= 0 and res.h.min() >= 0
    err = np.linalg.norm(a - w @ res.h) / np.linalg.norm(a)
    # (abs: the objective from the pass is exact to ~√ε when the fit is exact)
    assert err == pytest.approx(res.history[-1], rel=1e-6, abs=1e-7)
    s = np.linalg.svd(a, compute_uv=False)
    assert err <= np.sqrt(np.sum(s[rank:] ** 2)) / np.linalg.norm(a) + 0.15


def test_nmf_unknown_chunk_sizes(client):
    a = np.random.default_rng(14).random((60, 12))
    res = nmf(unknown_rows(da.from_array(a, chunks=(13, 12))), 3, max_iter=10)
    assert res.w.compute().shape == (60, 3)
    np.testing.assert_allclose(
        np.linalg.norm(a - res.w.compute() @ res.h) / np.linalg.norm(a), res.history[-1], rtol=1e-6
    )


def test_nmf_svd_callback_with_other_row_chunks(client):
    """An ``svd=`` whose ``u`` comes back in other row chunks is aligned to ``a``'s blocks."""
    a = np.random.default_rng(15).random((90, 20))

    def svd(x, k, seed):
        r = rsvd(x, k, seed=seed)
        return r.u.rechunk((7, k)), r.s, r.vt

    res = nmf(da.from_array(a, chunks=(30, 20)), 3, max_iter=10, svd=svd)
    ref = nmf(da.from_array(a, chunks=(30, 20)), 3, max_iter=10, svd=svd_default_like)
    np.testing.assert_allclose(res.history, ref.history, rtol=1e-10)


def svd_default_like(x, k, seed):
    r = rsvd(x, k, seed=seed)
    return r.u, r.s, r.vt


def test_nmf_integer_input_is_not_integer_arithmetic(client):
    """Integers used to be computed in integer arithmetic; now in float64."""
    a = low_rank_ints(30, 12, 2, seed=16)
    res_int = nmf(a.astype(np.int64), 2, max_iter=10)
    res_f64 = nmf(a.astype(np.float64), 2, max_iter=10)
    np.testing.assert_allclose(res_int.history, res_f64.history, rtol=1e-8)
    np.testing.assert_allclose(res_int.h, res_f64.h, rtol=1e-6, atol=1e-9)
