"""Matrix completion by alternating least squares (ALS) over scipy CSR row blocks.

The stored entries of the ratings matrix ``a`` (users × items) are the observations — a
stored 0 is an observed 0, a missing entry is unknown. (A dask array of dense blocks is
accepted too, for tests: there every non-zero entry counts as observed; duplicate entries
of a non-canonical CSR block are summed.) ALS fits
``r_ui ≈ x_u · y_i`` (explicit ratings, optionally ``+ μ + b_u + c_i``) or the
Hu–Koren–Volinsky preference model (implicit feedback) by alternately solving every user's
ridge regression with the item factors fixed, then every item's with the user factors
fixed.

Layouts and passes
------------------
The first pass reads each row block of ``a`` once: it refuses NaN/Inf (and negative values
for implicit feedback), splits off the hold-out — entry ``(u, i)`` goes to validation when
``splitmix64(u·n + i ⊕ seed) < fraction·2⁶⁴``, a pure function of the entry, whatever the
blocking — and counts each item's training ratings. The items are then cut into item
blocks of about equal work (ratings + rank per item; as many as ``a`` has row blocks unless
``item_blocks`` says) and the **item layout** (CSR of the transpose, one block per item
range, users as columns) is built on the cluster from the row blocks: each row block is cut
by item ranges and each item block stacks its pieces (one shuffle). With ``keep`` both
layouts stay in worker memory, and for explicit ratings the hold-out in both (the item step
measures the validation errors every iteration; an implicit hold-out is for
:func:`ranking_metrics` after the run). Without ``keep`` nothing is kept between
half-steps and each half-step reads ``a`` again (the item half-step then shuffles again —
its pieces are held only during that half-step).

One iteration is one graph, one pass over the ratings per half-step and one round trip:
the item factor blocks are concatenated once on the cluster (one task) and go to every
user-step task with their Gram; the new user blocks are concatenated likewise for the item
step; the client receives only a few sums per block (objective pieces, errors). Factor
blocks stay on the cluster between iterations (persisted), so the graph does not grow.
``U``'s blocks are the row blocks of ``a``; ``V``'s are the item blocks.

Explicit ratings (weighted-λ)
-----------------------------
Per user, ``(V_Iᵀ V_I + λ·n_u·I) x_u = V_Iᵀ r_u`` with ``n_u`` the user's number of
training ratings (Zhou et al. 2008, Spark MLlib's default): λ is scaled by the count, so a
single ``reg`` suits users with 3 and with 3,000 ratings. With ``biases`` the global mean
``μ`` of the training ratings is subtracted and the biases ride along as one more factor
coordinate: a user solves for ``[x_u, b_u]`` against rows ``[y_i, 1]`` and targets
``r − μ − c_i``, an item for ``[y_i, c_i]`` against ``[x_u, 1]`` and ``r − μ − b_u``; the
bias is regularized with the same weighted λ as the factors. The objective is

    f = Σ_obs (r − pred)² + λ Σ_u n_u ‖x̃_u‖² + λ Σ_i n_i ‖ỹ_i‖²     (x̃, ỹ with the bias)

and each half-step with ``solver="cholesky"`` is its exact minimizer over one side, so
``f`` never increases.

Implicit feedback (Hu, Koren & Volinsky 2008)
---------------------------------------------
Every stored entry is a preference ``p = 1`` with confidence ``c = 1 + α r`` (a stored 0 is
a preference of confidence 1); every missing pair is ``p = 0`` with ``c = 1``. Per user,
``(VᵀV + V_Iᵀ (C_u − I) V_I + λ I) x_u = V_Iᵀ C_u p_u`` with ``VᵀV`` computed once per
half-step. λ is **not** scaled by the count here, as in the HKV paper and the ``implicit``
library: the confidence weights already carry the counts, and the same ``reg`` then means
the same model in all three (compare ``implicit`` fed ``1 + α r`` with its ``alpha=1``:
that library's confidence is ``alpha·r`` itself). The objective, without the dense m × n,

    f = Σ_all c (p − x·y)² + λ (‖U‖² + ‖V‖²)
      = tr(UᵀU VᵀV) + Σ_obs [c (1 − s)² − s²] + λ (‖U‖² + ‖V‖²),   s = x_u·y_i.

Solvers
-------
Rows are never solved in a Python loop: the rows of a block are grouped by their number of
ratings, padded to a geometric ladder of lengths (ratio 2^¼: ≤ 19 % padding; the padding
gathers a zero factor row), and each group is processed in sub-batches of at most
``batch_bytes`` of gathered factors, as stacked ``(b, L, k)`` arrays (a row longer than
that is a sub-batch of its own: a task holds at most its largest row's ratings × k × 8
bytes of them).

* ``cholesky`` — the exact solution: stacked Grams (``np.matmul`` of a block with itself,
  BLAS ``syrk``) and a stacked LAPACK solve of the SPD systems (``np.linalg.solve``; numpy
  has no stacked triangular solve, and the stacked LU measured faster than a stacked
  Cholesky followed by two stacked triangular solves).
* ``cg`` — ``cg_steps`` conjugate-gradient steps per row, warm-started from the previous
  factors, as ``implicit`` does (Takács, Pilászy & Tikk 2011), never forming a Gram:
  ``A p = Ygᵀ (w ∘ (Yg p)) + …``, two stacked matrix–vector products per step. A row stops
  once its squared residual is below ``1e-20`` (``implicit``'s rule). Each step decreases
  the row's quadratic, so the objective still never increases. ``cg_dtype="float32"``
  runs this arithmetic (gathered factors, search directions) in float32 as ``implicit``
  does, ~1.4–1.7× faster at rank 64; factors, Grams and the objective stay float64.
* ``auto`` — ``cg`` from rank 16 on, ``cholesky`` below. Measured on a 50,000 × 10,000
  matrix with 1.94 M popularity-skewed ratings, one core, user / item half-step, implicit:
  rank 8 cholesky 0.18 / 0.11 s, cg 0.15 / 0.11 s; rank 16 0.33 / 0.21 s vs 0.18 / 0.15 s;
  rank 64 2.95 / 1.16 s vs 0.57 / 0.52 s (float32 cg 0.35 / 0.31 s) — a stacked 64 × 64
  LAPACK solve alone costs ~30 µs a row.

Rows without a training rating get factor 0 (and bias 0): their prediction is ``μ`` with
biases, else 0; they are counted (``empty_users``/``empty_items``).

Initialization, determinism, stopping
-------------------------------------
Factors are float64 (float32 input is cast per block). Initial factors are drawn per
fixed chunk of 4,096 rows from ``numpy.random.default_rng([seed, side, chunk])``, so they do
not depend on the blocking: N(0, 1/k) entries for explicit ratings (Spark-like unit-norm
rows), ``U(0, 1)·0.01`` for implicit feedback (as ``implicit``); biases start at 0. Every
reduction has a fixed order (per-row kernels, sums on the client in block order), so a run
is bit for bit reproducible whatever the scheduling, and a resumed run equals the
uninterrupted one. (Each row's factors do not even depend on the blocking; the objective's
sums do, in the last bits.) After iteration ``t`` the run has converged when
``(f_{t−1} − f_t) / f_{t−1} < tol``.
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from pipeline.cost import Cost
from pipeline.errors import InputError
from pipeline.linalg._graph import fetch, persist, stack_blocks
from pipeline.linalg._validation import (
    as_matrix,
    check_bool,
    check_choice,
    check_int,
    check_number,
)
from pipeline.linalg.tsqr import row_blocks

log = logging.getLogger(__name__)

SOLVERS = ("auto", "cholesky", "cg")
CG_DTYPES = ("float64", "float32")
AUTO_CG_RANK = 16  # auto: cg from this rank on (see the module docstring)
CG_EPS = 1e-20  # a row's CG stops below this squared residual (implicit's threshold)
BATCH_BYTES = 4 << 20  # gathered factors per sub-batch (2–4 MiB: fastest of 1–16 MiB measured)
SCORE_BYTES = 64 << 20  # top_n: the score buffer of one task
SCORE_ROWS = 4096  # top_n: users scored at once
INIT_CHUNK = 4096  # rows per initial-factor draw (independent of the blocking)
ENTRY_CHUNK = 1 << 13  # hold-out entries evaluated at once
LADDER = 4  # pad lengths: 2^(j/LADDER) above SHORT_ROW
SHORT_ROW = 8  # rows up to this many ratings are grouped by their exact length
BLOCK_BUFFERS = 3  # block-sized arrays of a task: the block, its split or pieces, a layout

# Task-name prefixes of the half-steps (tests kill a worker while one runs).
USER_STEP = "als-user-step"
ITEM_STEP = "als-item-step"

# The per-block sums a half-step returns (a float64 vector, summed on the client).
DATA, OWN_REG, OTHER_REG, SSE, SAE, VAL_SSE, VAL_SAE, VAL_N = range(8)
N_STATS = 8

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)


def als_cost(
    shape: tuple[int, int], *, rank: int, iterations: int, final_pass: bool = False
) -> Cost:
    """What :func:`als` costs: one pass to split the ratings and build the item layout,
    one per half-iteration, and with ``final_pass`` one more (scores for top-N lists or
    ranking metrics). An upper bound: it stops at ``tol``. Both layouts are kept when they
    fit; the tall state per row block is ``U`` with its bias column."""
    return Cost(
        passes=1 + 2 * iterations + int(final_pass),
        exact=False,
        columns=shape[1],
        min_rows=1,
        buffers=BLOCK_BUFFERS,
        keeps=True,
        state_columns=rank + 1,
        layouts=2,  # the ratings by users and by items
    )


@dataclass
class ALSState:
    """Where an ALS run stands: enough to continue it bit for bit.

    Attributes
    ----------
    u : the user-factor blocks, one per row block of ``a`` (numpy arrays or persisted
        ``Delayed``), each ``rows × k'`` with ``k' = rank`` (+1: the bias column last)
    v : the item-factor blocks, one per item block, ``items × k'`` likewise
    iteration : completed iterations
    history : one dict per iteration (see :class:`ALSResult`)
    converged : whether ``tol`` was met
    row_chunks : the rows of ``u``'s blocks (``a``'s row chunks)
    item_chunks : the items of ``v``'s blocks (``None``: read from numpy blocks' shapes)
    """

    u: list[Any]
    v: list[Any]
    iteration: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool = False
    row_chunks: tuple[int, ...] | None = None
    item_chunks: tuple[int, ...] | None = None


@dataclass
class ALSResult:
    """The factors (lazy, over persisted blocks) and what the run measured.

    ``history`` holds per iteration ``objective`` (after the item step),
    ``objective_user_step`` (after the user step: the sequence of both never increases),
    ``seconds``, ``train_rmse`` and ``train_mae`` — for explicit ratings over the training
    ratings, for implicit feedback the error of the preference ``1 − x·y`` over the
    training entries — and with a hold-out (explicit) ``validation_rmse`` and
    ``validation_mae``. ``residual_rel`` is ``‖r − pred‖ / ‖r‖`` over the training ratings
    (explicit only), ``fro_norm`` the ``‖r‖`` of all the stored ratings. ``train`` and
    ``validation`` are the split ratings as CSR row blocks in ``a``'s row chunks (kept in
    memory with ``keep``, else read from ``a`` again), ``solver`` the one ``auto`` chose.
    """

    u: da.Array
    v: da.Array
    user_bias: da.Array | None
    item_bias: da.Array | None
    global_mean: float | None
    iterations: int
    converged: bool
    history: list[dict[str, float]]
    empty_users: int
    empty_items: int
    nnz_train: int
    nnz_validation: int
    train: da.Array
    validation: da.Array | None
    solver: str = "cholesky"
    residual_rel: float | None = None
    fro_norm: float = 0.0


@dataclass(frozen=True)
class _Options:
    """What a half-step kernel needs besides its blocks."""

    rank: int
    biases: bool
    reg: float
    alpha: float | None
    solver: str
    cg_steps: int
    batch_bytes: int
    cg_dtype: str = "float64"

    @property
    def width(self) -> int:
        return self.rank + int(self.biases)


@dataclass
class _Side:
    """One side's factors as the other side's half-step uses them.

    ``design`` has a zero row appended (index ``n``: where padded entries point);
    ``offset`` (biases) is ``μ + bias`` per row, ``sqnorm`` the squared norm of each
    row's regularized vector (factors and bias), ``gram`` (implicit) ``YᵀY``.
    """

    design: np.ndarray
    offset: np.ndarray | None
    sqnorm: np.ndarray
    gram: np.ndarray | None

    @property
    def pad(self) -> int:
        return self.design.shape[0] - 1


# --------------------------------------------------------------------------- first pass


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele, Lea & Flood's SplitMix64 finalizer on uint64 (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def held_out(rows: np.ndarray, cols: np.ndarray, n: int, fraction: float, seed: int) -> np.ndarray:
    """Whether entries ``(rows, cols)`` of an ``· × n`` matrix belong to the hold-out.

    A pure function of ``(row, column, n, seed)``: ``splitmix64((row·n + col) ⊕
    splitmix64(seed)) < fraction·2⁶⁴`` — the same entries whatever the blocking.
    """
    if fraction <= 0:
        return np.zeros(len(rows), dtype=bool)
    key = rows.astype(_U64) * _U64(n) + cols.astype(_U64)
    salt = _splitmix64(np.array([seed], dtype=_U64))[0]
    threshold = _U64(min(int(fraction * 2.0**64), 2**64 - 1))
    return _splitmix64(key ^ salt) < threshold


def _as_csr(block: Any) -> sp.csr_matrix:
    """A block as a canonical float64 ``csr_matrix`` (stored zeros kept; duplicates summed;
    a dense block's non-zeros are its observations)."""
    if not sp.issparse(block):
        return sp.csr_matrix(np.asarray(block, dtype=np.float64))
    csr = sp.csr_matrix(block, dtype=np.float64)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return csr


def _first_bad(csr: sp.csr_matrix, bad: np.ndarray) -> tuple[int, int]:
    """(local row, column) of the first entry flagged in ``bad``."""
    pos = int(np.argmax(bad))
    return int(np.searchsorted(csr.indptr, pos, side="right") - 1), int(csr.indices[pos])


def _check_values(csr: sp.csr_matrix, row0: int, implicit: bool) -> None:
    """Refuse NaN/Inf ratings, and negative values for implicit feedback."""
    finite = np.isfinite(csr.data)
    if not finite.all():
        r, c = _first_bad(csr, ~finite)
        value = csr.data[np.argmax(~finite)]
        what = "a NaN" if np.isnan(value) else "an infinite"
        raise InputError(
            f"a holds {what} rating at row {row0 + r}, column {c}; "
            "every stored entry must be a finite rating"
        )
    if implicit and csr.nnz and csr.data.min() < 0:
        neg = csr.data < 0
        r, c = _first_bad(csr, neg)
        raise InputError(
            f"a holds a negative value ({csr.data[np.argmax(neg)]:g}) at row {row0 + r}, "
            f"column {c}; implicit feedback (alpha) needs counts or confidences ≥ 0"
        )


def _select_entries(csr: sp.csr_matrix, keep: np.ndarray, local_rows: np.ndarray) -> sp.csr_matrix:
    counts = np.bincount(local_rows[keep], minlength=csr.shape[0])
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(csr.indptr.dtype)
    return sp.csr_matrix((csr.data[keep], csr.indices[keep], indptr), shape=csr.shape, copy=False)


def split_block(
    block: Any, row0: int, n: int, fraction: float, seed: int, implicit: bool
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """One row block as ``(train, validation)`` CSR blocks, values checked (see
    :func:`held_out`)."""
    csr = _as_csr(block)
    _check_values(csr, row0, implicit)
    if fraction <= 0:
        return csr, sp.csr_matrix(csr.shape, dtype=np.float64)
    local = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    held = held_out(local + row0, csr.indices, n, fraction, seed)
    return _select_entries(csr, ~held, local), _select_entries(csr, held, local)


def _split_stats(train: sp.csr_matrix, validation: sp.csr_matrix) -> dict[str, Any]:
    data = train.data
    return {
        "nnz_train": int(train.nnz),
        "nnz_validation": int(validation.nnz),
        "sum": float(data.sum()),
        "sumsq": float(data @ data),
        "sumsq_validation": float(validation.data @ validation.data),
        "empty_rows": int(np.count_nonzero(np.diff(train.indptr) == 0)),
        "columns": np.bincount(train.indices, minlength=train.shape[1]).astype(np.int64),
    }


def _item_chunks(counts: np.ndarray, blocks: int, rank: int) -> tuple[int, ...]:
    """Cut the items into ``blocks`` ranges of about equal work (ratings + rank each)."""
    n = len(counts)
    blocks = max(1, min(blocks, n))
    work = np.cumsum(counts + rank, dtype=np.float64)
    cuts = np.searchsorted(work, work[-1] * np.arange(1, blocks) / blocks, side="left") + 1
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, n - 1) if n > 1 else [], [n]]))
    return tuple(int(c) for c in np.diff(bounds.astype(np.int64)))


