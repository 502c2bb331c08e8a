"""Per-layer low-rank factors, rank rules and budgets (pipeline.linalg.lowrank) against numpy.

Matrices with known spectra (``U diag(σ) Vᵀ`` with random orthonormal ``U``, ``V``): the
exact solver must reach the Eckart–Young error, the randomized one come within 1 % of it,
the rank rules pick what a brute-force loop over ``numpy.linalg.svd`` picks, and the budget
beat one rank for all layers. Pure numpy, fast tier.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.errors import InputError


def lr():
    """The module under test, imported late (``pipeline.linalg`` imports dask)."""
    from pipeline.linalg import lowrank

    return lowrank


def with_spectrum(shape: tuple[int, int], s: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U diag(s) Vᵀ`` of ``shape`` (``len(s) ≤ min(shape)``), random orthonormal U, V."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], len(s))))
    return np.ascontiguousarray((u * s) @ v.T)


def optimal_error(s: np.ndarray, rank: int) -> float:
    """Eckart–Young: the smallest ``‖W − W_r‖_F / ‖W‖_F``."""
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


def direct_error(w: np.ndarray, res) -> float:
    return float(np.linalg.norm(w - res.b @ res.a) / np.linalg.norm(w))


def decaying(k: int, kind: str) -> np.ndarray:
    i = np.arange(1, k + 1, dtype=np.float64)
    return {"sqrt": i**-0.5, "harmonic": 1 / i, "exp": np.exp(-i / 20), "quad": i**-2.0}[kind]


# --------------------------------------------------------------------------- max_saving_rank


@pytest.mark.parametrize(
    "out,inp,expected",
    [
        (4096, 1024, 819),  # 819·5120 = 4,193,280 < 4,194,304 ≤ 820·5120
        (1024, 4096, 819),
        (384, 1536, 307),
        (10, 10, 4),  # 5·20 = 100 is not smaller
        (3, 3, 1),
        (2, 3, 1),
        (2, 2, 0),  # rank 1 costs 4 = dense
        (1, 100, 0),  # a vector never saves
        (100, 1, 0),
    ],
)
def test_max_saving_rank_table(out, inp, expected):
    assert lr().max_saving_rank(out, inp) == expected


def test_max_saving_rank_is_the_largest_saving_rank():
    for out, inp in itertools.product(range(1, 30), repeat=2):
        r = lr().max_saving_rank(out, inp)
        assert r * (out + inp) < out * inp or r == 0
        assert (r + 1) * (out + inp) >= out * inp
        assert r < min(out, inp)


# --------------------------------------------------------------------------- spectrum

SHAPES = [(300, 120), (120, 300), (150, 150), (1000, 40)]


@pytest.mark.parametrize("shape", SHAPES)
def test_spectrum_matches_numpy(shape):
    """Graded over 12 decades: every σ² within a few ε·σ₁² of numpy's (the Gram's accuracy),
    so relative accuracy 1e-8 from 1e-4·σ₁ up (ε·σ₁²/σ² ≈ 2e-8 there)."""
    k = min(shape)
    w = with_spectrum(shape, np.logspace(0, -12, k), seed=1)
    ref = np.linalg.svd(w, compute_uv=False)
    got = lr().spectrum(w)
    assert got.shape == (k,) and got.dtype == np.float64
    assert np.all(np.diff(got) <= 0) and np.all(got >= 0)
    eps = np.finfo(np.float64).eps
    assert np.max(np.abs(got**2 - ref**2)) <= 64 * eps * ref[0] ** 2
    big = ref >= 1e-4 * ref[0]
    np.testing.assert_allclose(got[big], ref[big], rtol=1e-8)


def test_spectrum_of_rank_deficient_matrix_is_clipped_at_zero():
    w = with_spectrum((80, 60), np.array([3.0, 2.0, 1.0]), seed=2)
    got = lr().spectrum(w)
    np.testing.assert_allclose(got[:3], [3, 2, 1], rtol=1e-12)
    assert np.all(got[3:] >= 0) and np.all(got[3:] < 1e-6)


# --------------------------------------------------------------------------- factor


@pytest.mark.parametrize("solver", ["svd", "rsvd"])
@pytest.mark.parametrize("shape,true_rank", [((200, 80), 7), ((80, 200), 7), ((120, 120), 30)])
def test_exact_recovery_at_the_true_rank(shape, true_rank, solver):
    s = np.linspace(5.0, 0.5, true_rank)
    w = with_spectrum(shape, s, seed=3)
    res = lr().factor(w, true_rank, solver=solver)
    assert res.solver == solver and res.rank == true_rank
    assert res.b.shape == (shape[0], true_rank) and res.a.shape == (true_rank, shape[1])
    assert res.b.flags.c_contiguous and res.a.flags.c_contiguous
    assert res.b.dtype == res.a.dtype == np.float64
    assert res.rel_error < 1e-12
    assert direct_error(w, res) < 1e-12
    assert res.energy_retained == pytest.approx(1.0, abs=1e-12)
    assert res.weighted_rel_error is None
    assert res.params == true_rank * sum(shape)


@pytest.mark.parametrize("shape", [(300, 100), (100, 300), (160, 160)])
@pytest.mark.parametrize("rank", [1, 10, 60])
def test_svd_error_is_the_optimal_truncation_error(shape, rank):
    w = np.random.default_rng(4).standard_normal(shape) @ np.diag(decaying(shape[1], "sqrt"))
    s = np.linalg.svd(w, compute_uv=False)
    res = lr().factor(w, rank, solver="svd")
    assert res.rel_error == pytest.approx(optimal_error(s, rank), rel=1e-6)
    assert res.rel_error == pytest.approx(direct_error(w, res), rel=1e-9)
    assert res.energy_retained == pytest.approx(np.sum(s[:rank] ** 2) / np.sum(s**2), rel=1e-12)
    np.testing.assert_allclose(res.singular_values, s, rtol=1e-10, atol=1e-12 * s[0])


RSVD_CASES = [
    # (shape, kind of spectrum, rank): wide and tall, up to the auto threshold (min / 4)
    ((400, 160), "sqrt", 40),
    ((160, 400), "sqrt", 40),
    ((400, 160), "harmonic", 20),
    ((160, 400), "harmonic", 39),
    ((500, 200), "exp", 50),
    ((200, 500), "quad", 50),
    ((300, 300), "sqrt", 75),
    ((600, 120), "harmonic", 5),
]


@pytest.mark.parametrize("shape,kind,rank", RSVD_CASES)
def test_rsvd_within_one_percent_of_optimal(shape, kind, rank):
    s = decaying(min(shape), kind)
    w = with_spectrum(shape, s, seed=5)
    res = lr().factor(w, rank)  # auto
    assert res.solver == "rsvd"
    assert res.rel_error <= 1.01 * optimal_error(s, rank)
    # the error is measured: the expansion matches the difference of the factors
    assert res.rel_error == pytest.approx(direct_error(w, res), rel=1e-9)
    assert len(res.singular_values) == rank + lr().RSVD_OVERSAMPLE
    assert np.all(res.singular_values <= s[: len(res.singular_values)] * (1 + 1e-10))


def test_rsvd_is_deterministic_per_seed():
    w = with_spectrum((200, 90), decaying(90, "sqrt"), seed=6)
    one, two = (lr().factor(w, 10, solver="rsvd", seed=7) for _ in range(2))
    np.testing.assert_array_equal(one.b, two.b)
    np.testing.assert_array_equal(one.a, two.a)
    other = lr().factor(w, 10, solver="rsvd", seed=8)
    assert not np.array_equal(one.b, other.b)


@pytest.mark.parametrize(
    "shape,rank,expected",
    [
        ((400, 100), 25, "rsvd"),  # exactly AUTO_RSVD_FRACTION · min
        ((400, 100), 26, "svd"),
        ((100, 400), 1, "rsvd"),
        ((100, 400), 100, "svd"),
        ((7, 7), 1, "rsvd"),  # 0.25 · 7 = 1.75 ≥ 1
        ((7, 7), 2, "svd"),
    ],
)
def test_auto_solver_choice(shape, rank, expected):
    w = np.random.default_rng(9).standard_normal(shape)
    assert lr().factor(w, rank).solver == expected


@pytest.mark.parametrize("rel_target", [3e-1, 1e-3, 1e-5, 1e-7, 1e-9])
def test_residual_expansion_matches_the_difference(rel_target):
    """rsvd measures ‖W − BA‖ by the expansion with small products; near the round-off of
    ‖W‖² (rel_error ≲ 1.5e-5) it forms the difference. Either way: the difference's value."""
    k = 60
    tail = np.sqrt(10 * rel_target**2 / (1 - rel_target**2))  # tail² / (10 + tail²) = target²
    s = np.r_[np.ones(10), np.full(k - 10, tail / np.sqrt(k - 10))]
    w = with_spectrum((300, 120), s, seed=10)
    res = lr().factor(w, 10, solver="rsvd")
    direct = direct_error(w, res)
    assert direct == pytest.approx(rel_target, rel=1e-3)
    assert res.rel_error == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("rel_target", [3e-1, 1e-3, 1e-5, 1e-7])
