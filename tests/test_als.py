"""``method: als`` as users run it: jobs on AnnData, CSR and CSC stores written by the real
``anndata``, the written factors, biases and top-N lists checked against numpy on the same
matrix, ``adata.zarr``, the report, bad input through the CLI (exit 2, one line, nothing
written), and resume after a killed run and a killed worker.

The algorithm itself (each half-step against ``numpy.linalg.solve``, the objective, the
``implicit`` library) is checked in ``tests/test_als_algorithm.py``.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import (
    job_dict,
    kill_at_checkpoint,
    kill_worker_running,
    one_line_exit,
    two_workers,
    write_anndata,
    write_array,
    write_job,
)

USERS, ITEMS, TRUE_RANK, SIGMA = 600, 150, 3, 0.3


def ratings(seed: int = 0, users: int = USERS, items: int = ITEMS) -> sp.csr_matrix:
    """Rank-3 ratings around 3.5 with user and item biases and N(0, σ²) noise, about 12 %
    observed with popularity-skewed items and activity-skewed users; the last user and the
    last item have no rating (their factors are documented zeros)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((users, TRUE_RANK)) * 0.6
    v = rng.standard_normal((items, TRUE_RANK)) * 0.6
    full = 3.5 + rng.normal(0, 0.4, (users, 1)) + rng.normal(0, 0.4, (1, items)) + u @ v.T
    full += rng.normal(0, SIGMA, full.shape)
    popularity = (1.0 + np.arange(items)) ** -0.7
    activity = rng.pareto(2.0, users) + 0.5
    p = np.clip(0.12 * activity[:, None] * popularity[None, :] / popularity.mean(), 0, 0.9)
    observed = rng.random(full.shape) < p
    observed[-1, :] = False
    observed[:, -1] = False
    observed[np.arange(users - 1), rng.integers(0, items - 1, users - 1)] = True
    return sp.csr_matrix(np.where(observed, full, 0.0))


def _observed(x: sp.csr_matrix) -> sp.csr_matrix:
    x = x.tocsr().copy()
    x.sum_duplicates()
    return x


def _store(tmp_path: Path, x: sp.spmatrix, name: str = "ratings.zarr") -> Path:
    users = [f"user-{i:04d}" for i in range(x.shape[0])]
    items = [f"film-{j:03d}" for j in range(x.shape[1])]
    return write_anndata(tmp_path / name, x, obs_names=users, var_names=items)


def _factors(out: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(out / "factors.zarr"), mode="r")["als"]
    return {name: arr[...] for name, arr in group.arrays()}


def _predict(f: dict[str, np.ndarray], mean: float | None) -> np.ndarray:
    scores = f["U"] @ f["V"].T
    if "user_bias" in f:
        scores += mean + f["user_bias"][:, None] + f["item_bias"][None, :]
    return scores


def _top(scores: np.ndarray, seen: sp.csr_matrix | None, n: int) -> tuple[np.ndarray, ...]:
    """Brute-force top-N: best first, ties by the lower item index."""
    s = scores.copy()
    if seen is not None:
        s[seen.nonzero()] = -np.inf
    order = np.lexsort((np.arange(s.shape[1])[None, :].repeat(s.shape[0], 0), -s), axis=1)
    top = order[:, :n]
    return top, np.take_along_axis(s, top, axis=1)


ALS = {
    "method": "als",
    "rank": 3,
    "reg": 0.05,
    "iterations": 12,
    "tol": 0,
    "biases": True,
    "validation": {"fraction": 0.1, "seed": 1},
    "recommend": {"top_n": 5, "exclude_seen": True},
}


