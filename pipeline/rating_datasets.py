"""Synthetic ratings logs written as AnnData-layout CSR stores, block of users by block.

Rows are users (``user_<i>``), columns items (``item_<j>``); the **stored entries are the
observations**. Both kinds have true factors of rank ``r`` (``SyntheticSpec.rank``,
default 10) and a Zipf item popularity ``p`` (``p_j ∝ 1 / rank_j``, ranks shuffled over the
columns, summing to 1); each user has a Pareto activity ``a_u ≥ 1`` (tail index 1.5: a
few heavy users, as MovieLens has).

``ratings`` (explicit feedback, 1–5 stars in half stars)::

    r_ui = clip(round_half(μ + b_u + c_i + U₀[u]·V₀[i] + ε), 1, 5),   ε ~ N(0, σ²)

with μ = 3.5, biases ``b_u, c_i ~ N(0, 0.3²)``, factors with i.i.d. ``N(0, s²)`` entries
scaled so that ``U₀[u]·V₀[i]`` has standard deviation 0.5 (``s⁴ = 0.25 / r``), σ = 0.5.
Which entries are observed: user ``u`` rates ``n_u`` items, ``n_u`` the stochastic rounding
of ``min(k·a_u, n)`` with ``k`` set so that the mean of ``n_u`` is ``density · n`` (exact for
the Pareto law), drawn **without replacement by popularity** (successive sampling: draws
∝ ``p`` with repeats dropped until ``n_u`` distinct items — done in vectorized rounds, the
few users that saturate the popular items finished by Efraimidis–Spirakis keys over the
items they lack, the same law). The rounding and clipping make the stored ratings differ
from the noiseless model ``μ + b_u + c_i + U₀[u]·V₀[i]`` by a bit more than σ (rounding to
half stars adds 0.5²/12 to the variance, clipping takes a little off): that empirical
RMS over the stored entries is kept as ``noise_rmse`` — the floor of any model's RMSE.

``clicks`` (implicit feedback, positive counts): non-negative factors with i.i.d.
Gamma(0.5, 2) entries (mean 1) and counts ``c_ui ~ Poisson(λ_ui)``,
``λ_ui = scale · a_u · p_i · (U₀[u]·V₀[i])``, only the positive ones stored; ``scale`` is
set so that about ``density`` of the pairs have a count (estimated on a fixed sample of
pairs). A user's counts are drawn per component (``Poisson(scale·a_u·U₀[u,k]·z_k)`` clicks
on items ∝ ``p_i V₀[i,k]``, ``z_k = Σ_i p_i V₀[i,k]``): the same law without touching the
``m × n`` pairs.

Kept for tests (``anndata.read_zarr`` opens the store): ``obsm/true_U`` (m × r),
``varm/true_V`` (n × r), and ``uns/synthetic``: ``kind``, ``rank``, ``seed``, ``density``
(asked), ``user_activity`` (m), ``item_popularity`` (n); for ratings ``global_mean``,
``user_bias`` (m), ``item_bias`` (n), ``noise_sigma``, ``noise_rmse``; for clicks ``scale``.

Users come in blocks generated from their own seeds ``(seed, block)`` (the items' part from
``(seed, 2³¹)``), so memory stays bounded by a block (at most 4,096 users, fewer when
``density · n`` is large) plus the item factors; the store is written aside and renamed
into place (:func:`pipeline.io.owners.written_aside`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr

from pipeline.io.anndata_out import DICT
from pipeline.io.owners import written_aside
from pipeline.sections import SyntheticSpec
from pipeline.sparse_datasets import ARRAY, CsrWriter, anndata_skeleton, draw, write_uns

DEFAULT_RANK = 10
BLOCK_ROWS = 4096  # users per block at most
BLOCK_ENTRIES = 1 << 21  # about this many observations per block at most
GLOBAL_MEAN = 3.5
NOISE_SIGMA = 0.5
BIAS_SD = 0.3  # user and item biases
INTERACTION_SD = 0.5  # of U₀[u]·V₀[i]
STARS = (1.0, 5.0)  # lowest and highest rating, in half stars
ITEM_ZIPF = 1.0  # item popularity ∝ rank^-ITEM_ZIPF
USER_PARETO = 1.5  # tail index of the user activity
CLICK_SHAPE = 0.5  # gamma shape of the clicks' factors (mean 1)
SAMPLE_ROUNDS = 6  # vectorized rounds of successive sampling before the exact fallback
DENSITY_PAIRS = 1 << 20  # pairs of the clicks' density estimate


def rank_of(spec: SyntheticSpec) -> int:
    """The true factors' rank of a ratings or clicks recipe."""
    return spec.rank or DEFAULT_RANK


