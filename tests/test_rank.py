"""Rank chosen by the data (``rank: {max, energy | rel_error | sv_ratio}``) for rsvd and svd.

Matrices with known spectra; the chosen rank must be the smallest that meets the target
on numpy's exact singular values, with the same passes as a fixed-rank run, factors of
exactly that rank, and ``rank_rule_met: false`` (plus a report warning) when ``max`` is
not enough.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import job_dict, write_array

from pipeline.config import parse_config
from pipeline.errors import ConfigError

M, N = 600, 40
SIGMA = 0.8 ** np.arange(N)  # σᵢ = 0.8^i: every rule's answer is well separated


def _matrix(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((M, N)))
    v, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return (u * SIGMA) @ v.T


A = _matrix()


def _smallest(ok: np.ndarray) -> int:
    return int(np.argmax(ok)) + 1


TOTAL = float(np.sum(SIGMA**2))
CASES = [  # rule, the smallest k meeting it on the exact spectrum
    ({"max": 30, "energy": 0.95}, _smallest(np.cumsum(SIGMA**2) >= 0.95 * TOTAL)),
    ({"max": 30, "rel_error": 0.05}, _smallest(TOTAL - np.cumsum(SIGMA**2) <= 0.05**2 * TOTAL)),
    ({"max": 30, "sv_ratio": 100}, int(np.sum(SIGMA >= SIGMA[0] / 100))),
]


@pytest.mark.parametrize(("rule", "k"), CASES, ids=["energy", "rel_error", "sv_ratio"])
def test_choose_rank_is_the_smallest_meeting_the_target(rule, k):
    from pipeline.methods.rank import RankRule, choose_rank

    assert 3 < k < 30
    assert choose_rank(RankRule(**rule), SIGMA, TOTAL, TOTAL) == (k, True)
    short = RankRule(**{**rule, "max": k - 1})
    assert choose_rank(short, SIGMA, TOTAL, TOTAL) == (k - 1, False)
    exact = RankRule(**{**rule, "max": k})  # max just enough; sv_ratio sees σ_{k+1}
    assert choose_rank(exact, SIGMA, TOTAL, TOTAL) == (k, True)


@pytest.mark.parametrize("method", ["rsvd", "svd"])
@pytest.mark.parametrize(("rule", "k"), CASES, ids=["energy", "rel_error", "sv_ratio"])
def test_jobs_keep_exactly_the_chosen_rank(tmp_path, client, method, rule, k):
    import zarr

    from pipeline.jobs import run_job

    url = tmp_path / "a.zarr"
    write_array(url, A, chunks=(150, N))
    spec = {"method": method, "rank": rule} | ({"power_iters": 3} if method == "rsvd" else {})
    report = run_job(job_dict(tmp_path, str(url), methods=[spec]), client=client)
    r = report["methods"][method]
    assert r["rank"] == k and r["rank_rule"] == rule and r["rank_rule_met"] is True
    np.testing.assert_allclose(r["singular_values"], SIGMA[:k], rtol=1e-8)
    assert r["residual_rel"] == pytest.approx(np.sqrt(np.sum(SIGMA[k:] ** 2) / TOTAL), rel=1e-6)
    factors = zarr.open_group(tmp_path / "out" / "job" / "factors.zarr", mode="r")
    assert factors[f"{method}/U"].shape == (M, k) and factors[f"{method}/Vt"].shape == (k, N)
    fixed = 3 + 1 if method == "rsvd" else 2
    assert r["passes"] == fixed  # zero extra passes


def test_pca_energy_rule_matches_scikit_learn_float_n_components(tmp_path, client):
    from sklearn.decomposition import PCA

    from pipeline.jobs import run_job

    data = A + 5.0  # a mean to remove
    url = tmp_path / "a.zarr"
    write_array(url, data, chunks=(150, N))
    spec = {"method": "rsvd", "rank": {"max": 30, "energy": 0.9}, "center": True}
    report = run_job(
        job_dict(tmp_path, str(url), methods=[spec | {"power_iters": 3}]), client=client
    )
    pca = PCA(n_components=0.9, svd_solver="full").fit(data)
    r = report["methods"]["rsvd"]
    assert r["rank"] == pca.n_components_
    np.testing.assert_allclose(r["explained_variance_ratio"], pca.explained_variance_ratio_, 1e-8)


def test_max_too_small_keeps_max_and_says_so(tmp_path, client, caplog):
    from pipeline.jobs import run_job

    url = tmp_path / "a.zarr"
    write_array(url, A, chunks=(150, N))
    spec = {"method": "rsvd", "rank": {"max": 5, "energy": 0.99}}
    report = run_job(job_dict(tmp_path, str(url), methods=[spec]), client=client)
    r = report["methods"]["rsvd"]
    assert r["rank"] == 5 and r["rank_rule_met"] is False
    assert r["energy_retained"] < 0.99
    assert "rank rule {'max': 5, 'energy': 0.99} not met" in caplog.text
    text = (tmp_path / "out" / "job" / "report.md").read_text()
    assert "**Warning**: the rank rule {'max': 5, 'energy': 0.99} is not met" in text


@pytest.mark.parametrize(
    ("rank", "message"),
    [
        ({"max": 5}, "give exactly one of energy, rel_error, sv_ratio next to max, got []"),
        ({"max": 5, "energy": 0.9, "sv_ratio": 10}, "got ['energy', 'sv_ratio']"),
        ({"max": 5, "energy": 1.5}, "energy: must be ≤ 1"),
        ({"max": 0, "energy": 0.5}, "max: must be ≥ 1"),
    ],
)
def test_bad_rules_are_config_errors(tmp_path, rank, message):
    job = job_dict(tmp_path, "in.zarr", methods=[{"method": "rsvd", "rank": rank}])
    with pytest.raises(ConfigError) as info:
        parse_config(job)
    assert message in str(info.value), str(info.value)
    assert parse_config(job_dict(tmp_path, "x", methods=[{"method": "rsvd", "rank": 3}]))