def test_residual_expansion_errs_by_round_off_units_of_the_norm(monkeypatch, rel_target):
    """The expansion alone (never the difference): its error in ‖W − BA‖² stays within a
    few hundred ε·‖W‖², which is why it is trusted only above DIRECT_BELOW_EPS of them."""
    monkeypatch.setattr(lr(), "DIRECT_BELOW_EPS", -np.inf)
    tail = np.sqrt(10 * rel_target**2 / (1 - rel_target**2))
    s = np.r_[np.ones(10), np.full(50, tail / np.sqrt(50))]
    w = with_spectrum((300, 120), s, seed=10)
    res = lr().factor(w, 10, solver="rsvd")
    eps = np.finfo(np.float64).eps
    assert abs(res.rel_error**2 - direct_error(w, res) ** 2) <= 256 * eps
    if rel_target >= 1e-3:
        assert res.rel_error == pytest.approx(direct_error(w, res), rel=1e-9)


def test_residual_expansion_against_difference_on_random_factors():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((50, 40))
    b, a = rng.standard_normal((50, 5)), rng.standard_normal((5, 40))
    sumsq = float(np.sum(x**2))
    expected = float(np.sum((x - b @ a) ** 2))
    assert lr()._residual_sumsq(x, sumsq, b, a, b.T @ x) == pytest.approx(expected, rel=1e-12)
    assert lr()._residual_sumsq(x, sumsq, b, a, None) == pytest.approx(expected, rel=1e-12)