def rows_per_block(spec: SyntheticSpec) -> int:
    """Users per block: :data:`BLOCK_ROWS`, fewer when a user rates many items."""
    per_user = max(1.0, spec.density * spec.shape[1])
    return int(max(1, min(BLOCK_ROWS, BLOCK_ENTRIES // per_user)))


@dataclass(frozen=True)
class Items:
    """What every block shares: the item side of the model."""

    popularity: np.ndarray  # (n,), sums to 1
    v: np.ndarray  # (n, r) true item factors
    bias: np.ndarray | None  # (n,) ratings: item biases
    scale: float  # ratings: the activity scale k; clicks: the rate scale
    cdf: np.ndarray  # ratings: cumulative popularity; clicks: (r, n) per component
    z: np.ndarray | None  # clicks: Σ_i p_i V₀[i, k]


@dataclass(frozen=True)
class UserBlock:
    """One block of users: its rows of the matrix and of the kept truth."""

    matrix: sp.csr_matrix
    u: np.ndarray  # (rows, r)
    activity: np.ndarray  # (rows,)
    bias: np.ndarray | None  # (rows,) ratings
    squared_error: float  # ratings: Σ (stored − noiseless model)² over the block
    entries: int


def _factor_sd(rank: int) -> float:
    return (INTERACTION_SD**2 / rank) ** 0.25


def _pareto(rng: np.random.Generator, size: int) -> np.ndarray:
    return (1.0 - rng.random(size)) ** (-1.0 / USER_PARETO)


def activity_scale(mean_count: float, n: int) -> float:
    """``k`` with ``E[min(k·a, n)] = mean_count`` for Pareto ``a`` (tail index α, a ≥ 1).

    ``E[min(a, t)] = (α − t^(1−α)) / (α − 1)`` for a cap ``t = n / k > 1``; it grows with
    ``k``, so bisection finds it.
    """
    alpha = USER_PARETO

    def mean(k: float) -> float:
        t = n / k
        return n if t <= 1 else k * (alpha - t ** (1 - alpha)) / (alpha - 1)

    lo, hi = 0.0, float(n)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean(mid) < mean_count else (lo, mid)
    return 0.5 * (lo + hi)


def _click_factors(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.gamma(CLICK_SHAPE, 1.0 / CLICK_SHAPE, shape)


def _click_scale(spec: SyntheticSpec, popularity: np.ndarray, v: np.ndarray) -> float:
    """``scale`` with about ``density`` of the pairs clicked: mean of ``1 − exp(−λ)`` over
    a fixed sample of pairs (virtual users of the same law × uniform items), bisected in
    log space."""
    n, r = v.shape
    rng = np.random.default_rng([spec.seed, 2**31, 1])
    users = 4096
    u = _click_factors(rng, (users, r)) * _pareto(rng, users)[:, None]
    who = rng.integers(0, users, DENSITY_PAIRS)
    what = rng.integers(0, n, DENSITY_PAIRS)
    base = popularity[what] * np.einsum("ij,ij->i", u[who], v[what])
    lo, hi = -60.0, 60.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        share = -np.expm1(-np.exp(mid) * base).mean()
        lo, hi = (mid, hi) if share < spec.density else (lo, mid)
    return float(np.exp(0.5 * (lo + hi)))


def item_side(spec: SyntheticSpec) -> Items:
    """The item factors, biases and popularity, from the recipe's own seed."""
    n = spec.shape[1]
    r = rank_of(spec)
    rng = np.random.default_rng([spec.seed, 2**31])
    popularity = rng.permutation((1.0 + np.arange(n)) ** -ITEM_ZIPF)
    popularity /= popularity.sum()
    if spec.kind == "ratings":
        v = rng.normal(0.0, _factor_sd(r), (n, r))
        bias = rng.normal(0.0, BIAS_SD, n)
        scale = activity_scale(spec.density * n, n)
        return Items(popularity, v, bias, scale, np.cumsum(popularity), None)
    v = _click_factors(rng, (n, r))
    weights = popularity[:, None] * v
    z = weights.sum(axis=0)
    return Items(
        popularity,
        v,
        None,
        _click_scale(spec, popularity, v),
        np.ascontiguousarray(np.cumsum(weights, 0).T),
        z,
    )


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    at = np.minimum(np.searchsorted(sorted_keys, keys), max(sorted_keys.size - 1, 0))
    return sorted_keys[at] == keys if sorted_keys.size else np.zeros(keys.size, dtype=bool)


def sample_without_replacement(
    rng: np.random.Generator, counts: np.ndarray, popularity: np.ndarray, cdf: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row ``u`` gets ``counts[u]`` distinct items by successive sampling ∝ ``popularity``
    (each next item drawn ∝ popularity among those it lacks); ``(rows, cols)``.

    Rounds of draws with replacement, repeats dropped and the first ``counts[u]`` distinct
    kept in draw order, are exactly that; each round draws about
    ``1.25 × missing / (1 − popularity held)`` per row. Rows still short after
    :data:`SAMPLE_ROUNDS` (users holding most of the popular mass) are finished with
    Efraimidis–Spirakis keys ``log(U) / p`` over the items they lack — the same law.
    """
    n = popularity.size
    keys = np.empty(0, dtype=np.int64)  # chosen row·n + item, sorted
    have = np.zeros(counts.size, dtype=np.int64)
    mass = np.zeros(counts.size)
    for _ in range(SAMPLE_ROUNDS):
        need = counts - have
        todo = np.flatnonzero(need > 0)
        if not todo.size:
            break
        draws = np.ceil(1.25 * need[todo] / np.maximum(1.0 - mass[todo], 1e-3)) + 4
        rows = np.repeat(todo, np.minimum(draws, 8 * n).astype(np.int64))
        key = rows * n + draw(rng, cdf, rows.size)
        key = key[~_contains(keys, key)]
        _, first = np.unique(key, return_index=True)  # first time each item came up
        key = key[np.sort(first)]  # in draw order; rows stay grouped
        rows = key // n
        rank = np.arange(key.size) - np.searchsorted(rows, rows, side="left")
        key = key[rank < need[rows]]
        rows, cols = np.divmod(key, n)
        have += np.bincount(rows, minlength=counts.size)
        mass += np.bincount(rows, weights=popularity[cols], minlength=counts.size)
        keys = np.sort(np.concatenate([keys, key]))
    extra = [keys]
    for row in np.flatnonzero(have < counts):
        held = keys[(keys >= row * n) & (keys < (row + 1) * n)] - row * n
        with np.errstate(divide="ignore"):
            order = np.log(rng.random(n)) / popularity
        order[held] = -np.inf
        take = np.argpartition(-order, counts[row] - have[row] - 1)[: counts[row] - have[row]]
        extra.append(row * n + take)
    rows, cols = np.divmod(np.concatenate(extra), n)
    return rows, cols


def rating_block(spec: SyntheticSpec, items: Items, block: int, rows: int) -> UserBlock:
    """Users ``block × rows_per_block(spec) …``: their ratings (or clicks) and truth."""
    n = spec.shape[1]
    r = rank_of(spec)
    rng = np.random.default_rng([spec.seed, block])
    activity = _pareto(rng, rows)
    if spec.kind == "ratings":
        u = rng.normal(0.0, _factor_sd(r), (rows, r))
        bias = rng.normal(0.0, BIAS_SD, rows)
        wanted = np.minimum(items.scale * activity, n)
        counts = np.floor(wanted + rng.random(rows)).astype(np.int64)  # unbiased rounding
        who, what = sample_without_replacement(rng, counts, items.popularity, items.cdf)
        model = GLOBAL_MEAN + bias[who] + items.bias[what]
        model += np.einsum("ij,ij->i", u[who], items.v[what])
        noisy = model + NOISE_SIGMA * rng.standard_normal(who.size)
        stars = np.clip(np.round(2.0 * noisy) / 2.0, *STARS)
        matrix = sp.csr_matrix((stars, (who, what)), shape=(rows, n))
        error = float(np.sum((stars - model) ** 2))
        return UserBlock(matrix, u, activity, bias, error, who.size)
    u = _click_factors(rng, (rows, r))
    per_component = rng.poisson(items.scale * activity[:, None] * u * items.z[None, :])
    who, what = [], []
    for k in range(r):
        clicks = per_component[:, k]
        who.append(np.repeat(np.arange(rows), clicks))
        what.append(draw(rng, items.cdf[k], int(clicks.sum())))
    who_, what_ = np.concatenate(who), np.concatenate(what)
    matrix = sp.csr_matrix((np.ones(who_.size), (who_, what_)), shape=(rows, n))
    matrix.sum_duplicates()  # repeated clicks are the count
    return UserBlock(matrix, u, activity, None, 0.0, matrix.nnz)


def _array(group: Any, name: str, shape: tuple[int, ...], chunk_rows: int) -> Any:
    chunks = (max(1, min(shape[0], chunk_rows)), *shape[1:])
    return group.create_array(name, shape=shape, dtype="float64", chunks=chunks, attributes=ARRAY)


def write_ratings_local(path: str, spec: SyntheticSpec, array: str | None) -> None:
    """Write the recipe as an AnnData store at local ``path`` (the matrix at ``array``,
    default ``X``), into a hidden sibling folder renamed into place."""
    m, n = spec.shape
    r = rank_of(spec)
    step = rows_per_block(spec)
    items = item_side(spec)
    with written_aside(path) as aside:
        root = zarr.open_group(aside, mode="w", zarr_format=3)
        users = [f"user_{i}" for i in range(m)]
        x = anndata_skeleton(root, users, [f"item_{j}" for j in range(n)], array or "X")
        # int32 indices when all m·n entries, or twice the expected ones, fit
        writer = CsrWriter(x, (m, n), spec.dtype, min(m * n, 2 * int(spec.density * m * n)))
        true_u = _array(root["obsm"], "true_U", (m, r), step)
        _array(root["varm"], "true_V", (n, r), n)[...] = items.v
        truth = root["uns"].create_group("synthetic", attributes=DICT)
        activity = _array(truth, "user_activity", (m,), step)
        user_bias = _array(truth, "user_bias", (m,), step) if items.bias is not None else None
        squared, entries = 0.0, 0
        for b, r0 in enumerate(range(0, m, step)):
            block = rating_block(spec, items, b, min(step, m - r0))
            writer.append(block.matrix)
            r1 = r0 + block.matrix.shape[0]
            true_u[r0:r1] = block.u
            activity[r0:r1] = block.activity
            if user_bias is not None:
                user_bias[r0:r1] = block.bias
            squared, entries = squared + block.squared_error, entries + block.entries
        writer.close()
        meta: dict[str, Any] = {
            "kind": spec.kind,
            "rank": r,
            "seed": spec.seed,
            "density": spec.density,
            "item_popularity": items.popularity,
        }
        if spec.kind == "ratings":
            meta |= {
                "global_mean": GLOBAL_MEAN,
                "item_bias": items.bias,
                "noise_sigma": NOISE_SIGMA,
                "noise_rmse": float(np.sqrt(squared / max(entries, 1))),
            }
        else:
            meta["scale"] = items.scale
        write_uns(truth, meta)
