"""ALS (:mod:`pipeline.linalg.als`) against numpy and the ``implicit`` library: each
half-step row by row against ``numpy.linalg.solve``, the objective (exact, never
increasing), recovery at the true rank, resume, the hold-out, top-N lists and ranking
metrics against brute force, and bad input. Dask's synchronous scheduler: no cluster here
(``tests/test_als.py`` runs the method on one)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.errors import InputError


@pytest.fixture(autouse=True)
def _synchronous():
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


def dask_csr(x, rows) -> object:
    """``x`` as a dask array of CSR row blocks of ``rows`` rows (an int or a tuple)."""
    import dask.array as da

    x = sp.csr_matrix(x)
    return da.from_array(x, chunks=(rows, x.shape[1]), asarray=False, meta=sp.csr_matrix((0, 0)))


def tiny(seed: int = 0, m: int = 14, n: int = 9, nonneg: bool = False) -> sp.csr_matrix:
    """A small ratings matrix with the awkward rows: a stored 0 (an observed 0), the last
    user and the last item without any rating, a user with fewer ratings than the rank."""
    rng = np.random.default_rng(seed)
    dense = rng.integers(1, 11, (m, n)) / 2.0
    if not nonneg:
        dense -= 3.0
    observed = rng.random((m, n)) < 0.55
    observed[-1, :] = False
    observed[:, -1] = False
    observed[0, :] = False
    observed[0, :2] = True  # 2 ratings < rank 3
    observed[1, 1] = True
    dense[1, 1] = 0.0  # a stored 0: an observed 0
    rows, cols = np.nonzero(observed)
    x = sp.csr_matrix((dense[rows, cols], (rows, cols)), shape=(m, n))
    assert x.nnz == observed.sum() and x[1, 1] == 0
    return x


def initial_state(m: int, n: int, width: int, row_chunks, seed: int = 3):
    """Known starting factors (one item block), random with a non-zero bias column."""
    from pipeline.linalg.als import ALSState

    rng = np.random.default_rng(seed)
    u0, v0 = rng.standard_normal((m, width)), rng.standard_normal((n, width))
    bounds = np.cumsum(row_chunks)[:-1]
    state = ALSState(u=list(np.split(u0, bounds)), v=[v0], row_chunks=tuple(row_chunks))
    return state, u0, v0


def ref_rows(x: sp.csr_matrix, other: np.ndarray, prev_self: np.ndarray, case: dict, mean):
    """Every row's factors from its own regularised normal equations, with numpy."""
    k = case["rank"]
    lam = case.get("reg", 0.1)
    out = np.zeros((x.shape[0], other.shape[1]))
    for r in range(x.shape[0]):
        cols, vals = x.indices[x.indptr[r] : x.indptr[r + 1]], x.data[x.indptr[r] : x.indptr[r + 1]]
        if not len(cols):
            continue
        if case.get("alpha") is not None:  # HKV: VᵀV + V_Iᵀ(C−I)V_I + λI, rhs V_IᵀC p
            y = other
            yi, c = y[cols], 1.0 + case["alpha"] * vals
            a = y.T @ y + yi.T @ np.diag(c - 1) @ yi + lam * np.eye(k)
            b = yi.T @ c
        elif case.get("biases"):  # [y, 1] against r − μ − c_i, weighted λ on x and bias
            d = np.hstack([other[cols, :k], np.ones((len(cols), 1))])
            a = d.T @ d + lam * len(cols) * np.eye(k + 1)
            b = d.T @ (vals - mean - other[cols, k])
        else:
            yi = other[cols]
            a = yi.T @ yi + lam * len(cols) * np.eye(k)
            b = yi.T @ vals
        out[r] = np.linalg.solve(a, b)
    return out