def test_zero_matrix():
    res = lr().factor(np.zeros((20, 10)), 2, solver="rsvd")
    assert res.rel_error == 0.0 and res.energy_retained == 1.0
    assert np.abs(res.b @ res.a).max() == 0


@pytest.mark.parametrize(
    "w,kwargs,message",
    [
        (np.ones(5), {"rank": 1}, "w must be a 2-D matrix"),
        (np.ones((0, 3)), {"rank": 1}, "w must not be empty"),
        (np.full((3, 3), np.nan), {"rank": 1}, "w must be finite"),
        (np.ones((3, 3), dtype=complex), {"rank": 1}, "real numeric dtype"),
        (np.ones((4, 3)), {"rank": 0}, r"rank must be in \[1, 3\], got 0"),
        (np.ones((4, 3)), {"rank": 4}, r"rank must be in \[1, 3\], got 4"),
        (np.ones((4, 3)), {"rank": 1.0}, "rank must be an integer"),
        (np.ones((4, 3)), {"rank": 1, "solver": "qr"}, "solver must be one of"),
        (np.ones((4, 3)), {"rank": 1, "power_iters": -1}, "power_iters must be >= 0"),
    ],
)
def test_factor_refuses(w, kwargs, message):
    with pytest.raises(InputError, match=message):
        lr().factor(w, **kwargs)


