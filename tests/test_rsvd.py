"""Randomized SVD / PCA against numpy and scikit-learn on a real LocalCluster."""

from __future__ import annotations

import json
import logging
import subprocess

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.config import InputSpec, load_config, parse_config
from pipeline.errors import ConfigError, InputError
from tests.conftest import factorize_cmd, job_dict, one_line_exit, write_array, write_job


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
    from scipy.linalg import subspace_angles

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
    # deterministic signs: the largest-|·| entry of each Vt row (PCA, as scikit-learn) or
    # of each U column (uncentred) is positive
    if center:
        assert np.all(res.vt[np.arange(k), np.argmax(np.abs(res.vt), axis=1)] > 0)
    else:
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
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(2500, 300, decay=2.0, seed=1, dtype=dtype)
    res = rsvd(da.from_array(a, chunks=chunks), 12, seed=3, power_iters=power_iters)
    assert res.passes == power_iters + 1 and res.projection  # one pass per power iteration
    check_against_numpy(a, res, 12, sv_tol, res_factor=1.001)


@pytest.mark.parametrize("power_iters", [2, "auto"])
def test_spectrum_beyond_working_precision(client, power_iters):
    """σ down to 1e-9·σ₁ in float32: the final sketch is not graded, TSQR + one more pass;
    auto converges at once (changes below the working precision count as none)."""
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(2500, 300, decay=8.0, seed=1, dtype=np.float32)
    res = rsvd(da.from_array(a, chunks=(500, 300)), 12, seed=3, power_iters=power_iters)
    used = res.convergence.power_iters_used
    assert res.passes == used + 2  # iteration passes, the final one, the projection pass
    assert used == 2 and res.convergence.converged is (True if power_iters == "auto" else None)
    s_ref = np.linalg.svd(a.astype(np.float64), compute_uv=False)[:12]
    resolvable = s_ref > 1e-3 * s_ref[0]
    np.testing.assert_allclose(res.s[resolvable], s_ref[resolvable], rtol=1e-5)
    u = res.u.compute().astype(np.float64)
    assert np.linalg.norm(u.T @ u - np.eye(12)) < 1e-5


def test_residual_formula_is_exact(client):
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(2000, 150, decay=0.7, seed=2)
    res = rsvd(da.from_array(a, chunks=(500, 150)), 8)
    approx = (res.u.compute() * res.s) @ res.vt
    direct = np.sum((a - approx) ** 2)
    assert res.total_sumsq - np.sum(res.s**2) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("power_iters", [4, "auto"])
