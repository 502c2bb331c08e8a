"""Low-rank factors of one layer's weight, ``W ≈ B A``, and the ranks a parameter budget buys.

Everything here is per layer and in memory (one Dask task per layer calls these functions)
and computes in float64, whatever the checkpoint's dtype.

**Factors.** ``W`` (out × in) is replaced by ``B`` (out × r) times ``A`` (r × in):
``B = U_r Σ_r`` and ``A = V_rᵀ`` from the truncated SVD, which is the best rank-``r``
approximation in the Frobenius norm (Eckart–Young), ``‖W − W_r‖²_F = Σ_{i>r} σᵢ²``.
:func:`factor` computes it exactly (LAPACK ``gesdd``) or by the randomized range finder of
Halko, Martinsson & Tropp (2011, Alg. 4.4): ``Q = orth((WWᵀ)^q W Ω)`` with Ω Gaussian
(``r + RSVD_OVERSAMPLE`` columns, seeded), then the SVD of the small ``QᵀW``. Alg. 4.4
orthonormalises after every product with ``W`` and with ``Wᵀ``; here the basis is
re-orthonormalised (Householder QR) once per application of ``WᵀW`` (``WWᵀ`` for a wide
matrix), on the short side of ``W``, so every QR but the last one is of a short
``min(out, in) × l`` block (for 4096 × 1024 at l = 266 a long QR costs more than a
product). The price: directions below ``√ε·σ₁`` (~1.5e-8·σ₁) are not resolved, far below
any error a compressed layer is allowed.

**Activation-aware** (SVD-LLM, Wang et al. 2024, arXiv:2403.07378). With calibration inputs
``X`` (in × tokens) the layer's output error is ``‖(W − BA)X‖_F = ‖(W − BA)S‖_F`` for any
``S`` with ``SSᵀ = XXᵀ = G`` (the Gram, in × in). Truncating the SVD of ``M = WS`` is then
optimal for that error: ``B = U_r Σ_r``, ``A = V_rᵀ S⁻¹`` (a triangular solve when ``S``
is the Cholesky factor). :class:`Whitening` builds ``S`` from ``G``.

**Errors** are measured, not inferred from the singular values: ``rel_error`` is
``‖W − BA‖_F / ‖W‖_F`` of the factors returned. The direct difference costs one product
of the size of ``W`` (``out·in·r`` multiply-adds); for the randomized solver it is had
from small products instead, ``‖X − BA‖² = ‖X‖² − 2⟨BᵀX, A⟩ + ⟨BᵀB, AAᵀ⟩``, with ``BᵀX``
from the sketch ``QᵀX`` the solver computed anyway (``B = Q·C`` so ``BᵀX = Cᵀ(QᵀX)``).
That expansion loses the digits of ``‖X‖²`` that the residual does not have (see
:data:`DIRECT_BELOW_EPS`); below that the difference is formed directly.

**Ranks.** :func:`spectrum` gives all singular values cheaply (from the eigenvalues of the
smaller Gram matrix); :func:`rank_for_target` turns a per-layer target (``energy`` or
``rel_error``, the semantics of :mod:`pipeline.methods.rank`) into a rank, and
:func:`allocate_budget` spreads a global parameter budget over the layers.

**What the budget optimises.** Layer ``l`` at rank ``r`` keeps the share
``E_l(r) = Σ_{i≤r} σ_{l,i}² / ‖W_l‖²`` of its energy and costs ``r·(out_l + in_l)``
parameters (``out_l·in_l``, all of its energy, when kept dense). :func:`allocate_budget`
maximises ``Σ_l E_l(r_l)`` subject to ``Σ_l cost_l ≤ budget``. The objective is separable,
each layer's gains ``σ_{l,r+1}² / ‖W_l‖²`` decrease with ``r`` (singular values are
sorted), and each step within a layer costs the same ``out_l + in_l``. The steps of one
layer therefore come in order of their gain per parameter, so the problem is a knapsack
whose items (one per rank step) a greedy takes by gain per parameter: it is optimal for
the fractional problem, and the integral one loses at most the gain of the one step that
no longer fitted (Dantzig's bound). Two places are near-optimal only: that last step, and
the switch of a layer at :func:`max_saving_rank` to dense, whose gain (the whole tail)
per parameter may exceed that of the steps before it, so it breaks the decreasing order.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg as sla

from pipeline.errors import InputError

__all__ = [
    "AUTO_RSVD_FRACTION",
    "DIRECT_BELOW_EPS",
    "RSVD_OVERSAMPLE",
    "RSVD_POWER_ITERS",
    "SOLVERS",
    "LowRank",
    "Whitening",
    "allocate_budget",
    "equal_rank_for_budget",
    "factor",
    "max_saving_rank",
    "rank_for_target",
    "spectrum",
]

# Halko, Martinsson & Tropp (2011), §4.2: oversampling p = 5–10 gives a range finder close
# to the optimal error; §4.5: q = 1–4 power iterations for slowly decaying spectra.
RSVD_OVERSAMPLE = 10
RSVD_POWER_ITERS = 4
# solver="auto": the randomized solver when rank ≤ this × min(out, in), else the exact SVD.
# At a quarter the sketch's 2q + 2 = 10 products of width r + 10 cost 0.26–0.45× the exact
# SVD (4096 × 1024 and 1024 × 4096 at rank 256, one thread; at rank 64: 0.08–0.13×); the
# products grow linearly with the rank, so not far above it they would overtake the SVD.
AUTO_RSVD_FRACTION = 0.25
SOLVERS = ("auto", "svd", "rsvd")
# ‖X‖² − 2⟨BᵀX, A⟩ + ⟨BᵀB, AAᵀ⟩ errs by a few round-off units of ‖X‖² (c·ε·‖X‖²; measured
# c ≤ 6 up to 2000 × 500), so it keeps about log10(residual / (c·ε·‖X‖²)) digits of the
# residual. Above 1e6 units (rel_error ≳ 1.5e-5) that is four digits even at c = 100;
# below it the difference X − BA is formed (one more product of the size of W).
DIRECT_BELOW_EPS = 1e6
_EPS = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------- checks


def _matrix(w: Any, name: str) -> np.ndarray:
    """``w`` as a finite, non-empty 2-D float64 array (no copy when it already is one)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise InputError(f"{name} must be a 2-D matrix, got {w.ndim}-D with shape {w.shape}")
    if w.dtype.kind not in "biuf":
        raise InputError(f"{name} must have a real numeric dtype, got {w.dtype}")
    if w.size == 0:
        raise InputError(f"{name} must not be empty, got shape {w.shape}")
    w = np.asarray(w, dtype=np.float64)
    if not np.isfinite(w).all():
        raise InputError(f"{name} must be finite, got NaN or Inf")
    return w