# --------------------------------------------------------------------------- rank rules


def brute_force_rank(w: np.ndarray, energy=None, rel_error=None) -> int:
    """The smallest k meeting the target, by reconstructing every truncation."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    norm = np.linalg.norm(w)
    for k in range(1, len(s) + 1):
        if energy is not None and np.sum(s[:k] ** 2) >= energy * norm**2:
            return k
        w_k = (u[:, :k] * s[:k]) @ vt[:k]
        if rel_error is not None and np.linalg.norm(w - w_k) <= rel_error * norm:
            return k
    return len(s)


def _boundaries(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every k's energy share and relative error (the targets where the answer changes)."""
    share = np.cumsum(s**2) / np.sum(s**2)
    return share, np.sqrt(np.clip(1 - share, 0, None))


@settings(max_examples=40, deadline=None)
@given(
    decay=st.floats(0.0, 3.0),
    floor=st.floats(0.0, 0.3),
    target=st.floats(0.05, 0.999),
    kind=st.sampled_from(["energy", "rel_error"]),
    seed=st.integers(0, 2**16),
)
def test_rank_for_target_matches_brute_force(decay, floor, target, kind, seed):
    k = 30
    s = np.arange(1, k + 1, dtype=np.float64) ** -decay + floor
    w = with_spectrum((60, k), s, seed=seed)
    share, error = _boundaries(s)
    boundary = share if kind == "energy" else error
    value = target if kind == "energy" else 1 - target  # rel_error in (0.001, 0.95)
    assume(np.min(np.abs(boundary - value)) > 1e-9)  # no tie the rounding could decide
    got, met = lr().rank_for_target(lr().spectrum(w), float(np.sum(w**2)), **{kind: value})
    assert met
    assert got == brute_force_rank(w, **{kind: value})


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"energy": 0.5}, (1, True)),  # σ² = 16, 9, 4, 1 of 30: 16/30 ≥ 0.5
        ({"energy": 0.54}, (2, True)),
        ({"energy": 1.0}, (4, True)),
        ({"energy": 0.9, "max_rank": 2}, (2, False)),
        ({"rel_error": 0.5}, (2, True)),  # tails 14, 5, 1, 0 of 30; 0.25·30 = 7.5
        ({"rel_error": 0.0}, (4, True)),
        ({"rel_error": 0.1, "max_rank": 3}, (3, False)),  # 1/30 > 0.01
        ({"rel_error": 0.99, "max_rank": 10}, (1, True)),  # k ≥ 1 always
    ],
)
def test_rank_for_target_table(kwargs, expected):
    assert lr().rank_for_target([4.0, 3.0, 2.0, 1.0], 30.0, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "exactly one of energy, rel_error"),
        ({"energy": 0.5, "rel_error": 0.1}, "exactly one of energy, rel_error"),
        ({"energy": 0.0}, r"energy must be in \(0, 1\]"),
        ({"rel_error": 1.0}, r"rel_error must be in \[0, 1\)"),
        ({"energy": 0.5, "max_rank": 0}, "max_rank must be >= 1"),
    ],
)
def test_rank_for_target_refuses(kwargs, message):
    with pytest.raises(InputError, match=message):
        lr().rank_for_target([1.0], 1.0, **kwargs)


# --------------------------------------------------------------------------- budget


def objective(ranks: dict[str, int], spectra: dict[str, np.ndarray]) -> float:
    """Σ of normalised retained energy (a dense layer keeps all of it)."""
    total = 0.0
    for name, r in ranks.items():
        s2 = spectra[name] ** 2
        total += 1.0 if r == 0 else float(np.sum(s2[:r]) / np.sum(s2))
    return total