HALF_STEP_CASES = [
    pytest.param({"rank": 3}, id="explicit"),
    pytest.param({"rank": 3, "biases": True, "reg": 0.3}, id="explicit-biases"),
    pytest.param({"rank": 3, "validation_fraction": 0.25, "reg": 0.05}, id="explicit-holdout"),
    pytest.param({"rank": 3, "solver": "cg", "cg_steps": 12}, id="explicit-cg-converged"),
    pytest.param({"rank": 3, "alpha": 2.0, "solver": "cholesky"}, id="implicit-cholesky"),
    pytest.param({"rank": 3, "alpha": 0.7, "solver": "cg", "cg_steps": 12}, id="implicit-cg"),
    pytest.param(
        {"rank": 3, "biases": True, "solver": "cg", "cg_steps": 12}, id="biases-cg-converged"
    ),
]


@pytest.mark.parametrize("case", HALF_STEP_CASES)
def test_each_half_step_solves_every_rows_normal_equations(case):
    """One iteration from known factors: every user row is the numpy solve of its system
    built from V₀, then every item row the solve of its own from the new U, to 1e-10."""
    from pipeline.linalg.als import als

    x = tiny(nonneg=case.get("alpha") is not None)
    m, n = x.shape
    chunks = (5, 5, 4)
    width = case["rank"] + int(case.get("biases", False))
    state, _, v0 = initial_state(m, n, width, chunks)
    opts = {k: v for k, v in case.items() if k != "rank"}
    res = als(dask_csr(x, chunks), case["rank"], iterations=1, tol=0, state=state, **opts)
    train = sp.csr_matrix(res.train.compute())
    u1, v1 = res.u.compute(), res.v.compute()
    if case.get("biases"):
        u1 = np.hstack([u1, res.user_bias.compute()[:, None]])
        v1 = np.hstack([v1, res.item_bias.compute()[:, None]])
        assert res.global_mean == pytest.approx(train.data.mean(), rel=1e-14)
    want_u = ref_rows(train, v0, None, case, res.global_mean)
    np.testing.assert_allclose(u1, want_u, rtol=0, atol=1e-10)
    want_v = ref_rows(sp.csr_matrix(train.T), u1, None, case, res.global_mean)
    np.testing.assert_allclose(v1, want_v, rtol=0, atol=1e-10)
    assert not u1[-1].any() and not v1[-1].any()  # no rating: zero factors (and bias)
    assert res.empty_users >= 1 and res.empty_items >= 1
    if case.get("validation_fraction"):
        held = sp.csr_matrix(res.validation.compute())
        assert res.nnz_train == train.nnz and res.nnz_validation == held.nnz
        assert train.nnz + held.nnz == x.nnz and held.nnz > 0
        assert (train.multiply(held)).nnz == 0  # disjoint
        assert abs(train + held - x).max() == 0


def objective(x, u, v, case, mean=None, ub=None, ib=None) -> float:
    """The documented objective, from dense numpy (small matrices only)."""
    lam = case.get("reg", 0.1)
    rows, cols = x.nonzero()
    vals = np.asarray(x[rows, cols]).ravel()
    if case.get("alpha") is not None:
        c = np.ones(x.shape)
        p = np.zeros(x.shape)
        c[rows, cols] += case["alpha"] * vals
        p[rows, cols] = 1.0
        return float(np.sum(c * (p - u @ v.T) ** 2) + lam * (np.sum(u**2) + np.sum(v**2)))
    pred = np.sum(u[rows] * v[cols], axis=1)
    nu, ni = np.bincount(rows, minlength=x.shape[0]), np.bincount(cols, minlength=x.shape[1])
    ru, rv = np.sum(u**2, axis=1), np.sum(v**2, axis=1)
    if ub is not None:
        pred = pred + mean + ub[rows] + ib[cols]
        ru, rv = ru + ub**2, rv + ib**2
    return float(np.sum((vals - pred) ** 2) + lam * (nu @ ru + ni @ rv))


MONOTONE_CASES = [
    pytest.param({"reg": 0.1}, id="explicit"),
    pytest.param({"reg": 0.05, "biases": True}, id="biases"),
    pytest.param({"reg": 0.1, "solver": "cg"}, id="explicit-cg"),
    pytest.param({"reg": 0.5, "alpha": 3.0, "solver": "cholesky"}, id="implicit"),
    pytest.param({"reg": 0.5, "alpha": 3.0, "solver": "cg"}, id="implicit-cg"),
]