def _int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} must be {bounds}, got {value}")
    return int(value)


# --------------------------------------------------------------------------- ranks


def max_saving_rank(out: int, inp: int) -> int:
    """The largest rank ``r`` whose factors are smaller than the dense matrix,
    ``r·(out + inp) < out·inp`` (0 when no rank saves, e.g. a vector or a 2 × 2 matrix).

    Always below ``min(out, inp)``, since ``out·inp / (out + inp) < min(out, inp)``.
    """
    out, inp = _int(out, "out", 1), _int(inp, "inp", 1)
    return (out * inp - 1) // (out + inp)


def spectrum(w: Any) -> np.ndarray:
    """All ``min(out, in)`` singular values of ``w``, descending (float64).

    From the eigenvalues of the smaller Gram matrix (``WᵀW`` or ``WWᵀ``, ``eigvalsh``), at
    about a tenth of the cost of an SVD. The Gram squares the condition number: each
    ``σᵢ²`` errs by a few ``ε·σ₁²`` (Weyl), so ``σᵢ`` is accurate to about
    ``ε·σ₁² / σᵢ²`` relative — to 1e-8 for ``σᵢ ≳ 1e-4·σ₁`` — and values below
    ``√ε·σ₁`` (~1.5e-8·σ₁) are noise (negative eigenvalues are clipped to 0). Rank rules
    and budgets add up ``σᵢ²`` against ``‖W‖²``, where that noise is of order ``ε``.
    """
    w = _matrix(w, "w")
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # numpy uses SYRK for these
    lam = sla.eigvalsh(gram, overwrite_a=True, check_finite=False, driver="evd")
    return np.sqrt(np.clip(lam[::-1], 0.0, None))