def column_pieces(csr: sp.csr_matrix, bounds: Sequence[int]) -> tuple[sp.csr_matrix, ...]:
    """A row block cut by item ranges ``bounds``, each piece transposed: CSR ``items ×
    rows`` (local row indices)."""
    csc = csr.tocsc()
    csc.sort_indices()
    pieces = []
    for lo, hi in itertools.pairwise(bounds):
        ptr = csc.indptr[lo : hi + 1]
        s, e = int(ptr[0]), int(ptr[-1])
        pieces.append(
            sp.csr_matrix(
                (csc.data[s:e].copy(), csc.indices[s:e].copy(), ptr - ptr[0]),
                shape=(hi - lo, csr.shape[0]),
            )
        )
    return tuple(pieces)


def stack_pieces(offsets: Sequence[int], m: int, *pieces: sp.csr_matrix) -> sp.csr_matrix:
    """One item block (CSR ``items × m``) from its pieces of consecutive row blocks, whose
    first rows are ``offsets`` (indices stay sorted: the pieces come in row order)."""
    counts = sum(np.diff(p.indptr) for p in pieces)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.empty(int(indptr[-1]), dtype=np.int64)
    data = np.empty(int(indptr[-1]), dtype=np.float64)
    cursor = indptr[:-1].copy()
    for off, p in zip(offsets, pieces, strict=True):
        c = np.diff(p.indptr)
        dest = np.repeat(cursor - p.indptr[:-1], c) + np.arange(p.nnz)
        indices[dest] = p.indices + off
        data[dest] = p.data
        cursor += c
    out = sp.csr_matrix((data, indices, indptr), shape=(len(counts), m))
    out.has_sorted_indices = True
    return out