def test_explicit_job_writes_factors_biases_top_n_and_adata(tmp_path, client):
    import anndata as ad

    from pipeline import run_job

    x = ratings()
    store = _store(tmp_path, x)
    job = job_dict(tmp_path, "", input={"url": str(store), "array": "X"}, methods=[ALS])
    report = run_job(job, client=client)
    r = report["methods"]["als"]
    out = tmp_path / "out" / "job"
    f = _factors(out)
    assert f["U"].shape == (USERS, 3) and f["V"].shape == (ITEMS, 3)
    assert f["user_bias"].shape == (USERS,) and f["item_bias"].shape == (ITEMS,)
    assert f["top_items"].dtype == np.int64 and f["top_items"].shape == (USERS, 5)

    # train and validation errors together are the error over every rating, from numpy
    obs = _observed(x)
    rows, cols = obs.nonzero()
    err = np.asarray(obs[rows, cols]).ravel() - _predict(f, r["global_mean"])[rows, cols]
    assert r["ratings"] == obs.nnz == r["ratings_train"] + r["ratings_validation"]
    assert 0.05 * obs.nnz < r["ratings_validation"] < 0.15 * obs.nnz
    sse = (
        r["train_rmse"] ** 2 * r["ratings_train"]
        + r["validation_rmse"] ** 2 * (r["ratings_validation"])
    )
    assert sse == pytest.approx(np.sum(err**2), rel=1e-9)
    assert r["validation_rmse"] < 1.25 * SIGMA  # the noise floor, with 12 % observed
    assert r["empty_users"] == 1 and r["empty_items"] == 1
    assert not f["U"][-1].any() and not f["V"][-1].any()
    assert f["user_bias"][-1] == 0 and f["item_bias"][-1] == 0

    # the top-N lists: brute force over the written factors, seen items excluded
    want_items, want_scores = _top(_predict(f, r["global_mean"]), obs, 5)
    np.testing.assert_array_equal(f["top_items"], want_items)
    np.testing.assert_allclose(f["top_scores"], want_scores, rtol=1e-12)

    adata = ad.read_zarr(out / "adata.zarr")
    np.testing.assert_array_equal(adata.obsm["X_als"], f["U"])
    np.testing.assert_array_equal(adata.varm["ALS_V"], f["V"])
    assert list(adata.obs_names[:2]) == ["user-0000", "user-0001"]
    text = (out / "report.md").read_text()
    first = r["examples"][0]
    assert first["user"] == "user-0000" and first["items"][0] == f"film-{want_items[0, 0]:03d}"
    assert f"| user-0000 | film-{want_items[0, 0]:03d} (" in text
    history = [h["objective"] for h in r["history"]]
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(history))
    assert r["passes"] == 1 + 2 * 12 + 1 and r["iterations"] == 12


def test_csc_and_plain_csr_stores_give_the_anndata_result(tmp_path, client):
    """The same ratings stored as CSC in AnnData, and as a bare CSR group, give the
    AnnData CSR store's factors (the CSC store is read in row blocks)."""
    import anndata as ad
    import zarr

    from pipeline import run_job

    x = ratings(seed=2, users=300, items=80)
    csc = tmp_path / "csc.zarr"
    with ad.settings.override(zarr_write_format=3):
        ad.AnnData(X=sp.csc_matrix(x)).write_zarr(csc)
    plain = tmp_path / "plain.zarr"
    ad.io.write_elem(zarr.open_group(plain, mode="w", zarr_format=3), "ratings", x)
    stores = {"csr": (_store(tmp_path, x), "X"), "csc": (csc, "X"), "plain": (plain, "ratings")}
    results = {}
    for name, (store, array) in stores.items():
        job = job_dict(tmp_path, "", name=name, input={"url": str(store), "array": array})
        job["methods"] = [{**ALS, "iterations": 4, "recommend": None}]
        run_job(job, client=client)
        results[name] = _factors(tmp_path / "out" / name)
    assert not (tmp_path / "out" / "plain" / "adata.zarr").exists()  # not an AnnData input
    for name in ("csc", "plain"):
        for key, want in results["csr"].items():
            np.testing.assert_allclose(results[name][key], want, rtol=1e-10, atol=1e-12)