def test_pca_matches_sklearn(client, power_iters):
    """Components, signs included (scikit-learn's svd_flip(u_based_decision=False)), and
    scores equal PCA(svd_solver="full")'s."""
    import dask.array as da
    from sklearn.decomposition import PCA

    from pipeline.linalg import rsvd

    a = decaying(3000, 80, decay=2.0, seed=4, offset=5.0)  # a large mean on purpose
    res = rsvd(da.from_array(a, chunks=(700, 40)), 6, center=True, power_iters=power_iters)
    pca = PCA(n_components=6, svd_solver="full").fit(a)
    np.testing.assert_allclose(res.mean, pca.mean_, rtol=1e-12)
    m = a.shape[0]
    np.testing.assert_allclose(res.s**2 / (m - 1), pca.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(res.s**2 / res.total_sumsq, pca.explained_variance_ratio_, rtol=1e-8)
    np.testing.assert_allclose(res.vt, pca.components_, atol=1e-6)
    scores = res.u.compute() * res.s
    np.testing.assert_allclose(scores, pca.transform(a), atol=1e-6 * np.abs(scores).max())
    check_against_numpy(a, res, 6, 1e-8, 1.001, center=True)


@pytest.mark.parametrize("rank", [1, 60])
def test_rank_edges(client, rank):
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(400, 60, decay=1.0, seed=5)
    res = rsvd(da.from_array(a, chunks=(100, 60)), rank)
    np.testing.assert_allclose(res.s, np.linalg.svd(a, compute_uv=False)[:rank], rtol=1e-10)
    if rank == 60:  # full rank: exact reconstruction
        approx = (res.u.compute() * res.s) @ res.vt
        assert np.linalg.norm(a - approx) / np.linalg.norm(a) < 1e-13


def test_bad_rank_is_refused():
    import dask.array as da

    from pipeline.linalg import rsvd

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
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(1500, 100, decay=0.5, seed=6)
    x = da.from_array(a, chunks=(300, 100))
    r1, r2 = rsvd(x, 5, seed=7, power_iters=0), rsvd(x, 5, seed=7, power_iters=0)
    np.testing.assert_allclose(r1.s, r2.s, rtol=1e-13)
    np.testing.assert_allclose(r1.u.compute(), r2.u.compute(), rtol=1e-10, atol=1e-13)
    r3 = rsvd(x, 5, seed=8, power_iters=0)
    assert np.max(np.abs(r1.s - r3.s) / r1.s) > 1e-9  # far above rounding


def test_power_iterations_fix_the_float32_trap(client):
    """Slow decay in float32: no power iterations is inaccurate, the default q=2 is not."""
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(4000, 400, decay=0.3, seed=9, dtype=np.float32)
    x = da.from_array(a, chunks=(1000, 400))
    opt = optimal_residual(a, 20)
    rough = rsvd(x, 20, power_iters=0)
    good = rsvd(x, 20)
    err = [
        np.linalg.norm(a - (r.u.compute() * r.s) @ r.vt) / np.linalg.norm(a) for r in (rough, good)
    ]
    assert err[1] < 1.01 * opt < err[0]


@pytest.mark.parametrize("options", [{"power_iters": 0}, {"single_pass": True}])
def test_centred_sketch_equals_the_sketch_of_the_centred_matrix(client, options):
    """Centring shifts the sketch by ``μᵀΩ`` formed on the host (no pass over ``Y``): the
    same triplets as the uncentred method on ``A − 1μᵀ`` with the same Ω (seed)."""
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(2000, 150, decay=1.0, seed=12) + 3.0  # a mean far above the spread
    centred = a - a.mean(axis=0)
    got = rsvd(da.from_array(a, chunks=(500, 150)), 8, center=True, seed=5, **options)
    want = rsvd(da.from_array(centred, chunks=(500, 150)), 8, seed=5, **options)
    np.testing.assert_allclose(got.s64, want.s64, rtol=1e-9)
    np.testing.assert_allclose(np.abs(got.vt), np.abs(want.vt), atol=1e-8)
    np.testing.assert_allclose(got.mean64, a.mean(axis=0), rtol=1e-12)


def test_single_pass_reads_once_within_documented_bound(client):
    """Documented: on spectra decaying like i^-2 the one-pass sketch stays within 1.5× of
    the optimal residual at the default oversampling (its residual is measured here)."""
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(3000, 200, decay=2.0, seed=10)
    res = rsvd(da.from_array(a, chunks=(500, 200)), 10, single_pass=True)
    assert res.passes == 1 and not res.projection
    approx = (res.u.compute() * res.s) @ res.vt
    resid = np.linalg.norm(a - approx) / np.linalg.norm(a)
    assert resid <= 1.5 * optimal_residual(a, 10)
    np.testing.assert_allclose(res.s[:3], np.linalg.svd(a, compute_uv=False)[:3], rtol=2e-2)


def test_rsvd_job_writes_factors_metrics_and_plot(tmp_path, client):
    import xarray as xr
    from sklearn.decomposition import PCA

    from pipeline import run_job

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
    assert r["residual_method"] == "direct" and r["reads_from_storage"] == 1
    assert r["passes"] == r["power_iters_used"] + 2  # iterations, the final one, the residual
    assert r["iteration"] == "krylov" and r["converged"] is True and r["error_estimate"] <= 1e-3
    pca = PCA(n_components=5, svd_solver="full").fit(a64)
    np.testing.assert_allclose(
        r["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-5
    )
    np.testing.assert_allclose(r["singular_values"], ds["S"].values)
    assert r["orthogonality_u"] < 1e-12 and r["orthogonality_v"] < 1e-12


# --------------------------------------------------------------------------- power_iters: auto


def write_anndata(path, x: sp.csr_matrix) -> None:
    """``x`` as the X of an AnnData store written by the real ``anndata`` (Zarr v3)."""
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame(index=[f"cell_{i}" for i in range(x.shape[0])])
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(x.shape[1])])
    with ad.settings.override(zarr_write_format=3):
        ad.AnnData(X=x, obs=obs, var=var).write_zarr(path)