# --------------------------------------------------------------------------- kernels


def _owned(x: Any) -> Any:
    """``x`` as an aligned, C-contiguous numpy array. Arrays a task receives from another
    worker may be neither (``distributed`` deserializes them in place, at any offset of a
    message buffer), and numpy's gathers and stacked products on unaligned data run several
    times slower (measured: a half-step given a transferred side took 0.77 s, 0.56 s after
    this copy)."""
    if x is None:
        return None
    x = np.asarray(x)
    return x if x.flags.aligned and x.flags.c_contiguous else np.array(x, order="C")


def _owned_csr(csr: Any) -> sp.csr_matrix:
    parts = (csr.data, csr.indices, csr.indptr)
    if all(p.flags.aligned and p.flags.c_contiguous for p in parts):
        return csr
    out = sp.csr_matrix(tuple(_owned(p) for p in parts), shape=csr.shape)
    out.has_sorted_indices = csr.has_sorted_indices
    return out


def _owned_side(side: _Side) -> _Side:
    return _Side(*(_owned(getattr(side, f)) for f in ("design", "offset", "sqnorm", "gram")))


def _pad_lengths(counts: np.ndarray) -> np.ndarray:
    """Padded row lengths: exact up to ``SHORT_ROW``, then the ladder 2^(j/LADDER)."""
    lengths = counts.astype(np.int64).copy()
    long = counts > SHORT_ROW
    if long.any():
        steps = np.ceil(LADDER * np.log2(counts[long]) - 1e-9)
        ladder = np.ceil(2.0 ** (steps / LADDER)).astype(np.int64)
        lengths[long] = np.maximum(ladder, counts[long])
    return lengths