@pytest.mark.parametrize("case", MONOTONE_CASES)
def test_objective_never_increases_and_is_exact(case):
    """Half-step after half-step the objective never increases; the last one equals the
    objective recomputed with numpy from the returned factors."""
    from pipeline.linalg.als import als

    rng = np.random.default_rng(5)
    m, n = 120, 60
    x = sp.random(m, n, density=0.15, random_state=rng, format="csr")
    x.data = np.round(x.data * 9 + 1) / 2.0
    res = als(dask_csr(x, 50), 4, iterations=8, tol=0, seed=1, **case)
    seq = [f for h in res.history for f in (h["objective_user_step"], h["objective"])]
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(seq)), seq
    assert seq[-1] < 0.9 * seq[0]
    u, v = res.u.compute(), res.v.compute()
    biases = {}
    if case.get("biases"):
        biases = {"mean": res.global_mean, "ub": res.user_bias.compute()}
        biases["ib"] = res.item_bias.compute()
    want = objective(x, u, v, case, **biases)
    assert res.history[-1]["objective"] == pytest.approx(want, rel=1e-10)
    if case.get("alpha") is None:
        rows, cols = x.nonzero()
        pred = np.sum(u[rows] * v[cols], axis=1)
        if biases:
            pred += biases["mean"] + biases["ub"][rows] + biases["ib"][cols]
        err = np.asarray(x[rows, cols]).ravel() - pred
        assert res.history[-1]["train_rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-9)
        assert res.history[-1]["train_mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-9)
        assert res.residual_rel == pytest.approx(
            np.linalg.norm(err) / np.linalg.norm(x.data), rel=1e-9
        )


def synthetic(m: int, n: int, rank: int, sigma: float, density: float, seed: int = 0):
    """Low rank + biases + N(0, σ²) noise; observed entries popularity- and activity-
    skewed (every user and item keeps at least a few)."""
    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal((m, rank)), rng.standard_normal((n, rank))
    ub, ib = rng.normal(0, 0.5, m), rng.normal(0, 0.5, n)
    pop = (1.0 + np.arange(n)) ** -0.5
    act = rng.pareto(3.0, m) + 1.0
    p = np.clip(density * act[:, None] * pop[None, :] / (act.mean() * pop.mean()), 0, 0.95)
    observed = rng.random((m, n)) < p
    rows, cols = np.nonzero(observed)
    clean = 3.5 + ub[rows] + ib[cols] + np.sum(u[rows] * v[cols], axis=1)
    vals = clean + rng.normal(0, sigma, len(rows))
    return sp.csr_matrix((vals, (rows, cols)), shape=(m, n))


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_validation_rmse_reaches_the_noise_at_the_true_rank(solver):
    from pipeline.linalg.als import als

    sigma = 0.5
    x = synthetic(2000, 500, 3, sigma, 0.25)  # ~234,000 ratings, ≥ 60 per user
    res = als(
        dask_csr(x, 500), 3, reg=0.01, biases=True, iterations=15, tol=1e-6,
        validation_fraction=0.1, validation_seed=4, solver=solver,
    )  # fmt: skip
    last = res.history[-1]
    assert last["validation_rmse"] <= 1.05 * sigma, last
    assert last["train_rmse"] < sigma
    assert 0.08 < res.nnz_validation / x.nnz < 0.12


def test_holdout_is_a_function_of_the_entry_not_the_blocking():
    from pipeline.linalg.als import als

    x = synthetic(300, 80, 2, 0.3, 0.3, seed=2)
    held = []
    for chunks in (300, 37, (100, 150, 50)):
        res = als(dask_csr(x, chunks), 2, iterations=0, validation_fraction=0.3, validation_seed=9)
        held.append(sp.csr_matrix(res.validation.compute()))
    assert all((h != held[0]).nnz == 0 for h in held[1:])
    other = als(dask_csr(x, 300), 2, iterations=0, validation_fraction=0.3, validation_seed=10)
    assert (sp.csr_matrix(other.validation.compute()) != held[0]).nnz > 0
    assert 0.25 < held[0].nnz / x.nnz < 0.35


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"alpha": 2.0, "solver": "cholesky"}, id="implicit"),
        pytest.param({"biases": True, "solver": "cg", "validation_fraction": 0.2}, id="biases-cg"),
    ],
)
def test_resume_equals_the_uninterrupted_run_and_keep_false_the_kept(case):
    """6 iterations at once, 3 + 3 through a state (also through the checkpoint arrays),
    and without keeping the layouts: the same factors, bit for bit."""
    from pipeline.linalg.als import als, state_arrays, state_from_arrays

    x = synthetic(200, 70, 3, 0.3, 0.25, seed=3)
    x.data = np.abs(x.data)
    a = dask_csr(x, 60)
    whole = als(a, 3, iterations=6, tol=0, **case)
    states = []
    als(a, 3, iterations=3, tol=0, on_iteration=lambda s: states.append(s), **case)
    half = states[-1]
    assert half.iteration == 3
    tall, small, extra = state_arrays(half)
    state = state_from_arrays(
        {"iteration": half.iteration, "history": half.history, "converged": False, **extra},
        tall,
        small,
    )
    resumed = als(a, 3, iterations=6, tol=0, state=state, **case)
    lazy = als(a, 3, iterations=6, tol=0, keep=False, **case)
    for other in (resumed, lazy):
        assert other.iterations == 6
        assert np.array_equal(other.u.compute(), whole.u.compute())
        assert np.array_equal(other.v.compute(), whole.v.compute())
        if case.get("biases"):
            assert np.array_equal(other.item_bias.compute(), whole.item_bias.compute())
        assert [h["objective"] for h in other.history] == [h["objective"] for h in whole.history]