def test_implicit_job_measures_ranking_on_the_hold_out(tmp_path, client):
    from pipeline import run_job

    rng = np.random.default_rng(4)
    clicks = ratings(seed=4).copy()
    clicks.data = rng.poisson(2.0, clicks.nnz).astype(np.float64) + 1.0
    store = _store(tmp_path, clicks)
    spec = {
        "method": "als",
        "rank": 4,
        "reg": 0.1,
        "iterations": 6,
        "tol": 0,
        "implicit": {"alpha": 5.0},
        "validation": {"fraction": 0.2, "seed": 0},
        "recommend": {"top_n": 10},
    }
    job = job_dict(tmp_path, "", input={"url": str(store), "array": "X"}, methods=[spec])
    r = run_job(job, client=client)["methods"]["als"]
    assert 0 < r["precision_at_10"] <= 1 and 0 < r["ndcg_at_10"] <= 1
    assert r["validation_rmse"] is None and r["global_mean"] is None
    objective = [h["objective"] for h in r["history"]]
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(objective))
    f = _factors(tmp_path / "out" / "job")
    assert "user_bias" not in f
    want_items, _ = _top(f["U"] @ f["V"].T, _observed(clicks), 10)
    np.testing.assert_array_equal(f["top_items"], want_items)


# --------------------------------------------------------------------------- bad input


def _bad_store(tmp_path: Path, case: str) -> tuple[Path, dict]:
    x = ratings(seed=5, users=60, items=20)
    spec: dict = {"method": "als", "rank": 3, "iterations": 2}
    if case == "nan":
        x.data[7] = np.nan
    elif case == "negative-implicit":
        x.data[3] = -1.0
        spec["implicit"] = {"alpha": 2.0}
    elif case == "empty":
        x = sp.csr_matrix(x.shape)
    elif case == "rank":
        spec["rank"] = 20
    elif case == "dense":
        path = tmp_path / "dense.zarr"
        write_array(path, x.toarray())
        return path, spec
    return _store(tmp_path, x), spec


BAD = {  # case: words the one stderr line must hold
    "nan": ("NaN or Inf", "first in row"),
    "negative-implicit": ("negative", "implicit"),
    "empty": ("no stored entries",),
    "rank": ("rank", "below min(users, items) = 20"),
    "dense": ("sparse store", "dense array"),
}


def _bad_job(tmp_path: Path, case: str) -> dict:
    store, spec = _bad_store(tmp_path, case)
    job_input = {"url": str(store), "array": None if case == "dense" else "X"}
    if case == "empty":  # zarr omits the all-zero indptr chunk: read it as its fill value
        job_input["missing_chunks"] = "fill"
    return job_dict(tmp_path, "", input=job_input) | {"methods": [spec]}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_it_and_writes_nothing(tmp_path, case, client):
    from pipeline import run_job
    from pipeline.errors import UserError

    with pytest.raises(UserError) as info:
        run_job(_bad_job(tmp_path, case), client=client)
    line = str(info.value)
    assert len(line.splitlines()) == 1
    for word in BAD[case]:
        assert word in line, line
    assert not (tmp_path / "out" / "job").exists()
    assert not list((tmp_path / "out").glob(".job*")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("case", ["negative-implicit", "rank"])  # mid-run, by ALS; before compute
def test_bad_input_through_the_cli_exits_2_with_one_line(tmp_path, case, cli):
    job = _bad_job(tmp_path, case)
    job["cluster"] = {"kind": "local", "n_workers": 1, "threads_per_worker": 1}
    line = one_line_exit(cli("run", write_job(tmp_path, job)))
    assert all(word in line for word in BAD[case]), line
    assert not (tmp_path / "out" / "job").exists()


def test_biases_with_implicit_is_a_config_error():
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    job = {
        "name": "x",
        "input": {"url": "r.zarr", "array": "X"},
        "methods": [{"method": "als", "rank": 2, "biases": True, "implicit": {"alpha": 1}}],
    }
    with pytest.raises(ConfigError, match="biases"):
        parse_config(job)
    job["methods"][0].pop("biases")
    job["input"]["create_if_missing"] = {"kind": "lowrank", "shape": [10, 10]}
    with pytest.raises(ConfigError, match="sparse store"):
        parse_config(job)


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def big_ratings(tmp_path_factory) -> Path:
    """40,000 users × 2,000 items, ~1.2 M ratings: an iteration takes about a second."""
    rng = np.random.default_rng(9)
    m, n, nnz = 40_000, 2_000, 1_200_000
    rows = rng.integers(0, m, nnz)
    cols = np.minimum(rng.zipf(1.3, nnz) - 1, n - 1)
    x = sp.csr_matrix((rng.integers(1, 11, nnz) / 2.0, (rows, cols)), shape=(m, n))
    x.sum_duplicates()
    x.data = np.minimum(x.data, 5.0)
    return write_anndata(tmp_path_factory.mktemp("als") / "big.zarr", x)


@pytest.mark.e2e
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, big_ratings, client):
    from pipeline import run_job

    method = {"method": "als", "rank": 8, "iterations": 12, "tol": 0, "checkpoint_every": 2}
    method["validation"] = {"fraction": 0.1}
    base = dict(
        input={"url": str(big_ratings), "array": "X"},
        cluster={"n_workers": 1, "threads_per_worker": 1},
    )
    ref = job_dict(tmp_path, "", name="ref", methods=[method], **base)
    run_job(ref, client=client)
    want = _factors(tmp_path / "out" / "ref")

    job = job_dict(tmp_path, "", name="killed", methods=[method], **base)
    killed_at = kill_at_checkpoint(tmp_path, job, 4)
    assert 4 <= killed_at < 12

    job["methods"][0]["resume"] = True
    r = run_job(job, client=client)["methods"]["als"]
    assert r["resumed_from"] == killed_at and r["iterations"] == 12
    got = _factors(tmp_path / "out" / "killed")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12)
    assert not (tmp_path / "out" / ".killed.checkpoint").exists()