def _row_batches(counts: np.ndarray, width: int, batch_bytes: int) -> list[tuple[int, np.ndarray]]:
    """``(padded length, rows)`` sub-batches of the non-empty rows, in a fixed order."""
    rows = np.flatnonzero(counts)
    if not rows.size:
        return []
    lengths = _pad_lengths(counts[rows])
    order = np.argsort(lengths, kind="stable")
    rows, lengths = rows[order], lengths[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(lengths)) + 1, [len(rows)]])
    out = []
    for s, e in itertools.pairwise(starts):
        length = int(lengths[s])
        step = max(1, batch_bytes // (length * width * 8))
        out += [(length, rows[i : min(i + step, e)]) for i in range(s, e, step)]
    return out


def _gather(
    csr: sp.csr_matrix, rows: np.ndarray, length: int, pad: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Padded ``(b, length)`` column indices (``pad`` past a row's end), values (0 there),
    the validity mask and the rows' counts."""
    counts = csr.indptr[rows + 1] - csr.indptr[rows]
    ar = np.arange(length)
    valid = ar[None, :] < counts[:, None]
    pos = np.where(valid, csr.indptr[rows][:, None] + ar[None, :], 0)
    idx = np.where(valid, csr.indices[pos], pad)
    vals = np.where(valid, csr.data[pos], 0.0)
    return idx, vals, valid, counts


def _dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("bk,bk->b", a, b)


def _matvec(yg: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``Yg p`` per row: (b, L, k) × (b, k) → (b, L)."""
    return np.matmul(yg, p[:, :, None])[:, :, 0]


def _rmatvec(yg: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``Ygᵀ q`` per row: (b, L, k) × (b, L) → (b, k)."""
    return np.matmul(q[:, None, :], yg)[:, 0, :]


def _solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Stacked solves of SPD systems; singular ones (``reg = 0`` and too few ratings) get
    the minimum-norm solution."""
    try:
        return np.linalg.solve(a, b[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        return np.matmul(np.linalg.pinv(a, hermitian=True), b[:, :, None])[:, :, 0]


def _cg(
    yg: np.ndarray,
    w: np.ndarray | None,
    shift: Callable[[np.ndarray], np.ndarray],
    r: np.ndarray,
    x: np.ndarray,
    s: np.ndarray,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` conjugate-gradient steps on ``(Ygᵀ W Yg + shift) x = rhs`` per row, from
    ``x`` with residual ``r`` and entry scores ``s = Yg x`` (all three updated in place:
    ``s`` follows ``x`` at no extra pass over ``Yg``); a row stops below ``CG_EPS``."""
    rs = _dots(r, r)
    active = rs >= CG_EPS
    p = r.copy()
    for _ in range(steps):
        if not active.any():
            break
        q = _matvec(yg, p)
        ap = _rmatvec(yg, q if w is None else q * w)
        ap += shift(p)
        pap = _dots(p, ap)
        active &= pap > 0
        step = np.divide(rs, pap, out=np.zeros_like(rs), where=active)[:, None]
        x += step * p
        s += step * q
        r -= step * ap
        rs_new = _dots(r, r)
        still = active & (rs_new >= CG_EPS)
        beta = np.divide(rs_new, rs, out=np.zeros_like(rs), where=still)
        p *= beta[:, None]
        p += r
        rs, active = rs_new, still
    return x, s


def _solve_explicit(
    yg: np.ndarray, t: np.ndarray, counts: np.ndarray, x0: np.ndarray, opts: _Options
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``(Ygᵀ Yg + λ n I) x = Ygᵀ t``, and the entry scores ``Yg x``."""
    lam = (opts.reg * counts).astype(yg.dtype)  # float32 CG: keep every vector float32
    if opts.solver == "cholesky":
        gram = np.matmul(yg.transpose(0, 2, 1), yg)  # one operand twice: BLAS syrk
        diag = np.arange(yg.shape[2])
        gram[:, diag, diag] += lam[:, None]
        x = _solve_spd(gram, _rmatvec(yg, t))
        return x, _matvec(yg, x)
    x = x0.copy()
    s = _matvec(yg, x)
    r = _rmatvec(yg, t - s) - lam[:, None] * x
    return _cg(yg, None, lambda p: lam[:, None] * p, r, x, s, opts.cg_steps)


def _solve_implicit(
    yg: np.ndarray, w: np.ndarray, gram_reg: np.ndarray, x0: np.ndarray, opts: _Options
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``(G + λI + Ygᵀ diag(w) Yg) x = Ygᵀ (1 + w)`` with ``w = α r``, and the
    entry scores ``Yg x``."""
    if opts.solver == "cholesky":
        z = yg * np.sqrt(w)[:, :, None]  # w ≥ 0: the weighted Gram as a syrk of z
        a = np.matmul(z.transpose(0, 2, 1), z) + gram_reg
        x = _solve_spd(a, _rmatvec(yg, 1.0 + w))
        return x, _matvec(yg, x)
    x = x0.copy()
    s = _matvec(yg, x)
    r = _rmatvec(yg, 1.0 + w - w * s) - x @ gram_reg
    return _cg(yg, w, lambda p: p @ gram_reg, r, x, s, opts.cg_steps)


def _entry_stats(
    s: np.ndarray,
    x: np.ndarray,
    t: np.ndarray,
    valid: np.ndarray,
    w: np.ndarray | None,
    counts: np.ndarray,
    other_sq: np.ndarray,
    gram: np.ndarray | None,
) -> np.ndarray:
    """This sub-batch's share of the objective and training errors (see ``N_STATS``)."""
    out = np.zeros(N_STATS)
    if w is None:  # explicit: padded entries have t = s = 0
        resid = t - s
        out[DATA] = out[SSE] = float(np.sum(resid * resid))
        out[SAE] = float(np.sum(np.abs(resid)))
        out[OWN_REG] = float(counts @ np.sum(x * x, axis=1))
        out[OTHER_REG] = float(np.sum(other_sq))
        return out
    miss = np.where(valid, 1.0 - s, 0.0)
    sv = np.where(valid, s, 0.0)
    out[DATA] = float(np.sum((1.0 + w) * miss * miss - sv * sv) + np.sum(_dots(x @ gram, x)))
    out[SSE] = float(np.sum(miss * miss))
    out[SAE] = float(np.sum(np.abs(miss)))
    out[OWN_REG] = float(np.sum(x * x))
    return out


def _held_stats(held: sp.csr_matrix, x: np.ndarray, side: _Side) -> np.ndarray:
    """Squared and absolute errors over the hold-out entries of this block's rows."""
    out = np.zeros(N_STATS)
    rows = np.repeat(np.arange(held.shape[0]), np.diff(held.indptr))
    chunk = min(ENTRY_CHUNK, held.nnz)
    bufs = np.empty((2, chunk, x.shape[1]))  # reused (see half_step)
    for s in range(0, held.nnz, chunk):
        e = min(s + chunk, held.nnz)
        idx = held.indices[s:e]
        d, xr = bufs[0, : e - s], bufs[1, : e - s]
        np.take(side.design, idx, axis=0, out=d, mode="clip")
        np.take(x, rows[s:e], axis=0, out=xr, mode="clip")
        pred = _dots(d, xr)
        if side.offset is not None:
            pred = pred + side.offset.take(idx)
        resid = held.data[s:e] - pred
        out[VAL_SSE] += float(resid @ resid)
        out[VAL_SAE] += float(np.sum(np.abs(resid)))
    out[VAL_N] = held.nnz
    return out


def half_step(
    ratings: sp.csr_matrix,
    side: _Side,
    prev: np.ndarray,
    held: sp.csr_matrix | None,
    opts: _Options,
) -> tuple[np.ndarray, np.ndarray]:
    """New factors of one block's rows (CSR ``ratings``: rows × the other side) from the
    other side, and this block's sums (``N_STATS``; hold-out errors from ``held``)."""
    ratings, side, prev = _owned_csr(ratings), _owned_side(side), _owned(prev)
    held = _owned_csr(held) if held is not None else None
    rows, width = ratings.shape[0], side.design.shape[1]
    x = np.zeros((rows, width))
    stats = np.zeros(N_STATS)
    implicit = opts.alpha is not None
    gram_reg = side.gram + opts.reg * np.eye(width) if implicit else None
    batches = _row_batches(np.diff(ratings.indptr), width, opts.batch_bytes)
    # One buffer for every sub-batch's gathered factors: under distributed's default
    # MALLOC_TRIM_THRESHOLD_ each fresh multi-MiB temporary is a new mmap, and allocating
    # it per sub-batch made the half-step 1.7× slower (measured).
    dtype = np.dtype(opts.cg_dtype if opts.solver == "cg" else np.float64)
    design = side.design.astype(dtype, copy=False)
    if gram_reg is not None:
        gram_reg = gram_reg.astype(dtype)
    buf = np.empty(max((len(r) * n for n, r in batches), default=0) * width, dtype=dtype)
    for length, members in batches:
        idx, vals, valid, counts = _gather(ratings, members, length, side.pad)
        yg = buf[: idx.size * width].reshape(len(members), length, width)
        np.take(design, idx, axis=0, out=yg, mode="clip")  # clip: no buffered copy
        x0 = prev[members].astype(dtype, copy=False)
        if implicit:
            w = opts.alpha * vals
            t = vals
            xb, s = _solve_implicit(yg, w.astype(dtype, copy=False), gram_reg, x0, opts)
        else:
            w = None
            t = vals - side.offset.take(idx) if side.offset is not None else vals
            xb, s = _solve_explicit(yg, t.astype(dtype, copy=False), counts, x0, opts)
        xb, s = xb.astype(np.float64, copy=False), s.astype(np.float64, copy=False)
        x[members] = xb
        stats += _entry_stats(s, xb, t, valid, w, counts, side.sqnorm.take(idx), side.gram)
    if held is not None and not implicit and held.nnz:
        stats += _held_stats(held, x, side)
    return x, stats


def make_side(blocks: Sequence[np.ndarray], opts: _Options, mean: float | None) -> _Side:
    """The other side's factors as a half-step uses them (one task per half-step)."""
    y = np.concatenate(blocks, axis=0) if len(blocks) > 1 else _owned(blocks[0])
    k = opts.rank
    design = np.zeros((y.shape[0] + 1, opts.width))
    design[:-1, :k] = y[:, :k]
    offset = None
    if opts.biases:
        design[:-1, k] = 1.0
        offset = np.zeros(y.shape[0] + 1)
        offset[:-1] = mean + y[:, k]
    sqnorm = np.zeros(y.shape[0] + 1)
    sqnorm[:-1] = np.einsum("ij,ij->i", y, y)
    gram = y.T @ y if opts.alpha is not None else None
    return _Side(design, offset, sqnorm, gram)


def _side_trace(side: _Side) -> float:
    return float(np.trace(side.gram)) if side.gram is not None else 0.0


# --------------------------------------------------------------------------- graph helpers


def _sparse_meta() -> sp.csr_matrix:
    return sp.csr_matrix((0, 0), dtype=np.float64)


def _offsets(chunks: Sequence[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64).tolist()


def _init_rows(lo: int, hi: int, width: int, seed: int, side: int, implicit: bool, rank: int):
    """Rows ``lo:hi`` of a side's initial factors (drawn per ``INIT_CHUNK`` rows)."""
    parts = []
    for c in range(lo // INIT_CHUNK, (hi - 1) // INIT_CHUNK + 1):
        rng = np.random.default_rng([seed, side, c])
        if implicit:
            part = rng.random((INIT_CHUNK, rank)) * 0.01
        else:
            part = rng.standard_normal((INIT_CHUNK, rank)) / np.sqrt(rank)
        parts.append(part)
    block = np.concatenate(parts)[lo - (lo // INIT_CHUNK) * INIT_CHUNK :][: hi - lo]
    out = np.zeros((hi - lo, width))
    out[:, :rank] = block
    return out


@dataclass
class _Layouts:
    """The ratings in both layouts (``Delayed`` blocks, persisted when kept)."""

    train_rows: list[Any]
    held_rows: list[Any]
    train_items: list[Any]
    held_items: list[Any]


def _row_splits(
    a: da.Array, fraction: float, seed: int, implicit: bool
) -> tuple[list[Delayed], list[Delayed]]:
    """The ``(train, validation)`` CSR row blocks of ``a`` (see :func:`split_block`)."""
    n = a.shape[1]
    blocks = a.to_delayed(optimize_graph=False)[:, 0].tolist()
    splits = [
        delayed(split_block, nout=2, pure=True)(b, off, n, fraction, seed, implicit)
        for b, off in zip(blocks, _offsets(a.chunks[0]), strict=True)
    ]
    return [s[0] for s in splits], [s[1] for s in splits]


def _item_layout(
    rows: list[Any], row_chunks: tuple[int, ...], item_chunks: tuple[int, ...]
) -> list[Delayed]:
    """Item blocks (CSR items × users) from CSR row blocks: one shuffle."""
    bounds = [0, *np.cumsum(item_chunks).tolist()]
    m, offsets = sum(row_chunks), _offsets(row_chunks)
    pieces = [delayed(column_pieces, pure=True)(b, bounds) for b in rows]
    return [
        delayed(stack_pieces, pure=True)(
            offsets, m, *[delayed(operator.getitem, pure=True)(p, j) for p in pieces]
        )
        for j in range(len(item_chunks))
    ]


def _step_tasks(
    prefix: str,
    ratings: list[Any],
    held: list[Any] | None,
    side: Delayed,
    prev: list[Any],
    opts: _Options,
) -> list[Delayed]:
    out = []
    for i, (r, p) in enumerate(zip(ratings, prev, strict=True)):
        h = held[i] if held is not None else None
        key = f"{prefix}-{tokenize(r, h, side, p, opts)}"
        out.append(delayed(half_step, nout=2, pure=True)(r, side, p, h, opts, dask_key_name=key))
    return out


# --------------------------------------------------------------------------- the driver


def _check_options(
    a: da.Array,
    rank: int,
    reg: float,
    iterations: int,
    tol: float,
    alpha: float | None,
    biases: bool,
    seed: int,
    validation_fraction: float,
    validation_seed: int,
    solver: str,
    cg_steps: int,
    cg_dtype: str,
    keep: bool,
    batch_bytes: int,
    item_blocks: int | None,
) -> None:
    m, n = a.shape
    check_int(rank, "rank", low=1)
    if rank >= min(m, n):
        raise InputError(
            f"rank must be below min(users, items) = {min(m, n)} for a {m} × {n} ratings "
            f"matrix, got {rank}"
        )
    check_number(reg, "reg", low=0.0)
    check_int(iterations, "iterations", low=0)
    check_number(tol, "tol", low=0.0)
    if alpha is not None:
        check_number(alpha, "alpha", low=0.0)
        if alpha <= 0:
            raise InputError(f"alpha must be > 0 (implicit feedback), got {alpha!r}")
        if biases:
            raise InputError("biases are for explicit ratings; leave them off with alpha")
    check_bool(biases, "biases")
    check_int(seed, "seed", low=0)
    check_number(validation_fraction, "validation_fraction", low=0.0)
    if validation_fraction >= 1:
        raise InputError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    check_int(validation_seed, "validation_seed", low=0)
    check_choice(solver, "solver", SOLVERS)
    check_int(cg_steps, "cg_steps", low=1)
    check_choice(cg_dtype, "cg_dtype", CG_DTYPES)
    check_bool(keep, "keep")
    check_int(batch_bytes, "batch_bytes", low=1)
    if item_blocks is not None:
        check_int(item_blocks, "item_blocks", low=1)


def pick_solver(solver: str, rank: int) -> str:
    """The solver ``auto`` means at this rank (see the module docstring)."""
    if solver != "auto":
        return solver
    return "cg" if rank >= AUTO_CG_RANK else "cholesky"


@dataclass
class _FirstPass:
    layouts: _Layouts
    item_chunks: tuple[int, ...]
    mean: float
    nnz_train: int
    nnz_validation: int
    sumsq: float  # of the training ratings
    sumsq_validation: float  # of the held-out ones
    empty_users: int
    empty_items: int


def _first_pass(
    a: da.Array,
    opts: _Options,
    fraction: float,
    vseed: int,
    keep: bool,
    items: tuple[int, ...] | int,
) -> _FirstPass:
    """Read ``a`` once: check, split, count; build (and with ``keep`` persist) the item
    layout, in the item chunks ``items`` or that many blocks of about equal work."""
    train, held = _row_splits(a, fraction, vseed, opts.alpha is not None)
    stats = [delayed(_split_stats, pure=True)(t, h) for t, h in zip(train, held, strict=True)]
    if keep:
        train, held, stats = persist(train, held, stats)
        stats = list(fetch(*stats))
    else:
        (stats,) = dask.compute(stats)
    nnz = sum(s["nnz_train"] for s in stats)
    nnz_val = sum(s["nnz_validation"] for s in stats)
    if nnz + nnz_val == 0:
        raise InputError(f"a has no stored entries (no observed rating) in its {a.shape} shape")
    if nnz == 0:
        raise InputError(
            f"the hold-out took all {nnz_val} ratings; lower validation_fraction ({fraction:g})"
        )
    columns = np.sum([s["columns"] for s in stats], axis=0)
    if isinstance(items, int):
        item_chunks = _item_chunks(columns, items, opts.rank)
    else:
        item_chunks = items
    layouts = _Layouts(train, held, [], [])
    if keep:
        layouts = _layouts(a, fraction, vseed, opts, item_chunks, (train, held))
        layouts.train_items, layouts.held_items = persist(layouts.train_items, layouts.held_items)
    return _FirstPass(
        layouts=layouts,
        item_chunks=item_chunks,
        mean=float(sum(s["sum"] for s in stats)) / nnz,
        nnz_train=nnz,
        nnz_validation=nnz_val,
        sumsq=float(sum(s["sumsq"] for s in stats)),
        sumsq_validation=float(sum(s["sumsq_validation"] for s in stats)),
        empty_users=sum(s["empty_rows"] for s in stats),
        empty_items=int(np.count_nonzero(columns == 0)),
    )


def _initial_state(
    row_chunks: tuple[int, ...],
    item_chunks: tuple[int, ...],
    opts: _Options,
    seed: int,
) -> ALSState:
    implicit = opts.alpha is not None

    def side(chunks: tuple[int, ...], which: int) -> list[Delayed]:
        return [
            delayed(_init_rows, pure=True)(lo, lo + c, opts.width, seed, which, implicit, opts.rank)
            for lo, c in zip(_offsets(chunks), chunks, strict=True)
        ]

    return ALSState(
        side(row_chunks, 0), side(item_chunks, 1), row_chunks=row_chunks, item_chunks=item_chunks
    )


def _check_state(
    state: ALSState, row_chunks: tuple[int, ...], n: int, width: int
) -> tuple[int, ...]:
    """Refuse a state that does not fit ``a``; return its item chunks."""
    if len(state.u) != len(row_chunks):
        raise InputError(
            f"state.u must hold one block per row block of a ({len(row_chunks)}), "
            f"got {len(state.u)}; pass a with the row chunks the state was made with"
        )
    if state.row_chunks is not None and tuple(state.row_chunks) != tuple(row_chunks):
        raise InputError(
            f"state.row_chunks {tuple(state.row_chunks)} differ from a's row chunks "
            f"{tuple(row_chunks)}"
        )
    items = state.item_chunks
    if items is None:
        items = tuple(int(np.shape(b)[0]) for b in state.v)
    if sum(items) != n or len(items) != len(state.v):
        raise InputError(f"state.v must cover the {n} items in its item_chunks, got {items}")
    for b in [*state.u, *state.v]:
        if not isinstance(b, Delayed) and np.shape(b)[1] != width:
            raise InputError(f"state factor blocks must have {width} columns, got {np.shape(b)[1]}")
    return tuple(int(c) for c in items)


def _as_ratings(a: Any) -> da.Array:
    """``a`` as a dask array of row blocks spanning all columns (scipy.sparse accepted)."""
    if sp.issparse(a):
        a = sp.csr_matrix(a)
        a = da.from_array(a, chunks=(a.shape[0], a.shape[1]), asarray=False, meta=_sparse_meta())
    a = as_matrix(a)
    return row_blocks(a, None, min_rows=1)


def _summarize(
    user: np.ndarray, item: np.ndarray, traces: tuple[float, float], opts: _Options, nnz: int
) -> dict[str, float]:
    """The history entry of one iteration from the summed block statistics."""
    lam = opts.reg

    def objective(s: np.ndarray, other_trace: float) -> float:
        if opts.alpha is None:
            return float(s[DATA] + lam * (s[OWN_REG] + s[OTHER_REG]))
        return float(s[DATA] + lam * (s[OWN_REG] + other_trace))

    trace_v, trace_u = traces
    entry = {
        "objective": objective(item, trace_u),
        "objective_user_step": objective(user, trace_v),
        "train_rmse": float(np.sqrt(item[SSE] / nnz)),
        "train_mae": float(item[SAE] / nnz),
    }
    if item[VAL_N] > 0:
        entry["validation_rmse"] = float(np.sqrt(item[VAL_SSE] / item[VAL_N]))
        entry["validation_mae"] = float(item[VAL_SAE] / item[VAL_N])
    return entry


def _sum_parts(parts: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(parts[0])
    for p in parts:  # fixed order: bit-for-bit reproducible
        total = total + p
    return total


def als(
    a: Any,
    rank: int,
    *,
    reg: float = 0.1,
    iterations: int = 15,
    tol: float = 1e-4,
    alpha: float | None = None,
    biases: bool = False,
    seed: int = 0,
    validation_fraction: float = 0.0,
    validation_seed: int = 0,
    solver: str = "auto",
    cg_steps: int = 3,
    cg_dtype: str = "float64",
    keep: bool = True,
    state: ALSState | None = None,
    on_iteration: Callable[[ALSState], None] | None = None,
    batch_bytes: int = BATCH_BYTES,
    item_blocks: int | None = None,
) -> ALSResult:
    """Factorize a ratings matrix ``a ≈ U Vᵀ`` (explicit, optionally with biases) or fit the
    implicit-feedback model, by alternating least squares (see the module docstring).

    Parameters
    ----------
    a : dask array (users × items) of scipy.sparse blocks whose stored entries are the
        observed ratings (a scipy.sparse matrix, or dense blocks whose non-zeros are the
        observations, are accepted too); any row chunks
    rank : k, 1 ≤ k < min(users, items)
    reg : λ ≥ 0 (explicit: scaled by each row's count; implicit: not scaled)
    iterations, tol : at most ``iterations`` (total, a resumed state's included); stop when
        the objective's relative decrease is below ``tol``
    alpha : ``None`` for explicit ratings; a number > 0 for implicit feedback with
        confidence ``1 + alpha·r`` (values must be ≥ 0)
    biases : global mean, user and item biases (explicit only)
    seed : seeds the initial factors
    validation_fraction, validation_seed : the share of ratings held out, chosen per
        (user, item) by hash (see :func:`held_out`)
    solver : ``"cholesky"`` (exact), ``"cg"`` (``cg_steps`` warm-started conjugate-gradient
        steps per row) or ``"auto"`` (``cg`` from rank 16)
    cg_steps : conjugate-gradient steps per row and half-step (``implicit``'s default: 3)
    cg_dtype : ``"float64"``, or ``"float32"`` for the conjugate-gradient arithmetic only
        (the gathered factors and search directions; ``implicit``'s precision, ~1.4×
        faster): the factors, Grams, objective and exact solves stay float64
    keep : keep both layouts in worker memory (else read ``a`` in every half-step)
    state : continue from this state (a checkpoint); ``a`` must have the same row chunks
    on_iteration : called with the state after each iteration (progress, checkpoints)
    batch_bytes : gathered factors per stacked sub-batch of rows (a longer row is a
        sub-batch of its own)
    item_blocks : item blocks of the item layout (default: as many as ``a`` has row
        blocks; each half-step runs one task per block, so both should be at least the
        cluster's worker threads); ignored with ``state`` (its item blocks are kept)

    Returns
    -------
    ALSResult

    Raises
    ------
    InputError
        NaN/Inf ratings, negative values with ``alpha``, no stored entry, a bad rank or
        option, a state that does not fit ``a``.
    """
    a = _as_ratings(a)
    n = a.shape[1]
    _check_options(
        a, rank, reg, iterations, tol, alpha, biases, seed, validation_fraction,
        validation_seed, solver, cg_steps, cg_dtype, keep, batch_bytes, item_blocks,
    )  # fmt: skip
    chosen = pick_solver(solver, rank)
    alpha = None if alpha is None else float(alpha)
    opts = _Options(rank, bool(biases), float(reg), alpha, chosen, cg_steps, batch_bytes, cg_dtype)
    row_chunks = tuple(int(c) for c in a.chunks[0])
    items = _check_state(state, row_chunks, n, opts.width) if state is not None else None
    items = items or item_blocks or len(row_chunks)
    first = _first_pass(a, opts, validation_fraction, validation_seed, keep, items)
    item_chunks = first.item_chunks
    if state is None:
        state = _initial_state(row_chunks, item_chunks, opts, seed)
    state.row_chunks, state.item_chunks = row_chunks, item_chunks
    state.u, state.v = persist(list(state.u), list(state.v))
    mean = first.mean if biases else None
    lay = first.layouts
    while state.iteration < iterations and not state.converged:
        t0 = time.perf_counter()
        if not keep:
            lay = _layouts(a, validation_fraction, validation_seed, opts, item_chunks)
        entry = _iterate(state, lay, opts, mean, first.nnz_train, keep)
        entry["seconds"] = time.perf_counter() - t0
        prev = state.history[-1]["objective"] if state.history else None
        state.history.append(entry)
        state.iteration += 1
        f = entry["objective"]
        if prev is not None and prev > 0 and (prev - f) / prev < tol:
            state.converged = True
        log.debug("als: iteration %d, objective %.6g, %.2f s", state.iteration, f, entry["seconds"])
        if on_iteration is not None:
            on_iteration(state)
    return _result(a, state, first, opts, keep, validation_fraction, validation_seed)


def _layouts(
    a: da.Array,
    fraction: float,
    vseed: int,
    opts: _Options,
    item_chunks: tuple[int, ...],
    splits: tuple[list[Any], list[Any]] | None = None,
) -> _Layouts:
    """Both layouts from the row ``splits`` (default: read ``a`` again); the hold-out's item
    layout only for explicit ratings (only those are scored in the item step)."""
    train, held = splits or _row_splits(a, fraction, vseed, opts.alpha is not None)
    scored = fraction > 0 and opts.alpha is None
    held_items = _item_layout(held, a.chunks[0], item_chunks) if scored else []
    return _Layouts(train, held, _item_layout(train, a.chunks[0], item_chunks), held_items)


def _iterate(
    state: ALSState,
    lay: _Layouts,
    opts: _Options,
    mean: float | None,
    nnz: int,
    keep: bool,
) -> dict[str, float]:
    """One iteration: the user step, then the item step; one graph (two without ``keep``:
    the item layout is then rebuilt after the user step)."""
    side_v = delayed(make_side, pure=True)(state.v, opts, mean)
    users = _step_tasks(USER_STEP, lay.train_rows, None, side_v, state.u, opts)
    new_u = [t[0] for t in users]
    user_stats = [t[1] for t in users]
    trace_v = delayed(_side_trace, pure=True)(side_v)
    if not keep:  # read a again for the item step, after the user step is done
        new_u, user_stats, trace_v = persist(new_u, user_stats, trace_v)
    side_u = delayed(make_side, pure=True)(new_u, opts, mean)
    held_items = lay.held_items or None  # [] when nothing is scored
    items = _step_tasks(ITEM_STEP, lay.train_items, held_items, side_u, state.v, opts)
    new_v = [t[0] for t in items]
    item_stats = [t[1] for t in items]
    trace_u = delayed(_side_trace, pure=True)(side_u)
    new_u, new_v, user_stats, item_stats, trace_v, trace_u = persist(
        new_u, new_v, user_stats, item_stats, trace_v, trace_u
    )
    got = fetch(*user_stats, *item_stats, trace_v, trace_u)
    nu = len(user_stats)
    user_sum, item_sum = _sum_parts(got[:nu]), _sum_parts(got[nu:-2])
    state.u, state.v = list(new_u), list(new_v)
    return _summarize(user_sum, item_sum, (got[-2], got[-1]), opts, nnz)


def _result(
    a: da.Array,
    state: ALSState,
    first: _FirstPass,
    opts: _Options,
    keep: bool,
    fraction: float,
    vseed: int,
) -> ALSResult:
    n = a.shape[1]
    k, width = opts.rank, opts.width
    u_ext = stack_blocks(state.u, state.row_chunks, width, f"als-u-{state.iteration}")
    v_ext = stack_blocks(state.v, state.item_chunks, width, f"als-v-{state.iteration}")
    rows = (first.layouts.train_rows, first.layouts.held_rows)
    if not keep:  # the row blocks only: read a again
        rows = _row_splits(a, fraction, vseed, opts.alpha is not None)
    train = stack_blocks(rows[0], a.chunks[0], n, "als-train", _sparse_meta())
    validation = (
        stack_blocks(rows[1], a.chunks[0], n, "als-validation", _sparse_meta())
        if fraction > 0
        else None
    )
    last = state.history[-1] if state.history else {}
    residual = None
    if opts.alpha is None and last and first.sumsq > 0:
        residual = float(last["train_rmse"] * np.sqrt(first.nnz_train) / np.sqrt(first.sumsq))
    return ALSResult(
        u=u_ext[:, :k] if opts.biases else u_ext,
        v=v_ext[:, :k] if opts.biases else v_ext,
        user_bias=u_ext[:, k] if opts.biases else None,
        item_bias=v_ext[:, k] if opts.biases else None,
        global_mean=first.mean if opts.biases else None,
        iterations=state.iteration,
        converged=state.converged,
        history=state.history,
        empty_users=first.empty_users,
        empty_items=first.empty_items,
        nnz_train=first.nnz_train,
        nnz_validation=first.nnz_validation,
        train=train,
        validation=validation,
        solver=opts.solver,
        residual_rel=residual,
        fro_norm=float(np.sqrt(first.sumsq + first.sumsq_validation)),
    )


# --------------------------------------------------------------------------- checkpoints


def state_arrays(state: ALSState) -> tuple[dict[str, da.Array], dict[str, np.ndarray], dict]:
    """A state as checkpoint pieces: ``tall`` ``{"U": users × k'}`` (``a``'s row chunks),
    ``small`` ``{"V": items × k'}`` (computed here) and JSON ``extra`` (the item chunks)."""
    (v_blocks,) = dask.compute(list(state.v))
    v = np.concatenate(v_blocks, axis=0)  # U has V's width (rank, + the bias column)
    u = stack_blocks(state.u, state.row_chunks, v.shape[1], "als-state-u")
    return {"U": u}, {"V": v}, {"item_chunks": [int(c) for c in state.item_chunks]}


def state_from_arrays(
    state: dict[str, Any], tall: dict[str, da.Array], small: dict[str, np.ndarray]
) -> ALSState:
    """The :class:`ALSState` saved by :func:`state_arrays` (``state`` also holds
    ``iteration``, ``history`` and ``converged``)."""
    u = tall["U"]
    item_chunks = tuple(int(c) for c in state["item_chunks"])
    bounds = np.cumsum(item_chunks)[:-1]
    return ALSState(
        u=u.to_delayed(optimize_graph=False)[:, 0].tolist(),
        v=np.split(np.asarray(small["V"], dtype=np.float64), bounds),
        iteration=int(state["iteration"]),
        history=list(state["history"]),
        converged=bool(state["converged"]),
        row_chunks=tuple(int(c) for c in u.chunks[0]),
        item_chunks=item_chunks,
    )


# --------------------------------------------------------------------------- top-N


def _select(vals: np.ndarray, n: int) -> np.ndarray:
    """Mask of the ``n`` largest per row, ties to the leftmost (the lower item index)."""
    w = vals.shape[1]
    kth = np.partition(vals, w - n, axis=1)[:, w - n]
    greater = vals > kth[:, None]
    need = n - greater.sum(axis=1)
    equal = vals == kth[:, None]
    return greater | (equal & (np.cumsum(equal, axis=1) <= need[:, None]))


def _merge(
    best_v: np.ndarray, best_i: np.ndarray, s: np.ndarray, lo: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``n`` of the running best (index order) and a score chunk starting at item
    ``lo``, in index order. Only chunk entries above a row's current n-th best can enter
    (ties lose: the best holds lower indices)."""
    rows, c = s.shape
    if best_v.shape[1] == 0:
        mask = _select(s, n)
        cols = np.broadcast_to(np.arange(lo, lo + c), s.shape)
        return s[mask].reshape(rows, n), cols[mask].reshape(rows, n)
    enter = s > best_v.min(axis=1)[:, None]
    per_row = enter.sum(axis=1)
    width = int(per_row.max()) if rows else 0
    if width == 0:
        return best_v, best_i
    r, col = np.nonzero(enter)
    slot = np.arange(len(r)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    cand_v = np.full((rows, width), -np.inf)
    cand_i = np.full((rows, width), np.iinfo(np.int64).max)
    cand_v[r, slot] = s[r, col]
    cand_i[r, slot] = col + lo
    vals = np.concatenate([best_v, cand_v], axis=1)
    idx = np.concatenate([best_i, cand_i], axis=1)
    mask = _select(vals, n)
    return vals[mask].reshape(rows, n), idx[mask].reshape(rows, n)


def _seen_by_column(seen: sp.csr_matrix | None) -> tuple[np.ndarray, np.ndarray] | None:
    if seen is None or seen.nnz == 0:
        return None
    coo = seen.tocoo()
    order = np.argsort(coo.col, kind="stable")
    return coo.row[order].astype(np.int64), coo.col[order].astype(np.int64)


def top_block(
    u: np.ndarray,
    items: tuple[np.ndarray, np.ndarray | None],
    n: int,
    user_offset: np.ndarray | None,
    seen: Any,
    block_items: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` items and scores of one block of users (see :func:`top_n`)."""
    u, v, item_offset = _owned(u), _owned(items[0]), _owned(items[1])
    rows, total = u.shape[0], v.shape[0]
    seen = _as_csr(seen) if seen is not None else None
    top_i = np.empty((rows, n), dtype=np.int64)
    top_v = np.empty((rows, n))
    for r0 in range(0, rows, SCORE_ROWS):
        r1 = min(rows, r0 + SCORE_ROWS)
        chunk = block_items or max(1, SCORE_BYTES // (8 * (r1 - r0)))
        chunk = max(chunk, n)
        marks = _seen_by_column(seen[r0:r1] if seen is not None else None)
        best_v, best_i = np.empty((r1 - r0, 0)), np.empty((r1 - r0, 0), dtype=np.int64)
        scores = np.empty((r1 - r0) * min(chunk, total))  # reused (see half_step)
        for lo in range(0, total, chunk):  # the first chunk holds ≥ n items: chunk ≥ n
            hi = min(total, lo + chunk)
            s = scores[: (r1 - r0) * (hi - lo)].reshape(r1 - r0, hi - lo)
            np.matmul(u[r0:r1], v[lo:hi].T, out=s)
            if item_offset is not None:
                s += item_offset[lo:hi][None, :]
            if user_offset is not None:
                s += user_offset[r0:r1][:, None]
            if marks is not None:
                a, b = np.searchsorted(marks[1], [lo, hi])
                s[marks[0][a:b], marks[1][a:b] - lo] = -np.inf
            best_v, best_i = _merge(best_v, best_i, s, lo, n)
        order = np.argsort(-best_v, axis=1, kind="stable")
        best_v = np.take_along_axis(best_v, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
        best_i[np.isneginf(best_v)] = -1
        top_i[r0:r1], top_v[r0:r1] = best_i, best_v
    return top_i, top_v


def _item_pack(v: Any, item_bias: Any, global_mean: float | None) -> tuple[np.ndarray, Any]:
    v = np.ascontiguousarray(np.asarray(v, dtype=np.float64))
    offset = None
    if item_bias is not None:
        offset = np.asarray(item_bias, dtype=np.float64).ravel()
    if global_mean is not None:
        offset = (offset if offset is not None else 0.0) + float(global_mean)
        offset = np.broadcast_to(offset, (v.shape[0],)).copy()
    return v, offset


def _aligned(x: Any, chunks: tuple[int, ...]) -> list[Any] | None:
    """Row blocks of a dask array (or numpy array) ``x`` in ``chunks``."""
    if x is None:
        return None
    if not isinstance(x, da.Array):
        x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
        edges = [0, *np.cumsum(chunks).tolist()]
        return [x[lo:hi] for lo, hi in itertools.pairwise(edges)]
    if x.ndim == 2 and len(x.chunks[1]) > 1:
        x = x.rechunk({1: -1})
    if tuple(x.chunks[0]) != tuple(chunks):
        method = "tasks" if sp.issparse(x._meta) else None
        x = x.rechunk({0: chunks}, method=method)
    d = x.to_delayed(optimize_graph=False)
    return d[:, 0].tolist() if x.ndim == 2 else d.tolist()


def top_n(
    u: Any,
    v: Any,
    n: int,
    *,
    seen: Any = None,
    user_bias: Any = None,
    item_bias: Any = None,
    global_mean: float | None = None,
    block_items: int | None = None,
) -> tuple[da.Array, da.Array]:
    """Each user's ``n`` best items and their scores, block by block.

    Scores are ``u·v`` (with biases ``global_mean + user_bias + item_bias + u·v``). Each task
    scores ``SCORE_ROWS`` users against ``block_items`` items at a time (default: a 64 MiB
    buffer) and merges into a running top-``n``: never the m × items score matrix.

    Returns
    -------
    (items, scores) : dask arrays (users × n, ``u``'s row chunks), int64 item indices best
        first and float64 scores; ties go to the lower item index; with ``seen`` (CSR row
        blocks: those entries are excluded) a user with fewer than ``n`` unseen items gets
        index -1 and score -inf in the remaining places.
    """
    u = as_matrix(u, name="u").astype(np.float64)
    if len(u.chunks[1]) > 1:
        u = u.rechunk({1: -1})
    n_items = v.shape[0]
    check_int(n, "n", low=1, high=n_items)
    if block_items is not None:
        check_int(block_items, "block_items", low=1)
    chunks = tuple(int(c) for c in u.chunks[0])
    # A key of its own per call: two top-N graphs of the same factors (recommend, the
    # ranking metrics) would otherwise define one key with different specs (distributed
    # refuses a redefined run_spec, and a reused key can hand one graph the other's result).
    pack = delayed(_item_pack, pure=False)(v, item_bias, global_mean)
    user_off = _aligned(user_bias, chunks) or [None] * len(chunks)
    seen_blocks = _aligned(seen, chunks) or [None] * len(chunks)
    u_blocks = u.to_delayed(optimize_graph=False)[:, 0].tolist()
    tasks = [
        delayed(top_block, nout=2, pure=True)(ub, pack, n, user_off[i], seen_blocks[i], block_items)
        for i, ub in enumerate(u_blocks)
    ]
    int_meta = np.empty((0, 0), dtype=np.int64)
    ids = stack_blocks([t[0] for t in tasks], chunks, n, "als-top-items", int_meta)
    scores = stack_blocks([t[1] for t in tasks], chunks, n, "als-top-scores")
    return ids, scores


def _ranking_block(ids: np.ndarray, held: Any, k: int) -> np.ndarray:
    """``[hits, Σ min(k, |held_u|), Σ ndcg_u, users]`` over this block's users with a
    held-out item (``implicit.evaluation.ranking_metrics_at_k``'s definitions)."""
    held = _as_csr(held)
    counts = np.diff(held.indptr)
    users = np.flatnonzero(counts)
    if not users.size:
        return np.zeros(4)
    hit = _is_held(held[users], ids[users])  # by index: a stored 0 held out counts
    gains = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(gains)[np.minimum(k, counts[users]) - 1]
    ndcg = (hit * gains[None, :]).sum(axis=1) / ideal
    return np.array(
        [hit.sum(), np.minimum(k, counts[users]).sum(), ndcg.sum(), len(users)], dtype=np.float64
    )


def _is_held(held: sp.csr_matrix, ids: np.ndarray) -> np.ndarray:
    """``ids[r, j] ∈ held row r`` (by index: a stored 0 counts), vectorized."""
    n = held.shape[1]
    rows = np.repeat(np.arange(held.shape[0]), np.diff(held.indptr))
    keys = np.sort(rows.astype(np.int64) * (n + 1) + held.indices)
    probe = np.arange(ids.shape[0])[:, None].astype(np.int64) * (n + 1) + np.where(ids >= 0, ids, n)
    pos = np.minimum(np.searchsorted(keys, probe), len(keys) - 1)
    return (keys[pos] == probe) & (ids >= 0)


def ranking_metrics(
    u: Any,
    v: Any,
    train: Any,
    held_out: Any,
    k: int = 10,
    *,
    user_bias: Any = None,
    item_bias: Any = None,
    global_mean: float | None = None,
    compute: bool = True,
) -> dict[str, Any]:
    """Precision@k and nDCG@k of the top-``k`` lists (training items excluded) against the
    held-out items, over the users with at least one, exactly as
    ``implicit.evaluation.ranking_metrics_at_k`` defines them: precision is the number of
    hits over ``Σ_u min(k, |held-out of u|)``, nDCG the mean over users of
    ``Σ_hits 1/log2(pos + 2)`` over the ideal ``Σ_{j < min(k, |held-out|)} 1/log2(j + 2)``.

    Returns ``{"precision", "ndcg", "users"}`` (floats; with ``compute=False`` lazy values
    to compute together with other results).
    """
    check_int(k, "k", low=1)
    ids, _ = top_n(
        u, v, k, seen=train, user_bias=user_bias, item_bias=item_bias, global_mean=global_mean
    )
    chunks = tuple(int(c) for c in ids.chunks[0])
    held_blocks = _aligned(held_out, chunks)
    id_blocks = ids.to_delayed(optimize_graph=False)[:, 0].tolist()
    parts = [
        delayed(_ranking_block, pure=True)(i, h, k)
        for i, h in zip(id_blocks, held_blocks, strict=True)
    ]
    total = delayed(_sum_parts, pure=True)(parts)
    out = {
        "precision": delayed(_ratio, pure=True)(total, 0, 1),
        "ndcg": delayed(_ratio, pure=True)(total, 2, 3),
        "users": delayed(_part, pure=True)(total, 3),
    }
    if compute:
        (out,) = dask.compute(out)
    return out


def _ratio(total: np.ndarray, num: int, den: int) -> float:
    return float(total[num] / total[den]) if total[den] > 0 else 0.0


def _part(total: np.ndarray, i: int) -> float:
    return float(total[i])