def test_factors_do_not_depend_on_the_blocking():
    """Each row's system is solved on its own, so other row and item blocks change only the
    order of the objective's sums (the last bits), not the factors (to rounding)."""
    from pipeline.linalg.als import als

    x = synthetic(240, 90, 3, 0.3, 0.2, seed=6)
    runs = [
        als(dask_csr(x, rows), 3, iterations=4, tol=0, biases=True, solver="cg", item_blocks=items)
        for rows, items in ((240, None), (50, 2), ((17, 100, 123), 7))
    ]
    assert len(runs[2].v.chunks[0]) == 7
    for r in runs[1:]:
        np.testing.assert_allclose(r.u.compute(), runs[0].u.compute(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(r.v.compute(), runs[0].v.compute(), rtol=0, atol=1e-12)
        assert r.history[-1]["objective"] == pytest.approx(runs[0].history[-1]["objective"])


def clicks(m: int, n: int, seed: int = 0) -> sp.csr_matrix:
    """Implicit counts: Poisson of a positive rank-4 affinity times item popularity."""
    rng = np.random.default_rng(seed)
    aff = rng.gamma(1.0, 1.0, (m, 4)) @ rng.gamma(1.0, 1.0, (4, n)) / 4
    pop = (1.0 + np.arange(n)) ** -0.8
    counts = rng.poisson(aff * pop[None, :] * 1.5)
    counts[rng.random((m, n)) < 0.5] = 0
    return sp.csr_matrix(counts.astype(np.float64))


def implicit_model(rank, reg, iterations, use_cg, u0=None, v0=None):
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=rank, regularization=reg, alpha=1.0, iterations=iterations,
        use_cg=use_cg, dtype=np.float64, num_threads=1, random_state=0,
    )  # fmt: skip
    if u0 is not None:
        model.user_factors, model.item_factors = u0.copy(), v0.copy()
    return model


@pytest.mark.parametrize("use_cg", [True, False], ids=["cg", "cholesky"])
def test_implicit_feedback_matches_the_implicit_library(use_cg):
    """The same matrix, λ, α, iterations and solver as ``implicit``'s CPU ALS in float64
    (fed the confidences ``1 + α r`` with its ``alpha=1``: its confidence is ``alpha·r``
    itself; the confidences here are integers, exact in the float32 it casts them to).

    From the same initial factors both compute the same iterates: factors to 1e-9, and so
    the objective (ours, evaluated for both factor sets) and precision@10. From each one's
    own random start (``implicit``'s ``U(0, 0.01)`` draws, ours per 4,096-row chunk) the
    objective agrees within 1 % and precision@10 within 0.02 (about 10 % of its value):
    different starts stop at different points after 10 iterations, and 1,900 held-out
    clicks make precision@10 move by that much.
    """
    import warnings

    from pipeline.linalg.als import ALSState, als, ranking_metrics

    rank, reg, alpha, iters = 6, 0.5, 2.0, 10
    train, held = _split(clicks(1500, 300), seed=1)
    m, n = train.shape
    rng = np.random.default_rng(11)
    u0, v0 = rng.random((m, rank)) * 0.01, rng.random((n, rank)) * 0.01
    case = {"alpha": alpha, "reg": reg, "solver": "cg" if use_cg else "cholesky"}
    a = dask_csr(train, 800)
    same = als(
        a, rank, iterations=iters, tol=0, state=ALSState(u=np.split(u0, [800]), v=[v0]), **case
    )
    own = als(a, rank, iterations=iters, tol=0, **case)
    conf = train.copy()
    conf.data = 1.0 + alpha * conf.data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit's BLAS-threads advice
        theirs = implicit_model(rank, reg, iters, use_cg, u0, v0)
        theirs.fit(conf, show_progress=False)
        fresh = implicit_model(rank, reg, iters, use_cg)
        fresh.fit(conf, show_progress=False)
    su, sv = same.u.compute(), same.v.compute()
    np.testing.assert_allclose(su, theirs.user_factors, rtol=0, atol=1e-9)
    np.testing.assert_allclose(sv, theirs.item_factors, rtol=0, atol=1e-9)
    ou, ov = own.u.compute(), own.v.compute()
    f_own = objective(train, ou, ov, case)
    assert own.history[-1]["objective"] == pytest.approx(f_own, rel=1e-10)
    f_fresh = objective(train, fresh.user_factors, fresh.item_factors, case)
    assert f_own == pytest.approx(f_fresh, rel=0.01)
    p_own = ranking_metrics(ou, ov, train, held, 10)["precision"]
    p_fresh = ranking_metrics(fresh.user_factors, fresh.item_factors, train, held, 10)
    assert abs(p_own - p_fresh["precision"]) <= 0.02
    assert p_own > 0.1  # far above chance (10 of 300 items)


def _split(x: sp.csr_matrix, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    from pipeline.linalg.als import held_out

    rows, cols = x.nonzero()
    h = held_out(rows, cols, x.shape[1], 0.2, seed)
    vals = np.asarray(x[rows, cols]).ravel()
    mk = lambda keep: sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=x.shape)  # noqa: E731
    return mk(~h), mk(h)


def brute_top(scores: np.ndarray, seen: sp.csr_matrix | None, n: int):
    """Best first, ties to the lower index; seen items excluded (−1, −inf when too few)."""
    s = scores.copy()
    if seen is not None:
        s[seen.nonzero()] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :n]
    vals = np.take_along_axis(s, order, axis=1)
    return np.where(np.isneginf(vals), -1, order), vals