def cost(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(
        shapes[n][0] * shapes[n][1] if r == 0 else r * sum(shapes[n]) for n, r in ranks.items()
    )


def layers_with_different_spectra() -> tuple[dict, dict]:
    shapes = {"q": (64, 64), "up": (128, 64), "down": (64, 128), "flat": (96, 48)}
    k = {name: min(shape) for name, shape in shapes.items()}
    spectra = {
        "q": decaying(k["q"], "exp"),
        "up": decaying(k["up"], "sqrt"),
        "down": decaying(k["down"], "quad"),
        "flat": np.linspace(1.0, 0.8, k["flat"]),
    }
    return spectra, shapes


@pytest.mark.parametrize("fraction", [0.05, 0.15, 0.3, 0.6])
def test_budget_is_met_and_beats_equal_ranks(fraction):
    spectra, shapes = layers_with_different_spectra()
    dense = sum(o * i for o, i in shapes.values())
    budget = int(fraction * dense)
    ranks = lr().allocate_budget(spectra, shapes, budget)
    assert list(ranks) == list(shapes)
    assert cost(ranks, shapes) <= budget
    equal = lr().equal_rank_for_budget(shapes, budget)
    equal_ranks = {n: min(equal, lr().max_saving_rank(*s)) for n, s in shapes.items()}
    assert cost(equal_ranks, shapes) <= budget
    assert objective(ranks, spectra) > objective(equal_ranks, spectra)


def test_budget_for_everything_keeps_every_layer_dense():
    spectra, shapes = layers_with_different_spectra()
    dense = sum(o * i for o, i in shapes.values())
    assert set(lr().allocate_budget(spectra, shapes, dense).values()) == {0}


def test_budget_spends_nothing_without_gain():
    """Exactly rank-3 layers: no rank beyond 3 gains anything, so none is bought."""
    shapes = {"a": (40, 30), "b": (30, 50)}
    spectra = {n: np.r_[[3.0, 2.0, 1.0], np.zeros(min(s) - 3)] for n, s in shapes.items()}
    ranks = lr().allocate_budget(spectra, shapes, 10_000)
    assert ranks == {"a": 3, "b": 3}


def test_layers_that_never_save_start_dense():
    shapes = {"bias_like": (1, 64), "tiny": (2, 2), "w": (32, 32)}
    spectra = {n: decaying(min(s), "sqrt") for n, s in shapes.items()}
    ranks = lr().allocate_budget(spectra, shapes, 64 + 4 + 64)
    assert ranks == {"bias_like": 0, "tiny": 0, "w": 1}


def brute_force_budget(spectra, shapes, budget) -> float:
    options = {n: [0, *range(1, lr().max_saving_rank(*s) + 1)] for n, s in shapes.items()}
    best = -1.0
    for combo in itertools.product(*options.values()):
        ranks = dict(zip(options, combo, strict=True))
        if cost(ranks, shapes) <= budget:
            best = max(best, objective(ranks, spectra))
    return best


@settings(max_examples=30, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(2, 9), st.integers(2, 9)), min_size=2, max_size=3),
    decays=st.lists(st.floats(0.0, 4.0), min_size=3, max_size=3),
    fraction=st.floats(0.1, 1.0),
)
def test_budget_within_one_step_of_brute_force(dims, decays, fraction):
    shapes = {f"l{i}": d for i, d in enumerate(dims) if lr().max_saving_rank(*d) > 0}
    assume(len(shapes) >= 2)
    spectra = {
        n: np.arange(1, min(s) + 1, dtype=np.float64) ** -decays[i]
        for i, (n, s) in enumerate(shapes.items())
    }
    minimum = sum(sum(s) for s in shapes.values())
    dense = sum(o * i for o, i in shapes.values())
    budget = minimum + int(fraction * (dense - minimum))
    ranks = lr().allocate_budget(spectra, shapes, budget)
    assert cost(ranks, shapes) <= budget
    # the largest gain of any single step (a rank, or the switch to dense)
    step = max(max(spectra[n][1:] ** 2 / np.sum(spectra[n] ** 2), default=0.0) for n in shapes)
    step = max(
        step,
        max(
            np.sum(spectra[n][lr().max_saving_rank(*s) :] ** 2) / np.sum(spectra[n] ** 2)
            for n, s in shapes.items()
        ),
    )
    assert objective(ranks, spectra) >= brute_force_budget(spectra, shapes, budget) - step - 1e-12