def rank_for_target(
    s: Any,
    total_sumsq: float,
    *,
    energy: float | None = None,
    rel_error: float | None = None,
    max_rank: int | None = None,
) -> tuple[int, bool]:
    """``(k, met)``: the smallest rank ``k ≥ 1`` meeting one target, and whether it is met.

    The semantics of :func:`pipeline.methods.rank.choose_rank`:

    - ``energy = e``: the smallest ``k`` with ``Σ_{i≤k} σᵢ² ≥ e · total_sumsq``;
    - ``rel_error = r``: the smallest ``k`` with ``total_sumsq − Σ_{i≤k} σᵢ² ≤ r² ·
      total_sumsq``, i.e. ``‖W − W_k‖_F ≤ r·‖W‖_F`` (for a whitened layer, give the
      spectrum and ``‖WS‖²`` of ``WS``: the target is then the weighted error).

    Parameters
    ----------
    s : singular values, descending (all of them, or at least ``max_rank``)
    total_sumsq : ``‖W‖²_F`` (the sum of all ``σᵢ²``)
    energy, rel_error : exactly one of them; ``energy`` in (0, 1], ``rel_error`` in [0, 1)
    max_rank : the largest rank allowed (default: ``len(s)``)

    Returns
    -------
    k, met : when no ``k ≤ max_rank`` meets the target, ``(max_rank, False)``
        (``min(max_rank, len(s))``).
    """
    if (energy is None) == (rel_error is None):
        raise InputError("give exactly one of energy, rel_error")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise InputError(f"energy must be in (0, 1], got {energy}")
    if rel_error is not None and not 0.0 <= rel_error < 1.0:
        raise InputError(f"rel_error must be in [0, 1), got {rel_error}")
    s = np.asarray(s, dtype=np.float64).ravel()
    if s.size == 0:
        raise InputError("s must hold at least one singular value")
    cap = s.size if max_rank is None else min(_int(max_rank, "max_rank", 1), s.size)
    cum = np.cumsum(s[:cap] ** 2)
    if energy is not None:
        ok = cum >= energy * total_sumsq
    else:
        ok = total_sumsq - cum <= rel_error**2 * total_sumsq
    if not ok.any():
        return cap, False
    return int(np.argmax(ok)) + 1, True


# --------------------------------------------------------------------------- whitening