TOP_CASES = [
    pytest.param({"n": 5}, id="plain"),
    pytest.param({"n": 7, "seen": True}, id="exclude-seen"),
    pytest.param({"n": 4, "seen": True, "biases": True}, id="biases"),
    pytest.param({"n": 6, "seen": True, "block_items": 5}, id="small-item-chunks"),
    pytest.param({"n": 3, "block_items": 2, "ties": True}, id="ties-across-chunks"),
    pytest.param({"n": 40, "seen": True, "block_items": 9}, id="fewer-unseen-than-n"),
]


@pytest.mark.parametrize("case", TOP_CASES)
def test_top_n_matches_brute_force(case):
    import dask.array as da

    from pipeline.linalg.als import top_n

    rng = np.random.default_rng(7)
    m, n_items, k = 57, 43, 4
    u = rng.standard_normal((m, k))
    v = rng.standard_normal((n_items, k))
    if case.get("ties"):  # items 3, 20 and 31 score alike, as do 5 and 6
        v[20] = v[31] = v[3]
        v[6] = v[5]
        u = np.round(u)
        v = np.round(v)
    seen = None
    if case.get("seen"):
        seen = sp.random(m, n_items, density=0.3, random_state=rng, format="lil")
        seen[2, :] = 1.0  # a user who has seen every item
        seen = sp.csr_matrix(seen)
    kw = {}
    scores = u @ v.T
    if case.get("biases"):
        ub, ib = rng.standard_normal(m), rng.standard_normal(n_items)
        kw = {"user_bias": da.from_array(ub, chunks=20), "item_bias": ib, "global_mean": 3.0}
        scores = scores + 3.0 + ub[:, None] + ib[None, :]
    items, vals = top_n(
        da.from_array(u, chunks=(20, k)), v, case["n"],
        seen=dask_csr(seen, 20) if seen is not None else None,
        block_items=case.get("block_items"), **kw,
    )  # fmt: skip
    want_items, want_vals = brute_top(scores, seen, case["n"])
    got_items, got_vals = items.compute(), vals.compute()
    assert got_items.dtype == np.int64 and got_items.shape == (m, case["n"])
    np.testing.assert_array_equal(got_items, want_items)
    np.testing.assert_allclose(got_vals, want_vals, rtol=1e-12)


