"""Sparse CSR/CSC and AnnData inputs, end to end on stores written by the real ``anndata``.

Each case runs a whole job (:func:`pipeline.jobs.run_job`) on the session's 2-worker
cluster and checks it against scikit-learn / numpy on the same matrix in float64: PCA's
explained variance ratio to 1e-4 and its components by principal angles, NMF's error
against scikit-learn's, TSQR's ``R`` against numpy's. The matrix is ragged on purpose
(an empty row, one dense row) and cut into many blocks (``BLOCK_BYTES`` lowered).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from conftest import factorize_cmd, job_dict, one_line_exit, two_workers, write_job
from sklearn.decomposition import NMF, PCA

from pipeline.config import InputSpec, SyntheticSpec, parse_config
from pipeline.errors import InputError, NonFiniteInputError

M, N, K = 1500, 120, 5
RSVD = {"method": "rsvd", "rank": K, "center": True, "power_iters": 3}
NMF_ = {"method": "nmf", "rank": K, "max_iter": 150, "tol": 1e-6}


def _matrix() -> sp.csr_matrix:
    from pipeline.sparse_datasets import _profiles, sparse_block

    spec = SyntheticSpec(kind="sparse", shape=(M, N), density=0.1, seed=3)
    x = sparse_block(spec, _profiles(spec), 0, M).tolil()
    x[7, :] = 0  # an empty row
    x[11, :] = np.arange(1, N + 1)  # a dense row
    x = x.tocsr()
    x.eliminate_zeros()
    return x


X = _matrix()
DENSE = X.toarray()


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of ~8 KiB of entries: a dozen blocks and a block boundary on every path."""
    from pipeline.io import sparse as sparse_io

    monkeypatch.setattr(sparse_io, "BLOCK_BYTES", 8 * 2**10)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """The same AnnData written as Zarr v2, v3 and sharded v3 (X CSR, a CSC and a dense layer)."""
    import anndata as ad
    import pandas as pd

    root = tmp_path_factory.mktemp("adata")
    obs = pd.DataFrame({"batch": pd.Categorical(["a", "b", "c"] * (M // 3))})
    obs.index = [f"cell_{i}" for i in range(M)]
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(N)])
    adata = ad.AnnData(X=X, obs=obs, var=var, layers={"csc": X.tocsc(), "dense": DENSE})
    out = {}
    for name, fmt, shard in (("v2", 2, False), ("v3", 3, False), ("v3-sharded", 3, True)):
        with ad.settings.override(zarr_write_format=fmt, auto_shard_zarr_v3=shard):
            adata.write_zarr(root / f"{name}.zarr")
        out[name] = root / f"{name}.zarr"
    return out


@pytest.fixture(scope="module")
def references() -> dict:
    pca = PCA(K, svd_solver="covariance_eigh").fit(X)
    nmf = NMF(K, init="nndsvda", solver="cd", max_iter=1000, tol=1e-6, random_state=0)
    nmf.fit(X)
    return {
        "pca": pca,
        "nmf_rel": nmf.reconstruction_err_ / sp.linalg.norm(X),
        "r": np.abs(np.diag(np.linalg.qr(DENSE, mode="r"))),
    }


def _check_pca(result: dict, factors: zarr.Group, pca: PCA) -> None:
    from scipy.linalg import subspace_angles

    np.testing.assert_allclose(
        result["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-4
    )
    vt = factors["rsvd/Vt"][...]
    # σ₂/σ₃ ≈ 2.4 but σ₅/σ₆ ≈ 1.1: the leading pair is exact, the 5-subspace to its gap
    assert np.max(subspace_angles(vt[:2].T, pca.components_[:2].T)) < 1e-6
    assert np.max(subspace_angles(vt.T, pca.components_.T)) < 1e-2
    np.testing.assert_allclose(factors["rsvd/mean"][...], pca.mean_, rtol=1e-10)


@pytest.mark.parametrize(
    ("store", "array", "fmt"),
    [
        ("v2", "X", "csr"),
        ("v2", "layers/csc", "csc"),
        ("v3", "X", "csr"),
        ("v3-sharded", None, "csr"),  # the AnnData root alone means X
        ("v3-sharded", "layers/csc", "csc"),
        ("v3-sharded", "layers/dense", "dense"),
    ],
)
def test_anndata_input_matches_references(tmp_path, client, stores, references, store, array, fmt):
    from pipeline.jobs import run_job

    spec = {"url": str(stores[store])} | ({"array": array} if array else {})
    methods = [RSVD, {"method": "tsqr"}, {"method": "svd", "rank": K, "center": True}]
    report = run_job(job_dict(tmp_path, "", input=spec, methods=methods), client=client)
    assert report["input"]["format"] == fmt
    if fmt != "dense":
        assert report["input"]["nnz"] == X.nnz
        assert report["input"]["density"] == pytest.approx(X.nnz / (M * N))
    out = tmp_path / "out" / "job"
    factors = zarr.open_group(out / "factors.zarr", mode="r")
    _check_pca(report["methods"]["rsvd"], factors, references["pca"])
    assert report["methods"]["rsvd"]["passes"] == 4
    exact = report["methods"]["svd"]["explained_variance_ratio"]
    np.testing.assert_allclose(exact, references["pca"].explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.diag(factors["tsqr/R"][...])), references["r"], rtol=1e-9)
    assert report["methods"]["tsqr"]["residual_rel"] < 1e-13


def test_adata_zarr_is_read_by_anndata_with_scanpys_slots(tmp_path, client, stores, references):
    import anndata as ad

    from pipeline.jobs import run_job

    job = job_dict(tmp_path, str(stores["v3"]), methods=[RSVD, NMF_])
    report = run_job(job, client=client)
    assert report["methods"]["nmf"]["residual_rel"] <= 1.02 * references["nmf_rel"]
    assert report["anndata"] == "adata.zarr"
    out = ad.read_zarr(tmp_path / "out" / "job" / "adata.zarr")
    assert out.shape == (M, N) and out.X is None
    assert list(out.obs_names) == [f"cell_{i}" for i in range(M)]
    assert list(out.var_names) == [f"gene_{j}" for j in range(N)]
    assert list(out.obs["batch"][:4]) == ["a", "b", "c", "a"]
    factors = zarr.open_group(tmp_path / "out" / "job" / "factors.zarr", mode="r")
    u, s, vt = (factors[f"rsvd/{k}"][...] for k in ("U", "S", "Vt"))
    np.testing.assert_allclose(out.obsm["X_pca"], u * s, rtol=1e-12)
    np.testing.assert_array_equal(out.varm["PCs"], vt.T)
    pca = references["pca"]  # the leading pair is exact (see _check_pca)
    scores = pca.transform(X)[:, :2]
    signs = np.sign(np.sum(out.obsm["X_pca"][:, :2] * scores, axis=0))
    atol = 1e-5 * np.abs(scores).max()
    np.testing.assert_allclose(out.obsm["X_pca"][:, :2] * signs, scores, rtol=0, atol=atol)
    ratio = out.uns["pca"]["variance_ratio"]
    np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, rtol=1e-4)
    np.testing.assert_allclose(out.uns["pca"]["variance"], pca.explained_variance_, rtol=1e-4)
    np.testing.assert_array_equal(out.obsm["X_nmf"], factors["nmf/W"][...])
    np.testing.assert_array_equal(out.varm["NMF_H"], factors["nmf/H"][...].T)


@pytest.mark.e2e
def test_plain_csr_groups_written_by_anndata_and_by_generate(tmp_path, client, references):
    import anndata as ad

    from pipeline.jobs import run_job

    url = tmp_path / "plain.zarr"
    ad.io.write_elem(zarr.open_group(url, mode="w", zarr_format=3), "counts", X)
    job = job_dict(tmp_path, str(url), methods=[RSVD])
    job["input"]["array"] = "counts"
    report = run_job(job, client=client)
    assert not (tmp_path / "out" / "job" / "adata.zarr").exists()  # not an AnnData input
    factors = zarr.open_group(tmp_path / "out" / "job" / "factors.zarr", mode="r")
    _check_pca(report["methods"]["rsvd"], factors, references["pca"])

    made = tmp_path / "made.zarr"
    subprocess.run(
        [*factorize_cmd(), "generate", "--kind", "counts", "--shape", "300", "80", str(made)],
        check=True,
        capture_output=True,
    )
    a = ad.io.read_elem(zarr.open_group(made, mode="r"))
    report = run_job(job_dict(tmp_path, str(made), name="gen"), client=client)  # tsqr
    assert report["input"]["format"] == "csr" and report["input"]["nnz"] == a.nnz
    r = zarr.open_group(tmp_path / "out" / "gen" / "factors.zarr", mode="r")["tsqr/R"][...]
    want = np.abs(np.diag(np.linalg.qr(a.toarray(), mode="r")))
    np.testing.assert_allclose(np.abs(np.diag(r)), want, rtol=1e-10)


@pytest.mark.e2e
def test_no_task_holds_the_dense_matrix(tmp_path, monkeypatch):
    """Workers of 400 MiB each, a matrix of 1.0 GiB dense (14 MiB stored): rsvd and nmf
    finish, so no task ever densified it (nor the whole cluster could have held it)."""
    import anndata as ad

    from pipeline.io import sparse as sparse_io
    from pipeline.jobs import run_job
    from pipeline.sparse_datasets import write_sparse_local

    monkeypatch.setattr(sparse_io, "BLOCK_BYTES", 2 * 2**20)  # 7 blocks
    spec = SyntheticSpec(kind="sparse", shape=(100_000, 1300), density=0.01, seed=1)
    url = tmp_path / "big.zarr"
    write_sparse_local(str(url), spec, None)
    big = ad.io.read_elem(zarr.open_group(url, mode="r"))
    assert 100_000 * 1300 * 8 > 2 * 400 * 2**20 > 50 * big.data.nbytes
    methods = [
        {"method": "rsvd", "rank": 5, "center": True, "power_iters": 6},
        {"method": "nmf", "rank": 4, "max_iter": 5},
    ]
    with two_workers("400MiB") as c:
        report = run_job(job_dict(tmp_path, str(url), methods=methods), client=c)
    big.indices = big.indices.astype(big.indptr.dtype)  # scikit-learn wants one index dtype
    pca = PCA(5, svd_solver="arpack", random_state=0).fit(big)
    got = report["methods"]["rsvd"]["explained_variance_ratio"]
    np.testing.assert_allclose(got, pca.explained_variance_ratio_, rtol=1e-3)
    assert report["methods"]["nmf"]["iterations"] == 5


def _bad_group(tmp_path: Path, **change) -> Path:
    import anndata as ad

    url = tmp_path / "bad.zarr"
    group = zarr.open_group(url, mode="w", zarr_format=3)
    ad.io.write_elem(group, "m", X)
    m = group["m"]
    for key, value in change.items():
        if key in ("encoding-type", "shape"):
            m.attrs[key] = value
        else:
            m[key][value[0]] = value[1]
    return url


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoding-type": "coo_matrix"}, "has encoding-type 'coo_matrix'; csr_matrix or"),
        ({"shape": [M, N, 1]}, "needs a 'shape' attribute of two positive integers"),
        ({"shape": [M + 1, N]}, f"indptr has {M + 1} entries; shape [{M + 1}, {N}] (csr) needs"),
        ({"indptr": (-1, 5)}, f"indptr runs from 0 to 5; it must run from 0 to {X.nnz}"),
    ],
)
def test_bad_sparse_metadata_is_refused_by_validate(tmp_path, change, message):
    from pipeline.jobs import precheck

    url = _bad_group(tmp_path, **change)
    job = job_dict(tmp_path, str(url))
    job["input"]["array"] = "m"
    with pytest.raises(InputError) as info:
        precheck(parse_config(job))
    assert str(info.value).startswith(f"input: {url}/m") and message in str(info.value)