def test_budget_below_minimum_is_refused_naming_it():
    spectra, shapes = layers_with_different_spectra()
    minimum = sum(sum(s) for s in shapes.values())
    with pytest.raises(ValueError, match=re.escape(f"at least {minimum}")):
        lr().allocate_budget(spectra, shapes, minimum - 1)
    with pytest.raises(ValueError, match=re.escape(f"at least {minimum}")):
        lr().equal_rank_for_budget(shapes, minimum - 1)
    assert set(lr().allocate_budget(spectra, shapes, minimum).values()) == {1}


def test_budget_names_must_match():
    with pytest.raises(InputError, match="same layers"):
        lr().allocate_budget({"a": np.ones(3)}, {"b": (3, 3)}, 100)


@pytest.mark.parametrize(
    "shapes,budget,expected",
    [
        ({"a": (10, 10)}, 20, 1),
        ({"a": (10, 10)}, 79, 3),
        ({"a": (10, 10)}, 80, 4),
        ({"a": (10, 10)}, 10**6, 4),  # capped at max_saving_rank
        ({"a": (10, 10), "b": (100, 50)}, 2 * 20 + 2 * 150, 2),
        ({"a": (10, 10), "b": (100, 50)}, 4 * 20 + 10 * 150, 10),  # a capped at 4
        ({"a": (10, 10), "v": (1, 30)}, 20 + 30, 1),  # the vector stays dense
    ],
)
def test_equal_rank_for_budget_table(shapes, budget, expected):
    assert lr().equal_rank_for_budget(shapes, budget) == expected


# --------------------------------------------------------------------------- whitening


