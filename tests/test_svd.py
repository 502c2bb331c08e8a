"""Exact SVD / PCA on TSQR against numpy and scikit-learn, on a real LocalCluster.

``u`` re-reads the input blocks whose keys the R pass left on the scheduler, so it is
computed with ``**UNOPTIMIZED`` (see pipeline.linalg.tsqr), as a job must.
"""

from __future__ import annotations

import re
import threading

import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import InputError, NonFiniteInputError
from pipeline.linalg.svd import SVDResult, svd
from tests.conftest import cond_matrix, job_dict, write_array
from tests.test_tsqr import CASES  # the same shapes and chunkings as TSQR

EPS64 = float(np.finfo(np.float64).eps)


def flip(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's svd_flip(u, v, u_based_decision=False), for numpy's reference."""
    signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
    return u * signs, vt * signs[:, None]


def reference(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    u, vt = flip(u, vt)
    return u, s, vt


def check_svd(a: np.ndarray, res: SVDResult, u: np.ndarray, tol: float) -> None:
    """Values, sign-fixed vectors, orthonormal U and the reconstruction, all against numpy."""
    m, n = a.shape
    k = res.s.shape[0]
    u_ref, s_ref, vt_ref = reference(a)
    assert u.shape == (m, k) and res.vt.shape == (k, n)
    assert u.dtype == res.s.dtype == res.vt.dtype == a.dtype
    assert np.all(np.diff(res.s.astype(np.float64)) <= 0)
    assert np.max(np.abs(res.singular_values_all - s_ref)) <= tol * s_ref[0]
    # Vectors: the test matrices have well-separated singular values (relative gaps ≥ ~2 %).
    np.testing.assert_allclose(res.vt, vt_ref[:k], atol=200 * tol)
    np.testing.assert_allclose(u, u_ref[:, :k], atol=200 * tol)
    u64 = u.astype(np.float64)
    assert np.linalg.norm(u64.T @ u64 - np.eye(k)) < tol * 10 * np.sqrt(k)
    if k == n:
        approx = (u64 * res.s.astype(np.float64)) @ res.vt.astype(np.float64)
        assert np.linalg.norm(a - approx) / np.linalg.norm(a) < 10 * tol


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("shape,chunks,block_rows", CASES)
def test_svd_matches_numpy(client, shape, chunks, block_rows, dtype, tol):
    from pipeline.linalg.tsqr import UNOPTIMIZED

    a = cond_matrix(*shape, kappa=10.0, seed=1, dtype=dtype)  # σ log-spaced 1 … 0.1
    res = svd(da.from_array(a, chunks=chunks), block_rows=block_rows, split_every=4)
    check_svd(a, res, res.u.compute(**UNOPTIMIZED), tol)
    assert res.passes == 2 and res.mean is None
    assert res.u.chunks[0] == res.a.chunks[0]
    sumsq = float(np.sum(a.astype(np.float64) ** 2))
    assert res.sumsq == pytest.approx(sumsq, rel=10 * tol)
    assert res.centred_sumsq == pytest.approx(sumsq, rel=10 * tol)


@pytest.mark.parametrize("kappa", [1e4, 1e8, 1e12])
def test_small_singular_values_survive_where_the_gram_route_fails(client, kappa):
    a = cond_matrix(20000, 30, kappa, seed=3)
    res = svd(da.from_array(a, chunks=(2500, 30)), compute_u=False)
    s_ref = np.linalg.svd(a, compute_uv=False)
    # Backward stable: every σ within a few u·σ₁ of the reference.
    assert np.max(np.abs(res.s - s_ref)) <= 20 * EPS64 * s_ref[0]
    ours_min = abs(res.s[-1] - s_ref[-1]) / s_ref[-1]
    # The covariance route (scanpy's covariance_eigh): eigh(AᵀA), errors of u·σ₁²/σ_i.
    eig = np.linalg.eigvalsh(a.T @ a)[::-1]
    gram_s = np.sqrt(np.clip(eig, 0, None))
    gram_min = abs(gram_s[-1] - s_ref[-1]) / s_ref[-1]
    if kappa == 1e12:
        assert ours_min < 1e-3  # ~u·κ = 1e-4: all a backward-stable method can promise
        assert gram_min > 1e3 * max(ours_min, EPS64)  # orders of magnitude worse: garbage
        assert gram_min > 0.5
    else:
        assert ours_min < 100 * EPS64 * kappa


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize(
    "shape,chunks,rank",
    [((3000, 20), (250, 7), None), ((1001, 40), (1001, 40), 10), ((4096, 6), (64, 6), 3)],
)
def test_pca_matches_sklearn(client, shape, chunks, rank, dtype, tol):
    from sklearn.decomposition import PCA

    from pipeline.linalg.tsqr import UNOPTIMIZED

    rng = np.random.default_rng(7)
    m, n = shape
    a = cond_matrix(m, n, 100.0, seed=7) * 10 + rng.uniform(-5, 5, n)
    a = a.astype(dtype)
    res = svd(da.from_array(a, chunks=chunks), center=True, rank=rank, block_rows=128)
    u = res.u.compute(**UNOPTIMIZED)
    ref = PCA(n_components=rank, svd_solver="full").fit(a.astype(np.float64))
    k = ref.n_components_
    assert u.shape == (m, k) and res.passes == 2
    assert res.s.dtype == res.vt.dtype == res.mean.dtype == u.dtype == a.dtype
    rel = tol * ref.singular_values_[0]
    np.testing.assert_allclose(res.s, ref.singular_values_, rtol=0, atol=rel)
    np.testing.assert_allclose(res.vt, ref.components_, rtol=0, atol=100 * tol)
    np.testing.assert_allclose(res.mean, ref.mean_, rtol=0, atol=tol * np.abs(a).max())
    np.testing.assert_allclose(
        res.explained_variance, ref.explained_variance_, rtol=10 * tol, atol=0
    )
    np.testing.assert_allclose(
        res.explained_variance_ratio, ref.explained_variance_ratio_, rtol=10 * tol, atol=0
    )
    scores = ref.transform(a.astype(np.float64))
    np.testing.assert_allclose(u * res.s, scores, rtol=0, atol=100 * tol * np.abs(scores).max())
    centred = a.astype(np.float64) - a.astype(np.float64).mean(axis=0)
    assert res.centred_sumsq == pytest.approx(float(np.sum(centred**2)), rel=10 * tol)
    assert res.sumsq == pytest.approx(float(np.sum(a.astype(np.float64) ** 2)), rel=10 * tol)


def test_pca_with_a_mean_far_above_the_spread(client):
    """mean/spread = 1e6: the covariance matrix loses ~12 digits, the augmented TSQR ~6."""
    rng = np.random.default_rng(11)
    spread = cond_matrix(20000, 12, 1e3, seed=11)
    a = spread + 1e6 * np.abs(spread).max() * rng.uniform(0.5, 2.0, 12)
    res = svd(da.from_array(a, chunks=(3000, 12)), center=True)
    centred = spread - spread.mean(axis=0)  # exact centring of the spread part
    _, s_ref, vt_ref = reference(centred)
    err = np.max(np.abs(res.s - s_ref)) / s_ref[0]
    assert err < 1e-8
    assert np.max(np.abs(res.s - s_ref) / s_ref) < 1e-6  # even σ_min = 1e-3 σ₁
    np.testing.assert_allclose(res.vt, flip(np.eye(12), vt_ref)[1], atol=1e-6)
    np.testing.assert_allclose(res.mean, a.mean(axis=0), rtol=1e-13)
    # Covariance route, as scikit-learn's covariance_eigh: AᵀA/m − μμᵀ.
    mu = a.mean(axis=0)
    cov = a.T @ a - len(a) * np.outer(mu, mu)
    cov_s = np.sqrt(np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None))
    assert np.max(np.abs(cov_s - s_ref)) / s_ref[0] > 1e3 * err


def test_rank_truncation_keeps_the_top_triplets(client):
    from pipeline.linalg.tsqr import UNOPTIMIZED

    a = cond_matrix(3000, 25, 1e3, seed=5)
    x = da.from_array(a, chunks=(400, 25))
    full, top = svd(x), svd(x, rank=6)
    assert top.s.shape == (6,) and top.vt.shape == (6, 25) and top.u.shape == (3000, 6)
    np.testing.assert_allclose(top.s, full.s[:6], rtol=1e-14)
    np.testing.assert_allclose(top.vt, full.vt[:6], atol=1e-14)
    np.testing.assert_allclose(
        top.u.compute(**UNOPTIMIZED), full.u.compute(**UNOPTIMIZED)[:, :6], atol=1e-13
    )
    np.testing.assert_allclose(top.singular_values_all, full.singular_values_all, rtol=1e-14)
    for bad in (0, 26, 2.5, -1):
        with pytest.raises(InputError, match="rank"):
            svd(x, rank=bad)


class _Reads:
    """Counts block reads of a lazily produced input (threaded scheduler)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, block: np.ndarray) -> np.ndarray:
        with self.lock:
            self.count += 1
        return block.copy()