@dataclass(frozen=True)
class Whitening:
    """``S`` with ``SSᵀ ≈ G``, the calibration Gram of a layer's inputs (in × in).

    Attributes
    ----------
    s : (in, in) lower-triangular Cholesky factor (``method="cholesky"``), or
        ``Q diag(√λ)`` from the eigendecomposition of ``G`` (``method="eigh"``)
    method : ``"cholesky"`` or ``"eigh"``
    ridge : the regularisation, relative to the mean of ``G``'s diagonal
    """

    s: np.ndarray
    method: str
    ridge: float

    @classmethod
    def from_gram(cls, gram: Any, ridge: float = 1e-6) -> Whitening:
        """Whitening of the Gram ``G = XXᵀ`` (in × in, keyed like the weight it whitens).

        ``S`` is the lower Cholesky factor of ``G + ridge·mean(diag G)·I``. The ridge
        keeps ``S`` invertible where inputs are dead or collinear (SVD-LLM adds such a
        diagonal shift when the Cholesky fails; a relative shift makes it scale-free).
        When the Cholesky fails all the same (a Gram that is not positive semidefinite,
        e.g. accumulated in low precision, or ``ridge=0`` with a singular one) ``S = Q
        diag(√λ)`` from ``eigh(G)``, eigenvalues clipped from below at
        ``ridge·mean(diag G)`` (at ``in·ε·λ_max`` when that is larger, so ``S`` stays
        invertible with ``ridge=0``).

        Raises
        ------
        InputError
            Not square, not finite, a negative ridge, or no positive diagonal (all inputs
            zero: nothing to weight by).
        """
        g = _matrix(gram, "gram")
        n = g.shape[0]
        if g.shape != (n, n):
            raise InputError(f"gram must be square, got shape {g.shape}")
        if not (math.isfinite(ridge) and ridge >= 0):
            raise InputError(f"ridge must be a finite number >= 0, got {ridge}")
        g = (g + g.T) / 2  # a new array: symmetric to the last bit
        scale = float(np.mean(np.diagonal(g)))
        if not scale > 0:
            raise InputError("gram must have a positive mean diagonal (inputs not all zero)")
        shift = ridge * scale
        try:
            shifted = g + shift * np.eye(n)
            s = sla.cholesky(shifted, lower=True, overwrite_a=True, check_finite=False)
            if np.isfinite(s).all():
                return cls(s=s, method="cholesky", ridge=float(ridge))
        except np.linalg.LinAlgError:
            pass
        lam, q = sla.eigh(g, overwrite_a=True, check_finite=False, driver="evd")
        floor = max(shift, n * _EPS * float(lam[-1]))
        return cls(s=q * np.sqrt(np.maximum(lam, floor)), method="eigh", ridge=float(ridge))

    def apply(self, w: np.ndarray) -> np.ndarray:
        """``W S`` (out × in): the matrix whose truncated SVD is the whitened factorization
        (give it to :func:`spectrum` to choose the rank of a whitened layer)."""
        return np.asarray(w, dtype=np.float64) @ self.s

    def solve(self, x: np.ndarray) -> np.ndarray:
        """``X S⁻¹`` for ``X`` (k × in), C-contiguous.

        Cholesky: the triangular solve ``Sᵀ Yᵀ = Xᵀ``. Eigh: ``S = Q diag(√λ)`` gives
        ``S⁻¹ = diag(1/λ) Sᵀ``, with ``λ`` the squared column norms of ``S``.
        """
        if self.method == "cholesky":
            y = sla.solve_triangular(self.s, x.T, lower=True, trans="T", check_finite=False)
            return np.ascontiguousarray(y.T)
        lam = np.einsum("ij,ij->j", self.s, self.s)
        return (x / lam) @ self.s.T


# --------------------------------------------------------------------------- factors


@dataclass(frozen=True)
class LowRank:
    """``W ≈ B A`` for one layer.

    Attributes
    ----------
    b : (out, rank) float64, ``U_r Σ_r``
    a : (rank, in) float64, ``V_rᵀ`` (``V_rᵀ S⁻¹`` when whitened)
    rank : r
    rel_error : ``‖W − BA‖_F / ‖W‖_F`` of these factors (0 for a zero ``W``)
    energy_retained : ``Σ_{i≤r} σᵢ² / ‖M‖²_F`` of the matrix factored, ``M = W`` or
        ``W S`` when whitened (1 for a zero ``M``)
    weighted_rel_error : ``‖(W − BA)S‖_F / ‖WS‖_F`` when whitened, else ``None``
    solver : ``"svd"`` or ``"rsvd"``, the one that ran
    singular_values : of ``M``: all of them (``"svd"``), or the sketch's ``r + oversample``
        Ritz values (``"rsvd"``, each at most the true ``σᵢ``)
    """

    b: np.ndarray
    a: np.ndarray
    rank: int
    rel_error: float
    energy_retained: float
    weighted_rel_error: float | None
    solver: str
    singular_values: np.ndarray

    @property
    def params(self) -> int:
        """Parameters of the two factors, ``rank·(out + in)``."""
        return self.rank * (self.b.shape[0] + self.a.shape[1])


