"""Randomized SVD / PCA against numpy and scikit-learn on a real LocalCluster."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from pipeline import run_job
from pipeline.errors import InputError
from pipeline.linalg import rsvd
from tests.conftest import job_dict, write_array


def decaying(m: int, n: int, decay: float = 1.0, seed: int = 0, dtype=np.float64, offset=0.0):
    """m × n matrix with singular values (1 + i)^-decay and random singular vectors."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = (1.0 + np.arange(min(m, n))) ** -decay
    return ((u * s) @ v.T + offset).astype(dtype)


def optimal_residual(a: np.ndarray, k: int) -> float:
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)) / np.sqrt(np.sum(s**2)))


def check_against_numpy(a, res, k, sv_tol, res_factor, center=False):
    a64 = a.astype(np.float64)
    ac = a64 - a64.mean(axis=0) if center else a64
    u_ref, s_ref, _ = np.linalg.svd(ac, full_matrices=False)
    u = res.u.compute().astype(np.float64)
    assert u.shape == (a.shape[0], k) and res.vt.shape == (k, a.shape[1])
    np.testing.assert_allclose(res.s, s_ref[:k], rtol=sv_tol)
    # same subspaces: largest principal angle small where the spectrum has a gap
    assert np.max(subspace_angles(u[:, : k // 2 + 1], u_ref[:, : k // 2 + 1])) < 1e-3
    approx = (u * res.s) @ res.vt
    resid = np.linalg.norm(ac - approx) / np.linalg.norm(ac)
    assert resid <= res_factor * optimal_residual(ac, k)
    orth_tol = 1e-5 if a.dtype == np.float32 else 1e-12
    assert np.linalg.norm(u.T @ u - np.eye(k)) < orth_tol
    # deterministic signs: the largest-|·| entry of each U column is positive
    assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(k)] > 0)


@pytest.mark.parametrize(
    "dtype,chunks,power_iters,sv_tol",
    [
        (np.float64, (400, 300), 4, 1e-9),  # one column chunk
        (np.float64, (333, 71), 4, 1e-9),  # 2-D chunked and ragged
        (np.float64, (500, 300), 2, 1e-5),  # the default: σ error ~ (σ_l+1/σ_i)^(4q+2)
        (np.float32, (500, 300), 2, 1e-4),
    ],
)
def test_rsvd_matches_numpy(client, dtype, chunks, power_iters, sv_tol):
    a = decaying(2500, 300, decay=2.0, seed=1, dtype=dtype)
    res = rsvd(da.from_array(a, chunks=chunks), 12, seed=3, power_iters=power_iters)
    assert res.passes == power_iters + 1 and res.projection  # one pass per power iteration
    check_against_numpy(a, res, 12, sv_tol, res_factor=1.001)


def test_spectrum_beyond_working_precision(client):
    """σ down to 1e-9·σ₁ in float32: the final sketch is not graded, TSQR + one more pass."""
    a = decaying(2500, 300, decay=8.0, seed=1, dtype=np.float32)
    res = rsvd(da.from_array(a, chunks=(500, 300)), 12, seed=3)
    assert res.passes == 4  # 3 + the projection pass of the fallback
    s_ref = np.linalg.svd(a.astype(np.float64), compute_uv=False)[:12]
    resolvable = s_ref > 1e-3 * s_ref[0]
    np.testing.assert_allclose(res.s[resolvable], s_ref[resolvable], rtol=1e-5)
    u = res.u.compute().astype(np.float64)
    assert np.linalg.norm(u.T @ u - np.eye(12)) < 1e-5


def test_residual_formula_is_exact(client):
    a = decaying(2000, 150, decay=0.7, seed=2)
    res = rsvd(da.from_array(a, chunks=(500, 150)), 8)
    approx = (res.u.compute() * res.s) @ res.vt
    direct = np.sum((a - approx) ** 2)
    assert res.total_sumsq - np.sum(res.s**2) == pytest.approx(direct, rel=1e-9)


def test_pca_matches_sklearn(client):
    a = decaying(3000, 80, decay=2.0, seed=4, offset=5.0)  # a large mean on purpose
    res = rsvd(da.from_array(a, chunks=(700, 40)), 6, center=True, power_iters=4)
    pca = PCA(n_components=6, svd_solver="full").fit(a)
    np.testing.assert_allclose(res.mean, pca.mean_, rtol=1e-12)
    m = a.shape[0]
    np.testing.assert_allclose(res.s**2 / (m - 1), pca.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(res.s**2 / res.total_sumsq, pca.explained_variance_ratio_, rtol=1e-8)
    np.testing.assert_allclose(np.abs(res.vt), np.abs(pca.components_), atol=1e-6)
    check_against_numpy(a, res, 6, 1e-8, 1.001, center=True)


@pytest.mark.parametrize("rank", [1, 60])
def test_rank_edges(client, rank):
    a = decaying(400, 60, decay=1.0, seed=5)
    res = rsvd(da.from_array(a, chunks=(100, 60)), rank)
    np.testing.assert_allclose(res.s, np.linalg.svd(a, compute_uv=False)[:rank], rtol=1e-10)
    if rank == 60:  # full rank: exact reconstruction
        approx = (res.u.compute() * res.s) @ res.vt
        assert np.linalg.norm(a - approx) / np.linalg.norm(a) < 1e-13


def test_bad_rank_is_refused():
    x = da.ones((50, 10), chunks=10)
    with pytest.raises(InputError, match=r"rank must be between 1 and 10.*got 11"):
        rsvd(x, 11)
    with pytest.raises(InputError, match="rank must be between"):
        rsvd(x, 0)


def test_seeds_are_reproducible(client):
    """Same seed, same result up to the last bits; another seed, another sketch.

    Not bitwise: numpy's SIMD sums and BLAS round differently with the memory alignment of
    their operands, and blocks that travel between workers arrive at other addresses (this
    test was seen to differ by 1 ulp between two runs on one cluster)."""
    a = decaying(1500, 100, decay=0.5, seed=6)
    x = da.from_array(a, chunks=(300, 100))
    r1, r2 = rsvd(x, 5, seed=7, power_iters=0), rsvd(x, 5, seed=7, power_iters=0)
    np.testing.assert_allclose(r1.s, r2.s, rtol=1e-13)
    np.testing.assert_allclose(r1.u.compute(), r2.u.compute(), rtol=1e-10, atol=1e-13)
    r3 = rsvd(x, 5, seed=8, power_iters=0)
    assert np.max(np.abs(r1.s - r3.s) / r1.s) > 1e-9  # far above rounding


def test_power_iterations_fix_the_float32_trap(client):
    """Slow decay in float32: no power iterations is inaccurate, the default q=2 is not."""
    a = decaying(4000, 400, decay=0.3, seed=9, dtype=np.float32)
    x = da.from_array(a, chunks=(1000, 400))
    opt = optimal_residual(a, 20)
    rough = rsvd(x, 20, power_iters=0)
    good = rsvd(x, 20)
    err = [
        np.linalg.norm(a - (r.u.compute() * r.s) @ r.vt) / np.linalg.norm(a) for r in (rough, good)
    ]
    assert err[1] < 1.01 * opt < err[0]


def test_single_pass_reads_once_within_documented_bound(client):
    """Documented: on spectra decaying like i^-2 the one-pass sketch stays within 1.5× of
    the optimal residual at the default oversampling (its residual is measured here)."""
    a = decaying(3000, 200, decay=2.0, seed=10)
    res = rsvd(da.from_array(a, chunks=(500, 200)), 10, single_pass=True)
    assert res.passes == 1 and not res.projection
    approx = (res.u.compute() * res.s) @ res.vt
    resid = np.linalg.norm(a - approx) / np.linalg.norm(a)
    assert resid <= 1.5 * optimal_residual(a, 10)
    np.testing.assert_allclose(res.s[:3], np.linalg.svd(a, compute_uv=False)[:3], rtol=2e-2)


def test_rsvd_job_writes_factors_metrics_and_plot(tmp_path, client):
    a = (np.abs(decaying(3000, 120, decay=2.0, seed=11)) * 1e6).astype(np.int32)  # integers
    write_array(tmp_path / "in.zarr", a, chunks=(500, 60))
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        methods=[{"method": "rsvd", "rank": 5, "center": True, "measure_residual": True}],
    )
    report = run_job(job, client=client)
    out = tmp_path / "out" / "job"
    r = json.loads((out / "metrics.json").read_text())["methods"]["rsvd"]
    assert r == json.loads(json.dumps(report["methods"]["rsvd"]))
    assert (out / "rsvd_spectrum.png").read_bytes()[:4] == b"\x89PNG"
    ds = xr.open_zarr(out / "factors.zarr", group="rsvd")
    assert ds["U"].dims == ("row", "component") and ds["S"].dims == ("component",)
    assert ds["Vt"].dims == ("component", "col") and ds["mean"].dims == ("col",)
    a64 = a.astype(np.float64)
    ac = a64 - a64.mean(axis=0)
    approx = (ds["U"].values * ds["S"].values) @ ds["Vt"].values
    residual = np.linalg.norm(a64 - (ds["mean"].values + approx))  # = ‖(A − 1μᵀ) − USVt‖
    assert r["residual_rel"] == pytest.approx(residual / np.linalg.norm(a64), rel=1e-9)
    assert r["residual_rel_centered"] == pytest.approx(residual / np.linalg.norm(ac), rel=1e-9)
    assert r["residual_rel"] < 0.7 * r["residual_rel_centered"]  # the mean adds to ‖A‖
    assert r["residual_method"] == "direct" and r["passes"] == 4 and r["reads_from_storage"] == 1
    pca = PCA(n_components=5, svd_solver="full").fit(a64)
    np.testing.assert_allclose(
        r["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-5
    )
    np.testing.assert_allclose(r["singular_values"], ds["S"].values)
    assert r["orthogonality_u"] < 1e-12 and r["orthogonality_v"] < 1e-12