class _Computes(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    def _start(self, dsk):
        self.starts += 1


@pytest.mark.parametrize("center", [False, True])
def test_compute_u_false_reads_a_once(center):
    import dask

    from pipeline.linalg.tsqr import UNOPTIMIZED

    a = cond_matrix(4000, 10, 1e3, seed=8) + (3.0 if center else 0.0)
    reads = _Reads()
    x = da.from_array(a, chunks=(500, 10)).map_blocks(reads, meta=np.empty((0, 0), a.dtype))
    with dask.config.set(scheduler="threads"), _Computes() as computes:
        res = svd(x, compute_u=False, center=center)
    assert res.u is None and res.passes == 1
    assert reads.count == 8, "each row block read exactly once"
    assert computes.starts == 1, "one compute, nothing else"
    u_ref, s_ref, _ = reference(a - a.mean(axis=0) if center else a)
    np.testing.assert_allclose(res.s, s_ref, rtol=1e-9)
    with dask.config.set(scheduler="threads"):
        res = svd(x, center=center)
        assert reads.count == 16  # the R pass
        u = res.u.compute(**UNOPTIMIZED)
    assert reads.count == 24 and res.passes == 2  # and one more for U
    np.testing.assert_allclose(u, u_ref, atol=1e-9)


def test_q_times_equals_q_at_m(client):
    from pipeline.linalg import tsqr
    from pipeline.linalg.tsqr import UNOPTIMIZED

    a = np.random.default_rng(9).standard_normal((3000, 12))
    res = tsqr(da.from_array(a, chunks=(300, 12)), split_every=3)
    m = np.random.default_rng(10).standard_normal((12, 5))
    qm = res.q_times(m)
    assert qm.shape == (3000, 5) and qm.chunks[0] == res.a.chunks[0]
    np.testing.assert_allclose(
        qm.compute(**UNOPTIMIZED), res.q.compute(**UNOPTIMIZED) @ m, atol=1e-13
    )
    with pytest.raises(ValueError, match="shape"):
        res.q_times(np.ones((11, 5)))
    with pytest.raises(ValueError, match="compute_q"):
        tsqr(da.from_array(a, chunks=(300, 12)), compute_q=False).q_times(m)


@pytest.mark.parametrize("center", [False, True])
def test_non_finite_input_raises(client, center):
    a = np.ones((1000, 4)) + np.arange(4)
    a[612, 2] = np.nan
    with pytest.raises(NonFiniteInputError, match="row 612"):
        svd(da.from_array(a, chunks=(100, 4)), center=center, compute_u=False)


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match=r"a\.T"):
        svd(da.ones((5, 10), chunks=5))
    with pytest.raises(InputError, match="2-D"):
        svd(da.ones((50,), chunks=5))
    with pytest.raises(InputError, match="dtype"):
        svd(da.ones((50, 3), chunks=5, dtype=complex))
    with pytest.raises(InputError, match="more rows"):
        svd(da.ones((4, 4), chunks=2), center=True)
    with pytest.raises(InputError, match="split_every"):
        svd(da.ones((50, 3), chunks=5), split_every=1)
    with pytest.raises(InputError, match="center must be True or False"):
        svd(da.ones((50, 3), chunks=5), center="yes")
    with pytest.raises(InputError, match="block_rows"):
        svd(da.ones((50, 3), chunks=5), center=True, block_rows=-5)