def _orth(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the columns of ``y`` (Householder QR; ``y`` is overwritten).
    Householder keeps ``Q`` orthonormal when ``y`` is rank-deficient (a matrix of lower
    rank than the sketch), where Cholesky QR would break down."""
    return sla.qr(y, mode="economic", overwrite_a=True, check_finite=False)[0]


def _thin_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, σ, Vᵀ`` of ``x`` (LAPACK gesdd, thin), always run on the tall orientation: a
    wide C-ordered ``x`` is handed over as ``xᵀ``, which LAPACK reads without a copy, and
    gesdd's tall path (QR first) measured faster than its wide one (LQ first): ~1.5× for
    4096 × 1024 either way round, ~2× for a 266 × 1024 sketch (one thread)."""
    if x.shape[0] >= x.shape[1]:
        return sla.svd(x, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    u, s, vt = sla.svd(x.T, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    return vt.T, s, u.T


def _range_basis(m: np.ndarray, width: int, power_iters: int, seed: Any) -> np.ndarray:
    """``Q = orth((MMᵀ)^q M Ω)`` (out × width), Ω Gaussian drawn from ``seed``.

    The QR after each application of ``MᵀM`` (tall) or ``MMᵀ`` (wide) is on the short
    side; a tall matrix needs one long QR at the end.
    """
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((m.shape[1], width))
    if m.shape[0] >= m.shape[1]:
        z = omega
        for _ in range(power_iters):
            z = _orth(m.T @ (m @ z))
        return _orth(m @ z)
    q = _orth(m @ omega)
    for _ in range(power_iters):
        q = _orth(m @ (m.T @ q))
    return q


def _residual_sumsq(
    x: np.ndarray, x_sumsq: float, b: np.ndarray, a: np.ndarray, btx: np.ndarray | None
) -> float:
    """``‖X − BA‖²_F``: from ``BᵀX`` by the expansion of the module docstring when it is
    given and the result is above :data:`DIRECT_BELOW_EPS` round-off units of ``‖X‖²``,
    else from the difference itself."""
    if btx is not None:
        expanded = x_sumsq - 2.0 * float(np.vdot(btx, a)) + float(np.vdot(b.T @ b, a @ a.T))
        if expanded >= DIRECT_BELOW_EPS * _EPS * x_sumsq:
            return expanded
    diff = b @ a
    np.subtract(x, diff, out=diff)
    return float(np.vdot(diff, diff))


def residual_sumsq(x: np.ndarray, b: np.ndarray, a: np.ndarray, x_sumsq: float) -> float:
    """``‖X − BA‖²_F`` for any factors (e.g. rounded to the dtype they are stored in),
    holding no ``X``-sized temporary where the expansion keeps its digits (one more
    ``BᵀX``, ``r × n``); ``x_sumsq`` is ``‖X‖²_F``."""
    return _residual_sumsq(x, x_sumsq, b, a, b.T @ x)


def _ratio(num_sumsq: float, den_sumsq: float, empty: float) -> float:
    return math.sqrt(max(num_sumsq, 0.0) / den_sumsq) if den_sumsq > 0 else empty


def factor(
    w: Any,
    rank: int,
    *,
    solver: str = "auto",
    seed: Any = 0,
    power_iters: int = RSVD_POWER_ITERS,
    whiten: Whitening | None = None,
) -> LowRank:
    """Rank-``rank`` factors ``W ≈ B A`` from the truncated SVD of ``W`` (of ``W S`` when
    whitened).

    Parameters
    ----------
    w : (out, in) weight, any real dtype (computed in float64)
    rank : 1 ≤ rank ≤ min(out, in)
    solver : ``"svd"`` (exact, LAPACK gesdd), ``"rsvd"`` (randomized, see the module
        docstring) or ``"auto"``: ``"rsvd"`` when ``rank ≤ AUTO_RSVD_FRACTION·min(out,
        in)``, else ``"svd"``
    seed : seed of the Gaussian test matrix (anything ``numpy.random.default_rng`` takes)
    power_iters : power iterations of the randomized solver (``q``)
    whiten : factor ``W S`` and return ``A = V_rᵀ S⁻¹`` (activation-aware)

    Returns
    -------
    LowRank
        C-contiguous float64 factors and their measured errors.
    """
    w = _matrix(w, "w")
    out, inp = w.shape
    rank = _int(rank, "rank", 1, min(out, inp))
    if solver not in SOLVERS:
        raise InputError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    power_iters = _int(power_iters, "power_iters", 0)
    if whiten is not None and whiten.s.shape != (inp, inp):
        raise InputError(
            f"whiten must match the weight's {inp} inputs, got S of shape {whiten.s.shape}"
        )
    if solver == "auto":
        solver = "rsvd" if rank <= AUTO_RSVD_FRACTION * min(out, inp) else "svd"

    m = w if whiten is None else whiten.apply(w)
    m_sumsq = float(np.vdot(m, m))
    if solver == "svd":
        u, s, vt = _thin_svd(m)
        b = u[:, :rank] * s[:rank]
        btm = None  # BᵀM would cost what the difference costs: measure that
    else:
        width = min(rank + RSVD_OVERSAMPLE, min(out, inp))
        q = _range_basis(m, width, power_iters, seed)
        sketch = q.T @ m  # width × in
        ub, s, vt = _thin_svd(sketch)
        core = ub[:, :rank] * s[:rank]
        b = q @ core
        btm = core.T @ sketch  # BᵀM = (Q·core)ᵀM = coreᵀ(QᵀM)
    v_r = np.ascontiguousarray(vt[:rank])
    kept = float(np.sum(s[:rank] ** 2))
    energy = min(kept / m_sumsq, 1.0) if m_sumsq > 0 else 1.0

    if whiten is None:
        a = v_r
        rel = _ratio(_residual_sumsq(w, m_sumsq, b, a, btm), m_sumsq, 0.0)
        weighted = None
    else:
        a = whiten.solve(v_r)
        weighted_sumsq = _residual_sumsq(m, m_sumsq, b, a @ whiten.s, btm)
        weighted = _ratio(weighted_sumsq, m_sumsq, 0.0)
        w_sumsq = float(np.vdot(w, w))
        rel = _ratio(_residual_sumsq(w, w_sumsq, b, a, None), w_sumsq, 0.0)
    return LowRank(
        b=np.ascontiguousarray(b),
        a=np.ascontiguousarray(a),
        rank=rank,
        rel_error=rel,
        energy_retained=energy,
        weighted_rel_error=weighted,
        solver=solver,
        singular_values=np.asarray(s, dtype=np.float64),
    )


# --------------------------------------------------------------------------- budget


def _cost(rank: int, shape: tuple[int, int]) -> int:
    """Parameters of a layer at ``rank`` (0: dense)."""
    out, inp = shape
    return out * inp if rank == 0 else rank * (out + inp)


def _check_shapes(shapes: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    checked = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise InputError(f"shapes: {name} must be (out, in), got {tuple(shape)}")
        checked[name] = (_int(shape[0], f"shapes[{name}]", 1), _int(shape[1], f"shapes[{name}]", 1))
    return checked


def _start_rank(shape: tuple[int, int]) -> int:
    """Rank 1, or dense (0) for a layer no rank makes smaller."""
    return 1 if max_saving_rank(*shape) > 0 else 0


def _minimum_budget(shapes: Mapping[str, tuple[int, int]]) -> int:
    return sum(_cost(_start_rank(shape), shape) for shape in shapes.values())


def _refuse_below_minimum(budget: int, shapes: Mapping[str, tuple[int, int]]) -> None:
    minimum = _minimum_budget(shapes)
    if minimum > budget:
        raise InputError(
            f"budget: {budget} parameters cannot hold {len(shapes)} layers, which need at "
            f"least {minimum} (rank 1 each)"
        )


def allocate_budget(
    spectra: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]], budget: int
) -> dict[str, int]:
    """Ranks that keep the most normalised energy within a parameter budget.

    Maximises ``Σ_l Σ_{i≤r_l} σ_{l,i}² / ‖W_l‖²`` subject to ``Σ_l cost_l ≤ budget``,
    ``cost = r·(out + in)`` for ``r ≥ 1`` and ``out·in`` dense (rank 0); see the module
    docstring for why the greedy suits it and where it is only near-optimal.

    Every layer starts at rank 1 (dense when no rank saves parameters, see
    :func:`max_saving_rank`). A heap holds each layer's next step: one more rank (gain
    ``σ_{r+1}² / ‖W‖²``, cost ``out + in``), or, at ``max_saving_rank``, the switch to dense
    (gain: the tail's share, cost ``out·in − r·(out + in)``). The step of best gain per
    parameter is taken when it fits; when it does not, that layer stops (its later steps
    cost no less). Steps without gain are never taken, so the budget may be left unspent.

    Parameters
    ----------
    spectra : name → all singular values of the layer (descending, e.g. :func:`spectrum`;
        their squares must add up to ``‖W‖²``, the normaliser)
    shapes : name → (out, in), the same names
    budget : parameters for all the layers together

    Returns
    -------
    dict
        name → rank (0 = keep dense), in the order of ``shapes``.

    Raises
    ------
    InputError (a ValueError)
        Names that differ, or a budget below rank 1 everywhere (the message says the
        minimum).
    """
    shapes = _check_shapes(shapes)
    if set(spectra) != set(shapes):
        raise InputError("spectra and shapes must name the same layers")
    budget = _int(budget, "budget", 0)
    _refuse_below_minimum(budget, shapes)

    names = list(shapes)
    ranks = [_start_rank(shapes[name]) for name in names]
    caps = [max_saving_rank(*shapes[name]) for name in names]
    left = budget - _minimum_budget(shapes)
    shares, tails = [], []  # per layer: σᵢ² / ‖W‖², and Σ_{i≥k} of them for every k
    for name in names:
        s2 = np.asarray(spectra[name], dtype=np.float64).ravel() ** 2
        total = float(np.sum(s2))
        share = s2 / total if total > 0 else np.zeros_like(s2)
        shares.append(share.tolist())
        tails.append(np.cumsum(share[::-1])[::-1].tolist())

    def next_step(j: int) -> tuple[float, int, int] | None:
        """Layer ``j``'s next step as ``(gain / cost, cost, new rank)``, or ``None``."""
        r, (out, inp) = ranks[j], shapes[names[j]]
        if r == 0 or r >= len(shares[j]):  # dense, or a spectrum shorter than the cap
            return None
        if r < caps[j]:
            gain, cost, new = shares[j][r], out + inp, r + 1
        else:  # r == cap: the switch to dense buys the whole tail
            gain, cost, new = tails[j][r], out * inp - r * (out + inp), 0
        return (gain / cost, cost, new) if gain > 0 else None

    heap = []  # (−gain/cost, layer, cost, new rank): each layer's next step, at most one
    for j in range(len(names)):
        step = next_step(j)
        if step is not None:
            heap.append((-step[0], j, step[1], step[2]))
    heapq.heapify(heap)
    while heap:
        _, j, cost, new = heapq.heappop(heap)
        # Take layer j's steps while each is the best of all (ahead of the heap's top):
        # the same order as popping them one by one, with fewer heap operations.
        while cost <= left:
            left -= cost
            ranks[j] = new
            step = next_step(j)
            if step is None:
                break
            key = (-step[0], j)
            cost, new = step[1], step[2]
            if heap and key > heap[0][:2]:
                heapq.heappush(heap, (*key, cost, new))
                break
        # A step that does not fit stops its layer: its later rank steps cost as much (a
        # switch to dense may cost less, but lies behind them).
    return dict(zip(names, ranks, strict=True))


def equal_rank_for_budget(shapes: Mapping[str, tuple[int, int]], budget: int) -> int:
    """The largest rank ``r`` such that every layer at ``min(r, max_saving_rank)`` (dense
    where no rank saves) fits the budget together — the uniform baseline that
    :func:`allocate_budget` is compared with.

    Raises
    ------
    InputError (a ValueError)
        A budget below rank 1 everywhere.
    """
    shapes = _check_shapes(shapes)
    budget = _int(budget, "budget", 0)
    _refuse_below_minimum(budget, shapes)

    def total(r: int) -> int:
        return sum(
            _cost(min(r, max_saving_rank(*shape)) if _start_rank(shape) else 0, shape)
            for shape in shapes.values()
        )

    low, high = 1, max((max_saving_rank(*shape) for shape in shapes.values()), default=1)
    high = max(high, 1)
    while low < high:  # total(r) is non-decreasing: the largest r with total(r) ≤ budget
        mid = (low + high + 1) // 2
        if total(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low
