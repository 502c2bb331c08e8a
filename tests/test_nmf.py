"""NMF against scikit-learn on real data, exact-rank recovery, one pass per iteration,
checkpoint/resume, and bad input — on the session LocalCluster."""

from __future__ import annotations

import json
import logging
import time
import warnings

import numpy as np
import pytest

from pipeline.errors import InputError
from tests.conftest import job_dict, kill_at_checkpoint, write_array


def svd(a, k, seed):
    from pipeline.linalg import rsvd

    res = rsvd(a, k, seed=seed)
    return res.u, res.s, res.vt


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float64)  # 1797 × 64 pixel counts, real data


def sklearn_error(x, solver, init, max_iter):
    from sklearn.decomposition import NMF

    model = NMF(10, init=init, solver=solver, max_iter=max_iter, tol=1e-4, random_state=0)
    w = model.fit_transform(x)
    return np.linalg.norm(x - w @ model.components_) / np.linalg.norm(x)


BUDGET = 50  # the same iteration budget for ours and scikit-learn's


@pytest.mark.parametrize(
    "solver,sk_solver,init",
    [
        ("hals", "cd", "nndsvda"),
        ("hals", "cd", "nndsvd"),
        ("mu", "mu", "nndsvda"),
        ("hals", "cd", "random"),
    ],
)
def test_matches_sklearn_on_digits(client, digits, solver, sk_solver, init):
    import dask.array as da

    from pipeline.linalg import nmf, row_blocks

    a = row_blocks(da.from_array(digits, chunks=(400, 64)), min_rows=20)
    res = nmf(a, 10, solver=solver, init=init, max_iter=BUDGET, tol=1e-4, svd=svd)
    w = res.w.compute()
    assert w.shape == (1797, 10) and res.h.shape == (10, 64)
    assert w.min() >= 0 and res.h.min() >= 0
    err = np.linalg.norm(digits - w @ res.h) / np.linalg.norm(digits)
    assert res.history[-1] == pytest.approx(err, rel=1e-6)  # objective from the pass is exact
    assert np.all(np.diff(res.history) <= 1e-12), "objective must not increase"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning at the same budget
        ref = sklearn_error(digits, sk_solver, init, BUDGET)
    assert err <= ref * 1.03, (err, ref)


def test_plain_hals_is_sklearn_cd_iterate_for_iterate(client, digits):
    """inner_sweeps=1 from scikit-learn's own init: the same error after every iteration."""
    import dask.array as da
    from sklearn.decomposition import NMF
    from sklearn.decomposition._nmf import _initialize_nmf

    from pipeline.linalg import NMFState, nmf

    w0, h0 = _initialize_nmf(digits, 10, init="nndsvda", random_state=0)
    a = da.from_array(digits, chunks=(400, 64))
    state = NMFState([w0[i : i + 400].copy() for i in range(0, 1797, 400)], h0.copy())
    res = nmf(a, 10, max_iter=8, tol=0, state=state, inner_sweeps=1)
    ref = []
    for it in range(1, 9):
        model = NMF(10, init="custom", solver="cd", max_iter=it, tol=0)
        w = model.fit_transform(digits, W=w0.copy(), H=h0.copy())
        ref.append(np.linalg.norm(digits - w @ model.components_) / np.linalg.norm(digits))
    np.testing.assert_allclose(res.history, ref, rtol=1e-9)


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_inner_sweeps_converge_faster_per_pass(client, digits, solver):
    """Gillis–Glineur acceleration: at the same number of passes over A, a lower error."""
    import dask.array as da

    from pipeline.linalg import nmf, row_blocks

    a = row_blocks(da.from_array(digits, chunks=(400, 64)), min_rows=20)
    plain = nmf(a, 10, solver=solver, max_iter=10, tol=0, svd=svd, inner_sweeps=1)
    fast = nmf(a, 10, solver=solver, max_iter=10, tol=0, svd=svd)
    assert fast.history[-1] < 0.99 * plain.history[-1], (fast.history, plain.history)
    assert np.all(np.diff(fast.history) <= 1e-12), "objective must not increase"


def _sparse_rank5():
    rng = np.random.default_rng(0)
    w0, h0 = rng.random((3000, 5)), rng.random((5, 120))
    w0[w0 < 0.5], h0[h0 < 0.5] = 0, 0
    return w0 @ h0