def test_integers_are_computed_in_float64():
    import dask

    from pipeline.linalg.tsqr import UNOPTIMIZED

    a = np.random.default_rng(12).integers(-50, 50, size=(500, 6))
    with dask.config.set(scheduler="threads"):
        res = svd(da.from_array(a, chunks=(100, 6)))
        u = res.u.compute(**UNOPTIMIZED)
    assert res.s.dtype == u.dtype == np.float64
    np.testing.assert_allclose(res.s, np.linalg.svd(a.astype(float), compute_uv=False), rtol=1e-13)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(2, 300),
    n=st.integers(1, 10),
    row_chunk=st.integers(1, 97),
    center=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(m=3, n=2, row_chunk=1, center=True, seed=0)  # short blocks, augmented to n + 1
def test_svd_property_any_shape_and_chunking(m, n, row_chunk, center, seed):
    """Invariant on the threaded scheduler: values match numpy, U S Vt rebuilds the input."""
    import dask

    from pipeline.linalg.tsqr import UNOPTIMIZED

    m = max(m, n + 1)
    a = np.random.default_rng(seed).standard_normal((m, n))
    x = da.from_array(a, chunks=(row_chunk, max(1, n // 2)))
    with dask.config.set(scheduler="threads"):
        res = svd(x, center=center, block_rows=row_chunk)
        u = res.u.compute(**UNOPTIMIZED)
    target = a - a.mean(axis=0) if center else a
    s_ref = np.linalg.svd(target, compute_uv=False)
    assert np.max(np.abs(res.s - s_ref)) <= 1e-12 * max(s_ref[0], 1.0)
    approx = (u * res.s) @ res.vt
    assert np.linalg.norm(target - approx) <= 1e-12 * max(np.linalg.norm(target), 1.0)
    assert np.linalg.norm(u.T @ u - np.eye(n)) < 1e-12


# --------------------------------------------------------------------------- as a job


def _job_result(tmp_path, client, data, chunks, method, name="svd-job"):
    import xarray as xr

    from pipeline import run_job

    write_array(tmp_path / f"{name}.zarr", data, chunks=chunks)
    job = job_dict(tmp_path, str(tmp_path / f"{name}.zarr"), name=name, methods=[method])
    report = run_job(job, client=client)
    out = tmp_path / "out" / name
    return report["methods"]["svd"], xr.open_zarr(out / "factors.zarr", group="svd"), out


def test_svd_job_is_exact_at_kappa_1e12(tmp_path, client):
    a = cond_matrix(6000, 12, 1e12, seed=7)
    r, ds, out = _job_result(tmp_path, client, a, (1000, 12), {"method": "svd"})
    s_ref = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(ds["S"].values, s_ref, rtol=1e-3, atol=1e-15 * s_ref[0])
    np.testing.assert_allclose(r["singular_values"], ds["S"].values)
    u, s, vt = ds["U"].values, ds["S"].values, ds["Vt"].values
    assert ds["U"].dims == ("row", "component") and ds["Vt"].dims == ("component", "col")
    measured = np.linalg.norm(a - (u * s) @ vt) / np.linalg.norm(a)
    assert r["residual_rel"] == pytest.approx(measured, rel=1e-3, abs=1e-16)
    assert r["residual_rel"] < 1e-14 and r["residual_method"] == "direct"
    assert r["orthogonality_u"] < 1e-13 and r["orthogonality_v"] < 1e-13
    assert r["passes"] == 2 and r["reads_from_storage"] == 1  # small: kept in memory
    assert (out / "svd_spectrum.png").read_bytes()[:4] == b"\x89PNG"


def test_svd_job_pca_matches_sklearn(tmp_path, client):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(8)
    a = rng.standard_normal((3000, 9)) @ rng.standard_normal((9, 9)) + 50.0
    method = {"method": "svd", "center": True, "rank": 4}
    r, ds, _ = _job_result(tmp_path, client, a, (700, 9), method)
    pca = PCA(n_components=4, svd_solver="full").fit(a)
    np.testing.assert_allclose(ds["Vt"].values, pca.components_, atol=1e-10)
    np.testing.assert_allclose(ds["mean"].values, pca.mean_, rtol=1e-12)
    np.testing.assert_allclose(r["explained_variance"], pca.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(
        r["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-10
    )
    scores = ds["U"].values * ds["S"].values
    np.testing.assert_allclose(scores, pca.transform(a), atol=1e-8)
    centred = a - a.mean(axis=0)
    approx = scores @ ds["Vt"].values
    assert r["residual_rel"] == pytest.approx(
        np.linalg.norm(centred - approx) / np.linalg.norm(a), rel=1e-6
    )
    assert r["residual_rel_centered"] == pytest.approx(
        np.linalg.norm(centred - approx) / np.linalg.norm(centred), rel=1e-6
    )


def test_svd_job_transposed_writes_the_factors_of_a(tmp_path, client):
    a = np.random.default_rng(9).standard_normal((15, 4000))  # wide
    method = {"method": "svd", "transpose": True, "rank": 5}
    r, ds, _ = _job_result(tmp_path, client, a, (15, 500), method)
    u_ref, s_ref, vt_ref = np.linalg.svd(a, full_matrices=False)
    assert ds["U"].shape == (15, 5) and ds["Vt"].shape == (5, 4000)
    np.testing.assert_allclose(ds["S"].values, s_ref[:5], rtol=1e-12)
    u, vt = ds["U"].values, ds["Vt"].values
    signs = np.sign(np.sum(u * u_ref[:, :5], axis=0))
    np.testing.assert_allclose(u * signs, u_ref[:, :5], atol=1e-10)
    np.testing.assert_allclose(vt * signs[:, None], vt_ref[:5], atol=1e-10)
    assert r["transposed"] and r["orthogonality_u"] < 1e-13 and r["orthogonality_v"] < 1e-13


def test_svd_job_without_u_reads_once_and_takes_the_residual_from_the_spectrum(tmp_path, client):
    a = np.random.default_rng(10).standard_normal((5000, 10))
    r, ds, _ = _job_result(
        tmp_path, client, a, (1000, 10), {"method": "svd", "u": False, "rank": 3}
    )
    assert "U" not in ds and ds["Vt"].shape == (3, 10)
    s = np.linalg.svd(a, compute_uv=False)
    assert r["passes"] == 1 and r["reads_from_storage"] == 1 and r["orthogonality_u"] is None
    assert r["residual_method"] == "spectrum_tail"
    expected = np.sqrt(np.sum(s[3:] ** 2)) / np.linalg.norm(a)
    assert r["residual_rel"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "method,shape,message",
    [
        ({"method": "svd"}, (5, 40), "methods[0]: the input must be tall"),
        ({"method": "svd", "rank": 9}, (50, 4), "methods[0].rank: must be between 1 and 4"),
        ({"method": "svd", "transpose": True}, (50, 4), "its transpose must be tall"),
    ],
)
def test_svd_job_refuses_before_computing(tmp_path, method, shape, message):
    from pipeline import run_job
    from pipeline.errors import InputError as JobInputError

    write_array(tmp_path / "in.zarr", np.ones(shape))
    job = job_dict(tmp_path, str(tmp_path / "in.zarr"), methods=[method])
    with pytest.raises(JobInputError, match=re.escape(message)):
        run_job(job, client=None)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_svd_center_with_transpose_is_a_config_error():
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    job = {"name": "x", "input": {"url": "a"}, "methods": [{"method": "svd", "center": True}]}
    job["methods"][0]["transpose"] = True
    with pytest.raises(ConfigError, match=r"methods\[0\]: center: true needs transpose: false"):
        parse_config(job)


# --------------------------------------------------------------------------- sparse blocks, means


def _sparse_blocks(a: np.ndarray, chunks) -> da.Array:
    """``a`` as a dask array whose blocks are scipy.sparse CSR matrices."""
    import scipy.sparse as sp

    return da.from_array(a, chunks=chunks).map_blocks(sp.csr_matrix)


def _sparse_matrix(m: int, n: int, seed: int) -> np.ndarray:
    """A dense copy of a random sparse matrix (10 % non-zeros, an empty row, a dense one)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n)) * (rng.random((m, n)) < 0.1) + rng.uniform(0, 3, n)
    a[5] = 0.0
    a[9] = np.arange(1, n + 1)
    return a


@pytest.mark.parametrize("center", [False, True])
def test_svd_and_tsqr_accept_sparse_blocks(client, center):
    """Blocks of scipy.sparse (2-D chunked on purpose) are densified one row block per
    task: the results equal numpy's on the dense matrix."""
    from pipeline.linalg import tsqr
    from pipeline.linalg.tsqr import UNOPTIMIZED

    a = _sparse_matrix(600, 40, seed=21)
    x = _sparse_blocks(a, (70, 15))
    res = svd(x, center=center)
    ac = a - a.mean(axis=0) if center else a
    u_ref, s_ref, vt_ref = reference(ac)
    np.testing.assert_allclose(res.s, s_ref, rtol=1e-12, atol=1e-13 * s_ref[0])
    np.testing.assert_allclose(res.vt, vt_ref, atol=1e-9)
    np.testing.assert_allclose(res.u.compute(**UNOPTIMIZED), u_ref, atol=1e-9)
    if center:
        np.testing.assert_allclose(res.mean, a.mean(axis=0), rtol=1e-14)
    qr = tsqr(x)
    r_ref = np.linalg.qr(a, mode="r")
    np.testing.assert_allclose(np.abs(np.diag(qr.r)), np.abs(np.diag(r_ref)), rtol=1e-12)
    np.testing.assert_allclose(qr.q.compute() @ qr.r, a, atol=1e-12 * np.abs(a).max())


def test_centred_svd_float32_mean_is_the_float64_mean_rounded(client):
    """float32 PCA: the mean is summed in float64 and rounded once, so it equals
    ``a.astype(float64).mean(0).astype(float32)`` to at most 1 ulp (the R factor's first row
    holds it only to the QR's working precision)."""
    rng = np.random.default_rng(22)
    a = (1000.0 + 10 * rng.standard_normal((20_000, 30))).astype(np.float32)
    res = svd(da.from_array(a, chunks=(3000, 30)), center=True, compute_u=False)
    want = a.astype(np.float64).mean(axis=0).astype(np.float32)
    assert res.mean.dtype == np.float32
    ulps = np.abs(res.mean.view(np.int32) - want.view(np.int32))
    assert ulps.max() <= 1, ulps