def correlated_activations(n: int, tokens: int, seed: int) -> np.ndarray:
    """Inputs (n × tokens) with a few strong, correlated directions, as in real layers."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) * (np.arange(1, n + 1) ** -1.5)
    return mix @ rng.standard_normal((n, tokens))


@pytest.mark.parametrize("solver", ["svd", "rsvd"])
def test_whitening_lowers_the_weighted_error(solver):
    n = 80
    x = correlated_activations(n, 2000, seed=12)
    w = np.random.default_rng(13).standard_normal((120, n))
    wh = lr().Whitening.from_gram(x @ x.T)
    assert wh.method == "cholesky"
    rank = 15
    plain = lr().factor(w, rank, solver=solver)
    aware = lr().factor(w, rank, solver=solver, whiten=wh)
    assert aware.solver == plain.solver == solver
    out_error = np.linalg.norm((w - aware.b @ aware.a) @ x) / np.linalg.norm(w @ x)
    plain_out_error = np.linalg.norm((w - plain.b @ plain.a) @ x) / np.linalg.norm(w @ x)
    weighted = np.linalg.norm((w - aware.b @ aware.a) @ wh.s) / np.linalg.norm(w @ wh.s)
    assert aware.weighted_rel_error == pytest.approx(weighted, rel=1e-9)
    assert aware.weighted_rel_error == pytest.approx(out_error, rel=1e-2)  # S Sᵀ = G + ridge
    assert out_error < 0.5 * plain_out_error
    # the plain error is measured too, and is what whitening gives up
    assert aware.rel_error == pytest.approx(direct_error(w, aware), rel=1e-9)
    assert aware.rel_error > plain.rel_error
    # optimal in the weighted norm: the truncation error of W S
    s = np.linalg.svd(w @ wh.s, compute_uv=False)
    assert aware.weighted_rel_error <= optimal_error(s, rank) * (
        1 + 1e-6 if solver == "svd" else 1.01
    )
    assert aware.energy_retained == pytest.approx(1 - optimal_error(s, rank) ** 2, rel=1e-2)


def test_whitening_factor_recovers_a_low_rank_weight():
    w = with_spectrum((60, 40), np.array([2.0, 1.0, 0.5]), seed=14)
    x = correlated_activations(40, 500, seed=15)
    res = lr().factor(w, 3, solver="svd", whiten=lr().Whitening.from_gram(x @ x.T))
    assert res.rel_error < 1e-10 and res.weighted_rel_error < 1e-10


def test_cholesky_whitening_is_the_shifted_factor():
    x = correlated_activations(30, 400, seed=16)
    g = x @ x.T
    wh = lr().Whitening.from_gram(g, ridge=1e-3)
    assert wh.method == "cholesky" and wh.ridge == 1e-3
    assert np.array_equal(np.tril(wh.s), wh.s)
    shift = 1e-3 * np.mean(np.diag(g))
    np.testing.assert_allclose(wh.s @ wh.s.T, g + shift * np.eye(30), rtol=1e-10, atol=1e-10)
    v = np.random.default_rng(17).standard_normal((5, 30))
    np.testing.assert_allclose(wh.solve(v) @ wh.s, v, atol=1e-8)


@pytest.mark.parametrize("case", ["dead input, ridge 0", "indefinite"])
def test_eigh_fallback_on_a_singular_gram(case):
    n = 25
    x = correlated_activations(n, 300, seed=18)
    if case == "dead input, ridge 0":
        x[3] = 0.0  # an input that is always zero: G is singular
        g, ridge = x @ x.T, 0.0
    else:  # accumulated badly: an eigenvalue below −ridge·mean(diag)
        g, ridge = x @ x.T, 1e-6
        lam, q = np.linalg.eigh(g)
        lam[0] = -1e-3 * np.mean(np.diag(g))
        g = (q * lam) @ q.T
    wh = lr().Whitening.from_gram(g, ridge=ridge)
    assert wh.method == "eigh"
    assert np.all(np.isfinite(wh.s))
    lam = np.sum(wh.s**2, axis=0)
    assert np.min(lam) > 0
    v = np.random.default_rng(19).standard_normal((4, n))
    np.testing.assert_allclose(wh.solve(v) @ wh.s, v, atol=1e-8 * np.abs(v).max())
    w = np.random.default_rng(20).standard_normal((30, n))
    res = lr().factor(w, 5, whiten=wh)
    assert np.isfinite(res.a).all() and res.weighted_rel_error < 1


@pytest.mark.parametrize(
    "gram,ridge,message",
    [
        (np.ones((3, 4)), 1e-6, "gram must be square"),
        (np.zeros((3, 3)), 1e-6, "positive mean diagonal"),
        (np.eye(3), -1.0, "ridge must be a finite number >= 0"),
        (np.full((2, 2), np.inf), 1e-6, "gram must be finite"),
    ],
)
def test_whitening_refuses(gram, ridge, message):
    with pytest.raises(InputError, match=message):
        lr().Whitening.from_gram(gram, ridge=ridge)


def test_whitening_must_match_the_inputs():
    wh = lr().Whitening.from_gram(np.eye(4))
    with pytest.raises(InputError, match="whiten must match the weight's 5 inputs"):
        lr().factor(np.ones((3, 5)), 1, whiten=wh)


@pytest.mark.parametrize("noise", [1e-1, 1e-9])
def test_residual_sumsq_of_any_factors_matches_the_difference(noise):
    """Rounded (float16) factors: the expansion where it keeps its digits, the direct
    difference where the error is at round-off (noise 1e-9)."""
    from pipeline.linalg.lowrank import residual_sumsq

    rng = np.random.default_rng(5)
    b, a = rng.standard_normal((300, 6)), rng.standard_normal((6, 80))
    x = b @ a + noise * rng.standard_normal((300, 80))
    b16, a16 = b.astype(np.float16).astype(float), a.astype(np.float16).astype(float)
    for bb, aa in ((b, a), (b16, a16)):
        want = float(np.sum((x - bb @ aa) ** 2))
        got = residual_sumsq(x, bb, aa, float(np.sum(x * x)))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12 * float(np.sum(x * x)))