def test_exact_low_rank_is_recovered(client):
    """Sparse (hence identifiable) exact rank-5 data is recovered to small error by HALS."""
    import dask.array as da

    from pipeline.linalg import nmf

    x = _sparse_rank5()
    res = nmf(da.from_array(x, chunks=(500, 120)), 5, max_iter=150, tol=1e-12, svd=svd)
    err = np.linalg.norm(x - res.w.compute() @ res.h) / np.linalg.norm(x)
    assert err < 1e-6


def test_multiplicative_updates_keep_pace_with_sklearn(client):
    """MU converges slowly by nature: at the same budget and init it matches sklearn's mu."""
    import dask.array as da
    from sklearn.decomposition import NMF

    from pipeline.linalg import nmf

    x = _sparse_rank5()
    res = nmf(da.from_array(x, chunks=(500, 120)), 5, solver="mu", max_iter=BUDGET, tol=0, svd=svd)
    err = np.linalg.norm(x - res.w.compute() @ res.h) / np.linalg.norm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NMF(5, init="nndsvda", solver="mu", max_iter=BUDGET, tol=0, random_state=0)
        w = model.fit_transform(x)
    ref = np.linalg.norm(x - w @ model.components_) / np.linalg.norm(x)
    assert err <= 1.05 * ref and res.history == sorted(res.history, reverse=True)


def test_negative_input_is_refused(client):
    import dask.array as da

    from pipeline.linalg import nmf

    x = np.ones((100, 10))
    x[57, 3] = -0.5
    with pytest.raises(InputError, match=r"non-negative.*-0\.5"):
        nmf(da.from_array(x, chunks=(20, 10)), 3)