def direct_ranking(u, v, train, held, k):
    """precision@k and ndcg@k straight from their definitions, dense numpy."""
    s = u @ v.T
    s[train.nonzero()] = -np.inf
    hits = pr_div = ndcg = users = 0.0
    for r in range(s.shape[0]):
        liked = set(held.indices[held.indptr[r] : held.indptr[r + 1]])
        if not liked:
            continue
        top = np.lexsort((np.arange(s.shape[1]), -s[r]))[:k]
        gains = [1 / np.log2(i + 2) for i, item in enumerate(top) if item in liked]
        ideal = sum(1 / np.log2(i + 2) for i in range(min(k, len(liked))))
        hits, pr_div = hits + len(gains), pr_div + min(k, len(liked))
        ndcg, users = ndcg + sum(gains) / ideal, users + 1
    return {"precision": hits / pr_div, "ndcg": ndcg / users}


def test_ranking_metrics_match_numpy_and_the_implicit_library():
    import warnings

    from implicit.evaluation import ranking_metrics_at_k

    from pipeline.linalg.als import ranking_metrics

    x = clicks(300, 120, seed=4)
    train, held = _split(x, seed=2)
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal((300, 5)), rng.standard_normal((120, 5))
    ours = ranking_metrics(u, v, dask_csr(train, 70), held, 10)
    want = direct_ranking(u, v, train, held, 10)
    assert ours["precision"] == pytest.approx(want["precision"], rel=1e-12)
    assert ours["ndcg"] == pytest.approx(want["ndcg"], rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = implicit_model(5, 0.1, 1, True, u, v)
        theirs = ranking_metrics_at_k(model, train, held, K=10, show_progress=False)
    assert ours["precision"] == pytest.approx(theirs["precision"], rel=1e-12)
    assert ours["ndcg"] == pytest.approx(theirs["ndcg"], rel=1e-12)


def _nan(x):
    x = x.copy()
    x.data[3] = np.nan
    return x


def _inf(x):
    x = x.copy()
    x.data[-2] = np.inf
    return x


def _negative(x):
    x = x.copy()
    x.data[5] = -1.0
    return x


BAD = [
    pytest.param(_nan, {}, "a holds a NaN rating at row", id="nan"),
    pytest.param(_inf, {}, "a holds an infinite rating at row", id="inf"),
    pytest.param(_negative, {"alpha": 1.0}, "a holds a negative value (-1) at row", id="negative"),
    pytest.param(lambda x: sp.csr_matrix(x.shape), {}, "a has no stored entries", id="empty"),
    pytest.param(lambda x: x, {"rank": 9}, "rank must be below min(users, items) = 9", id="rank"),
    pytest.param(lambda x: x, {"rank": 0}, "rank must be an int ≥ 1, got 0", id="rank-0"),
    pytest.param(lambda x: x, {"alpha": 0.0}, "alpha must be > 0", id="alpha"),
    pytest.param(lambda x: x, {"alpha": 1.0, "biases": True}, "biases are for explicit", id="bias"),
    pytest.param(lambda x: x, {"validation_fraction": 1.0}, "in [0, 1), got 1.0", id="fraction"),
    pytest.param(lambda x: x, {"solver": "lu"}, "solver must be one of", id="solver"),
    pytest.param(lambda x: x, {"reg": -1.0}, "reg must be ≥ 0", id="reg"),
    pytest.param(lambda x: x, {"cg_dtype": "float16"}, "cg_dtype must be one of", id="dtype"),
]  # fmt: skip


@pytest.mark.parametrize("damage,options,message", BAD)
def test_bad_input_is_refused_in_one_line(damage, options, message):
    from pipeline.linalg.als import als

    x = damage(tiny(nonneg=True))
    options = {"rank": 2, **options}
    with pytest.raises(InputError) as err:
        als(dask_csr(x, 5), options.pop("rank"), iterations=2, **options)
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_nan_names_its_row_and_column_in_any_block():
    from pipeline.linalg.als import als

    x = sp.csr_matrix(np.arange(1.0, 61.0).reshape(10, 6))
    x.data[x.indptr[7] + 4] = np.nan  # row 7, column 4: the third block of 3 rows
    with pytest.raises(InputError, match=r"NaN rating at row 7, column 4;"):
        als(dask_csr(x, 3), 2)


def test_dense_blocks_count_their_non_zeros_and_a_scipy_matrix_is_accepted():
    import dask.array as da

    from pipeline.linalg.als import als

    x = synthetic(60, 25, 2, 0.2, 0.4, seed=8)
    sparse = als(dask_csr(x, 60), 2, iterations=3, tol=0)
    dense = als(da.from_array(x.toarray(), chunks=(60, 25)), 2, iterations=3, tol=0)
    plain = als(x, 2, iterations=3, tol=0)
    assert sparse.nnz_train == dense.nnz_train == plain.nnz_train == x.nnz
    for other in (dense, plain):
        np.testing.assert_allclose(other.u.compute(), sparse.u.compute(), rtol=0, atol=1e-12)


def test_tol_stops_and_the_cost_is_declared():
    from pipeline.linalg.als import als, als_cost

    x = synthetic(200, 60, 2, 0.2, 0.3, seed=9)
    res = als(dask_csr(x, 100), 2, iterations=50, tol=1e-3, biases=True)
    assert res.converged and 2 <= res.iterations < 50
    f = [h["objective"] for h in res.history]
    assert (f[-2] - f[-1]) / f[-2] < 1e-3 <= (f[-3] - f[-2]) / f[-3]
    assert all(h["seconds"] >= 0 for h in res.history)
    cost = als_cost((1000, 300), rank=8, iterations=10, final_pass=True)
    assert cost.passes == 22 and not cost.exact and cost.keeps and cost.state_columns == 9


@pytest.mark.parametrize("alpha", [None, 2.0], ids=["explicit", "implicit"])
def test_float32_cg_tracks_float64_and_returns_float64_factors(alpha):
    """``cg_dtype="float32"`` (``implicit``'s precision, for speed) changes the iterates by
    float32 rounding only (three CG steps from rounded directions land a little apart): the
    objective agrees to 1e-4 relative, every iteration."""
    from pipeline.linalg.als import als

    x = clicks(300, 90, seed=3) if alpha else synthetic(300, 90, 3, 0.3, 0.3, seed=3)
    a = dask_csr(x, 100)
    opts = {"iterations": 6, "tol": 0, "alpha": alpha, "solver": "cg"}
    runs = [als(a, 5, cg_dtype=dt, **opts) for dt in ("float64", "float32")]
    f64, f32 = ([h["objective"] for h in r.history] for r in runs)
    np.testing.assert_allclose(f32, f64, rtol=1e-4)
    assert runs[1].u.compute().dtype == np.float64 and runs[1].v.dtype == np.float64