@pytest.mark.e2e
def test_worker_killed_mid_half_step_changes_no_bit(tmp_path, big_ratings):
    from pipeline import run_job
    from pipeline.linalg.als import USER_STEP

    method = {"method": "als", "rank": 8, "iterations": 5, "tol": 0}
    with two_workers("3GiB") as c:
        calm = job_dict(tmp_path / "calm", "", input={"url": str(big_ratings), "array": "X"})
        calm["methods"] = [method]
        run_job(calm, client=c)
        hit = {**calm, "output": {"url": str(tmp_path / "hit" / "out")}}
        outcome: dict = {}
        stop = threading.Event()

        def target() -> None:
            try:
                outcome["report"] = run_job(hit, client=c)
            except BaseException as exc:  # reported by the test
                outcome["error"] = exc
            finally:
                stop.set()

        runner = threading.Thread(target=target)
        runner.start()
        killed = kill_worker_running(c, USER_STEP, stop)
        runner.join(timeout=180)
    assert not runner.is_alive() and "error" not in outcome, outcome.get("error")
    assert killed is not None, f"no {USER_STEP} task was seen running"
    want = _factors(tmp_path / "calm" / "out" / "job")
    got = _factors(tmp_path / "hit" / "out" / "job")
    for key in want:
        assert np.array_equal(want[key], got[key]), key


@pytest.mark.e2e  # the job starts its own cluster of worker processes
def test_workers_too_small_to_keep_both_layouts_are_refused_before_compute(tmp_path):
    """Streamed, an item half-step would gather every rating across the workers at once
    (its shuffle): a worker of 256 MiB (96 MiB for data) cannot keep 2 × 40 MiB of ratings,
    and the run says so in one line before any compute, writing nothing."""
    from pipeline import run_job
    from pipeline.errors import ClusterError

    rng = np.random.default_rng(1)
    m, n, nnz = 200_000, 5_000, 3_500_000
    x = sp.csr_matrix((rng.random(nnz) * 4 + 1, (rng.integers(0, m, nnz), rng.integers(0, n, nnz))))
    store = write_anndata(tmp_path / "big.zarr", x)
    job = job_dict(tmp_path, "", input={"url": str(store), "array": "X"})
    job["methods"] = [{"method": "als", "rank": 4}]
    job["cluster"] = {"n_workers": 1, "threads_per_worker": 1, "memory_limit": "256MiB"}
    with pytest.raises(ClusterError, match=r"als keeps the ratings .* raise cluster.memory_limit"):
        run_job(job)
    assert not (tmp_path / "out" / "job").exists()