def test_graph_does_not_grow_with_iterations(client):
    """Per-iteration time stays flat: the state is persisted, the graph rebuilt small.
    Measured in CPU time of this process (the client, the scheduler and the workers'
    threads): what another test's processes take meanwhile does not count."""
    import dask.array as da

    from pipeline.linalg import nmf

    x = np.random.default_rng(1).random((10000, 50))
    a = da.from_array(x, chunks=(1250, 50)).persist()
    stamps = []
    nmf(
        a,
        5,
        init="random",
        max_iter=40,
        tol=0,
        on_iteration=lambda st, w: stamps.append(time.process_time()),
    )
    steps = np.diff(stamps)
    early, late = np.median(steps[2:12]), np.median(steps[-10:])
    assert late < 2.0 * early + 0.02, (early, late)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_no_run_spec_collisions_across_iterations_and_checkpoints(client, tmp_path):
    """Keys are unique per iteration: the scheduler (in this process) never sees a key
    redefined, across iterations, checkpoint writes (optimized graphs), a resume from the
    re-read W and the final unoptimized compute — the "Detected different `run_spec`"
    warning of distributed (dask/dask#9888) would otherwise be logged."""
    import dask
    import dask.array as da
    import zarr

    from pipeline.linalg import NMFState, nmf, row_blocks

    handler = _Messages()
    loggers = [logging.getLogger("distributed.scheduler"), logging.getLogger("distributed")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        x = np.random.default_rng(4).random((2000, 40)).astype(np.float32)
        a = row_blocks(da.from_array(x, chunks=(500, 40)), min_rows=15).persist()
        saved = {}

        def checkpoint(st, w):  # what Checkpoints.save does: an optimized store of W
            path = str(tmp_path / f"w{st.iteration}.zarr")
            target = zarr.create_array(
                store=path,
                shape=w.shape,
                dtype=w.dtype,
                chunks=(max(w.chunks[0]), w.shape[1]),
                overwrite=True,
            )
            da.store(w.rechunk((max(w.chunks[0]), w.shape[1])), target, lock=False)
            saved[st.iteration] = (path, st.h.copy(), list(st.history))

        first = nmf(a, 5, max_iter=4, tol=0, on_iteration=checkpoint)
        w_first = first.w.compute()  # optimized
        # Resume from the checkpoint of iteration 3, as Checkpoints.load does.
        path, h, history = saved[3]
        w = da.from_zarr(zarr.open_array(path, mode="r"), chunks=(a.chunks[0], 5))
        state = NMFState(w.to_delayed(optimize_graph=False)[:, 0].tolist(), h, 3, history)
        res = nmf(a, 5, max_iter=6, tol=0, state=state, on_iteration=checkpoint)
        store = da.store(
            res.w,
            zarr.create_array(str(tmp_path / "final.zarr"), shape=res.w.shape, dtype=res.w.dtype),
            lock=False,
            compute=False,
        )
        _, rsq = dask.compute(store, ((res.a - res.w @ res.h) ** 2).sum(), optimize_graph=False)
        res.w.compute()
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    collisions = [m for m in handler.messages if "run_spec" in m]
    assert not collisions, collisions[0]
    assert res.iterations == 6 and first.iterations == 4
    np.testing.assert_allclose(res.history[:4], first.history, rtol=1e-5)
    assert w_first.dtype == np.float32 and res.h.dtype == np.float32
    assert float(rsq) == pytest.approx(res.history[-1] ** 2 * res.sumsq, rel=1e-3)


def test_nmf_job_end_to_end_and_negative_job(tmp_path, client):
    import xarray as xr

    from pipeline import run_job

    rng = np.random.default_rng(2)
    x = rng.random((4000, 6)) @ rng.random((6, 90)) + 0.01 * rng.random((4000, 90))
    write_array(tmp_path / "in.zarr", x.astype(np.float32), chunks=(1000, 90))
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        methods=[{"method": "nmf", "rank": 6, "max_iter": 300, "tol": 2e-2}],
    )
    report = run_job(job, client=client)
    out = tmp_path / "out" / "job"
    r = json.loads((out / "metrics.json").read_text())["methods"]["nmf"]
    assert r["converged"] and r["iterations"] == len(r["history"]) < 300
    ds = xr.open_zarr(out / "factors.zarr", group="nmf")
    w, h = ds["W"].values.astype(np.float64), ds["H"].values.astype(np.float64)
    assert ds["W"].dims == ("row", "component") and ds["H"].dims == ("component", "col")
    assert r["residual_rel"] == pytest.approx(
        np.linalg.norm(x - w @ h) / np.linalg.norm(x), rel=1e-4
    )
    assert r["residual_rel"] < 0.02 and report["methods"]["nmf"]["converged"]
    last = np.array(r["history"][-2:]) ** 2
    assert (last[0] - last[1]) / last[0] < 2e-2  # the documented stopping rule
    assert (out / "nmf_convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "out").glob(".job.checkpoint*"))

    x[123, 4] = -1.0
    write_array(tmp_path / "neg.zarr", x, chunks=(1000, 90))
    bad = job_dict(
        tmp_path, str(tmp_path / "neg.zarr"), name="neg", methods=[{"method": "nmf", "rank": 3}]
    )
    with pytest.raises(InputError, match="non-negative"):
        run_job(bad, client=client)
    assert not (tmp_path / "out" / "neg").exists()
    assert not list((tmp_path / "out").glob(".neg*"))


@pytest.mark.e2e
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, client):
    import xarray as xr

    from pipeline import run_job

    rng = np.random.default_rng(3)
    x = (rng.random((30000, 8)) @ rng.random((8, 200))).astype(np.float32)
    write_array(tmp_path / "in.zarr", x, chunks=(5000, 200))
    method = {"method": "nmf", "rank": 8, "max_iter": 40, "tol": 0, "checkpoint_every": 5}
    base = dict(
        input={"url": str(tmp_path / "in.zarr")}, cluster={"n_workers": 1, "threads_per_worker": 1}
    )
    # reference: uninterrupted, same seed, on the session cluster
    ref = job_dict(tmp_path, "", name="ref", methods=[method], **base)
    ref_iterations = run_job(ref, client=client)["methods"]["nmf"]["iterations"]
    assert ref_iterations > 30
    ref_ds = xr.open_zarr(tmp_path / "out" / "ref" / "factors.zarr", group="nmf")

    job = job_dict(tmp_path, "", name="killed", methods=[method], **base)
    killed_at = kill_at_checkpoint(tmp_path, job, 15)
    assert 15 <= killed_at < ref_iterations

    job["methods"][0]["resume"] = True
    report = run_job(job, client=client)
    r = report["methods"]["nmf"]
    assert r["resumed_from"] == killed_at and r["iterations"] == ref_iterations
    ds = xr.open_zarr(tmp_path / "out" / "killed" / "factors.zarr", group="nmf")
    np.testing.assert_allclose(ds["H"].values, ref_ds["H"].values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ds["W"].values, ref_ds["W"].values, rtol=1e-6, atol=1e-9)
    assert not (tmp_path / "out" / ".killed.checkpoint").exists()