def ev_errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Relative errors of the total explained variance ratio and of the worst component."""
    total = abs(np.sum(got) - np.sum(want)) / np.sum(want)
    return float(total), float(np.max(np.abs(got - want) / want))


@pytest.fixture(scope="module")
def flat_counts(tmp_path_factory):
    """6,000 cells × 1,500 genes of 10 cell types (0.45 M non-zeros) as an AnnData store,
    and the exact PCA (scikit-learn, float64, covariance eigendecomposition: exact at this
    conditioning) of its top 20 components."""
    from sklearn.decomposition import PCA

    from pipeline.sparse_datasets import cell_type_counts

    x = cell_type_counts(6000, 1500)
    path = tmp_path_factory.mktemp("flat") / "cells.zarr"
    write_anndata(path, x)
    pca = PCA(30, svd_solver="covariance_eigh").fit(x)
    return path, x, pca


def test_flat_count_matrix_pca_by_default_matches_exact_pca(tmp_path, client, flat_counts):
    """Issue 20: rank-20 PCA of a flat count spectrum without touching power_iters meets
    total EV error ≤ 1e-3 and per-component ≤ 1e-2 against exact PCA; the old default
    (power_iters: 2) is far off on the same matrix."""
    import anndata as ad

    from pipeline import run_job
    from pipeline.io import open_matrix
    from pipeline.linalg import rsvd

    path, x, pca = flat_counts
    lam = pca.explained_variance_
    print(f"λ₂/λ₁ = {lam[1] / lam[0]:.3f}, λ₂₀/λ₂₁ = {lam[19] / lam[20]:.4f}")
    assert lam[1] / lam[0] > 0.9 and lam[19] / lam[20] < 1.01  # as flat as the report's
    want = pca.explained_variance_ratio_[:20]
    job = job_dict(tmp_path, str(path), methods=[{"method": "rsvd", "rank": 20, "center": True}])
    report = run_job(job, client=client)
    r = report["methods"]["rsvd"]
    total, worst = ev_errors(np.array(r["explained_variance_ratio"]), want)
    assert total <= 1e-3 and worst <= 1e-2, (total, worst)
    assert r["iteration"] == "krylov" and r["converged"] is True
    assert r["passes"] == r["power_iters_used"] + 1 <= 12
    # the estimate bounds the worst component's σ² error it stands for
    assert worst <= r["error_estimate"] <= 1e-3
    # X_pca as scikit-learn's, signs included, for the cell-type components (1–9, a gap of
    # 1.6× to the 10th); within the noise bulk components are not unique
    out = ad.read_zarr(tmp_path / "out" / "job" / "adata.zarr")
    scores = pca.transform(x)[:, :9]
    got = out.obsm["X_pca"][:, :9]
    corr = (
        np.sum(got * scores, axis=0) / np.linalg.norm(got, axis=0) / np.linalg.norm(scores, axis=0)
    )
    assert np.all(corr > 0.99), corr

    old, _ = open_matrix(InputSpec(url=str(path)))
    res = rsvd(old, 20, center=True, power_iters=2)  # the old default: 3 passes
    total, worst = ev_errors(res.s64**2 / res.total_sumsq, want)
    assert total > 0.05 and worst > 0.1, (total, worst)


def test_auto_wastes_no_passes_on_a_decaying_spectrum(client):
    """σᵢ = (1 + i)⁻²: auto stops after the third iteration pass, the first at which the
    error is estimable (one pass more than the old default), at full accuracy."""
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(2500, 300, decay=2.0, seed=1)
    res = rsvd(da.from_array(a, chunks=(500, 300)), 12, seed=3)
    conv = res.convergence
    assert conv.converged and conv.power_iters_used == 3 and res.passes == 4
    # the estimate is the last change (they shrank by more than half), far above the error
    # measured against numpy below (σ to 1e-9)
    assert conv.error_estimate == conv.changes[-1] < 1e-4
    check_against_numpy(a, res, 12, 1e-9, res_factor=1.001)


def _old_power_scheme(a: np.ndarray, rank: int, q: int, seed: int) -> np.ndarray:
    """The fixed-count scheme of earlier releases in numpy (float64): W = AᵀAΩ, then
    ``q − 1`` times W = AᵀA·(left singular vectors of W), then B = QᵀA for Q = orth(AZ),
    Z the left singular vectors of the last W; returns the singular values of B."""
    from pipeline.backend import gaussian

    w = a.T @ (a @ gaussian(seed, (a.shape[1], rank + 10), np.float64))
    for _ in range(q - 1):
        w = a.T @ (a @ np.linalg.svd(w, full_matrices=False)[0])
    basis, _ = np.linalg.qr(a @ np.linalg.svd(w, full_matrices=False)[0])
    return np.linalg.svd(basis.T @ a, compute_uv=False)[:rank]


@pytest.mark.parametrize("q", [1, 3])
def test_fixed_power_iters_run_the_old_scheme(client, q):
    """A number keeps the old meaning: that many power iterations (no convergence test),
    q + 1 passes, the same singular values as the scheme written out in numpy."""
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(1500, 120, decay=0.4, seed=12)  # slow decay: q shows in the values
    res = rsvd(da.from_array(a, chunks=(300, 120)), 8, seed=5, power_iters=q)
    assert res.passes == q + 1 and res.convergence.converged is None
    assert res.convergence.iteration == "power" and res.convergence.power_iters_used == q
    np.testing.assert_allclose(res.s64, _old_power_scheme(a, 8, q, 5), rtol=1e-12)


def test_fixed_krylov_passes(client):
    """``iteration: krylov`` with a number: that many Krylov blocks, then the final pass."""
    import dask.array as da

    from pipeline.linalg import rsvd

    a = decaying(1500, 120, decay=0.4, seed=12)
    res = rsvd(da.from_array(a, chunks=(300, 120)), 8, power_iters=3, iteration="krylov")
    assert res.passes == 4 and res.convergence.power_iters_used == 3
    s = np.linalg.svd(a, compute_uv=False)[:8]
    power = rsvd(da.from_array(a, chunks=(300, 120)), 8, power_iters=3)
    # same passes, closer to the exact values than power iteration (measured 0.28×)
    assert np.max(np.abs(res.s64 - s) / s) < 0.5 * np.max(np.abs(power.s64 - s) / s)


def test_unconverged_at_the_cap_warns_in_log_metrics_and_report(tmp_path, client, caplog):
    """Power iteration on Gaussian noise (a flat Marchenko–Pastur edge) cannot meet the
    tolerance in 20 passes: converged false, a warning in the log and in report.md."""
    from pipeline import run_job
    from pipeline.linalg.rsvd import AUTO_MAX_POWER_ITERS

    a = np.random.default_rng(13).standard_normal((2000, 200))
    write_array(tmp_path / "noise.zarr", a, chunks=(500, 200))
    spec = {"method": "rsvd", "rank": 10, "iteration": "power", "measure_residual": False}
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        job = job_dict(tmp_path, str(tmp_path / "noise.zarr"), methods=[spec])
        report = run_job(job, client=client)
    r = report["methods"]["rsvd"]
    assert r["converged"] is False and r["power_iters_used"] == AUTO_MAX_POWER_ITERS
    assert r["passes"] == AUTO_MAX_POWER_ITERS + 1
    assert r["error_estimate"] is None or r["error_estimate"] > 1e-3
    assert "rsvd: power_iters auto did not converge in 20 iteration passes" in caplog.text
    text = (tmp_path / "out" / "job" / "report.md").read_text()
    assert "**Warning**: `power_iters: auto` did not converge in 20 iteration passes" in text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "methods[0].power_iters: must be 'auto' or an integer between 0 and 100, got"),
        (2.5, "methods[0].power_iters: must be 'auto' or an integer between 0 and 100, got"),
        (-1, "methods[0].power_iters: must be ≥ 0, got -1"),
        (101, "methods[0].power_iters: must be ≤ 100, got 101"),
        (True, "methods[0].power_iters: must be an integer, not a boolean, got true"),
    ],
)
def test_bad_power_iters_are_config_errors(tmp_path, value, message):
    spec = {"method": "rsvd", "rank": 3, "power_iters": value}
    with pytest.raises(ConfigError) as info:
        parse_config(job_dict(tmp_path, "in.zarr", methods=[spec]))
    assert message in str(info.value), str(info.value)


@pytest.mark.e2e
def test_power_iters_auto_and_iteration_in_job_files(tmp_path):
    """``auto`` is the default and can be written; a bad ``iteration`` exits 2 in one line
    naming the field; the plan says "up to" for auto."""
    from pipeline.linalg.rsvd import AUTO_MAX_POWER_ITERS
    from pipeline.plan import format_plan, plan_job

    for spec in ({}, {"power_iters": "auto"}, {"power_iters": 0, "iteration": "krylov"}):
        job = parse_config(job_dict(tmp_path, "x", methods=[{"method": "rsvd", "rank": 3} | spec]))
        assert job.methods[0].power_iters == spec.get("power_iters", "auto")
    write_array(tmp_path / "a.zarr", np.ones((400, 30)), chunks=(100, 30))
    specs = [
        {"method": "rsvd", "rank": 3},
        {"method": "rsvd", "rank": 3, "power_iters": 2, "measure_residual": False},
    ]
    lines = []
    for spec in specs:
        path = write_job(tmp_path, job_dict(tmp_path, str(tmp_path / "a.zarr"), methods=[spec]))
        lines.append(next(x for x in format_plan(plan_job(load_config(path))) if "rsvd:" in x))
    assert f"rsvd: up to {AUTO_MAX_POWER_ITERS + 2} passes" in lines[0]  # + a residual pass
    assert "rsvd: 3 passes" in lines[1]
    bad = {"method": "rsvd", "rank": 3, "iteration": "lanczos"}
    path = write_job(tmp_path, job_dict(tmp_path, str(tmp_path / "a.zarr"), methods=[bad]))
    proc = subprocess.run(
        [*factorize_cmd(), "validate", str(path)], capture_output=True, text=True, timeout=120
    )
    assert "methods[0].iteration: input should be 'krylov' or 'power', got 'lanczos'" in (
        one_line_exit(proc)
    )