def _corrupt_data_chunk(url: Path) -> None:
    (url / "m" / "data" / "c" / "0").write_bytes(b"not a zstd frame" * 8)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ("corrupt", InputError, "/m/data is corrupt: entries "),
        ({"indices": (-1, N)}, InputError, f"indices holds column index {N} in row {M - 1}, "),
        ({"indices": (100, -3)}, InputError, "indices holds column index -3 in row "),
        ({"data": (50, np.nan)}, NonFiniteInputError, "data holds NaN or Inf (first in row "),
    ],
)
def test_bad_sparse_values_fail_the_first_pass(tmp_path, client, change, error, message):
    from pipeline.jobs import run_job

    if change == "corrupt":
        url = _bad_group(tmp_path)
        _corrupt_data_chunk(url)
    else:
        url = _bad_group(tmp_path, **change)
    job = job_dict(tmp_path, str(url), methods=[RSVD])
    job["input"]["array"] = "m"
    with pytest.raises(error) as info:
        run_job(job, client=client)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "job").exists()


def test_bad_index_through_the_cli_exits_2_with_one_line(tmp_path, prefect_server):
    url = _bad_group(tmp_path, indices=(-1, N))
    job = job_dict(tmp_path, str(url), methods=[RSVD])
    job["input"]["array"] = "m"
    proc = subprocess.run(
        [*factorize_cmd(), "run", str(write_job(tmp_path, job))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert one_line_exit(proc).endswith(
        f"input: {url}/m/indices holds column index {N} in row {M - 1}, outside 0…{N - 1}"
    )
    assert not (tmp_path / "out" / "job").exists()


def test_plan_cuts_blocks_by_stored_bytes():
    from pipeline.io import sparse as sparse_io

    ptr = np.array([0, 0, 100, 100, 150, 400, 400, 410])  # rows of 0–250 entries
    assert sparse_io.plan_blocks(ptr, 8, target=800) == (0, 3, 4, 5, 7)  # row 4 alone
    assert sparse_io.plan_blocks(ptr, 8, target=800, max_rows=1) == tuple(range(8))
    assert sparse_io.plan_blocks(np.zeros(4, dtype=int), 8) == (0, 3)


@pytest.mark.e2e
def test_validate_reports_format_nnz_and_density(tmp_path, stores):
    job = write_job(tmp_path, job_dict(tmp_path, str(stores["v3-sharded"]), methods=[RSVD]))
    proc = subprocess.run(
        [*factorize_cmd(), "validate", str(job)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    density = f"{X.nnz / (M * N):.3g}"
    assert f"shape {M}×{N}, CSR, nnz {X.nnz} (density {density})" in proc.stdout, proc.stdout
    assert "dtype float64 (Zarr v3)" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize(
    "options",
    [{}, {"power_iters": 0}, {"single_pass": True}],
    ids=["power", "range-finder", "single-pass"],
)
def test_rsvd_on_sparse_blocks_equals_rsvd_on_dense_blocks(tmp_path, stores, options):
    """Every rsvd path (and the direct residual) gives the dense result from sparse blocks."""
    import dask

    from pipeline import metrics as mx
    from pipeline.io import open_matrix
    from pipeline.linalg import rsvd

    sparse, _ = open_matrix(InputSpec(url=str(stores["v3"])))
    dense, _ = open_matrix(InputSpec(url=str(stores["v3"]), array="layers/dense"))
    dense = dense.rechunk((sparse.chunks[0], -1))
    with dask.config.set(scheduler="sync"):
        got, want = (rsvd(x, K, center=True, **options) for x in (sparse, dense))
        np.testing.assert_allclose(got.s64, want.s64, rtol=1e-10)
        assert got.total_sumsq == pytest.approx(want.total_sumsq, rel=1e-12)
        approx = got.s64[:, None] * got.vt
        rsq = (mx.residual_sq(got.a, got.u, approx, got.mean64).compute() for got in (got, want))
        assert next(rsq) == pytest.approx(next(rsq), rel=1e-9)


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_nmf_on_sparse_blocks_equals_nmf_on_dense_blocks(stores, solver):
    import dask

    from pipeline.io import open_matrix
    from pipeline.linalg import nmf

    sparse, _ = open_matrix(InputSpec(url=str(stores["v3"])))
    dense, _ = open_matrix(InputSpec(url=str(stores["v3"]), array="layers/dense"))
    dense = dense.rechunk((sparse.chunks[0], -1))
    with dask.config.set(scheduler="sync"):
        got, want = (nmf(x, K, solver=solver, max_iter=6, tol=0.0) for x in (sparse, dense))
    np.testing.assert_allclose(got.history, want.history, rtol=1e-9)
    assert got.sumsq == pytest.approx(want.sumsq, rel=1e-12)


@pytest.mark.e2e  # scanpy and pynndescent end to end: numba compiles its kernels (~90 s)
def test_scanpy_neighbors_reads_our_adata_zarr_above_8192_cells(tmp_path, client):
    """README's claim: ``scanpy.pp.neighbors(adata, use_rep="X_pca")`` works on the
    ``adata.zarr`` of a PCA job, above the 8,192 cells (4,096 for other metrics) where scanpy
    1.11 leaves its exact neighbours for pynndescent's — whose ``csr_array`` scanpy 1.11
    calls ``getnnz`` on: pynndescent < 0.6 (pyproject's test extra) returns a
    ``csr_matrix``. Its graph agrees with exact neighbours in X_pca."""
    import anndata as ad
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    from pipeline.jobs import run_job
    from pipeline.sparse_datasets import _profiles, sparse_block

    cells = 9000
    spec = SyntheticSpec(kind="sparse", shape=(cells, 200), density=0.1, seed=4)
    x = sparse_block(spec, _profiles(spec), 0, cells)
    url = tmp_path / "cells.zarr"
    with ad.settings.override(zarr_write_format=3):
        ad.AnnData(X=x).write_zarr(url)
    methods = [{"method": "rsvd", "rank": 10, "center": True}]
    run_job(job_dict(tmp_path, str(url), methods=methods), client=client)
    adata = ad.read_zarr(tmp_path / "out" / "job" / "adata.zarr")
    sc.pp.neighbors(adata, n_neighbors=15, use_rep="X_pca", random_state=0)
    dist = adata.obsp["distances"]
    assert dist.shape == (cells, cells) and adata.uns["neighbors"]["params"]["n_neighbors"] == 15
    exact = NearestNeighbors(n_neighbors=15).fit(adata.obsm["X_pca"])
    _, want = exact.kneighbors(adata.obsm["X_pca"])
    got = [set(dist[i].indices) for i in range(cells)]
    recall = np.mean([len(got[i] & set(want[i][1:])) / 14 for i in range(cells)])
    assert recall > 0.9, recall
