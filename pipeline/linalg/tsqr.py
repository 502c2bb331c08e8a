"""Tall-skinny QR of a dask array (direct TSQR with guarded Cholesky-QR blocks).

The structure is the direct TSQR of Benson, Gleich & Demmel (2013): each row block is
factorized locally, the stacked ``R_i`` are reduced in a tree of small QRs, and ``Q`` is
the product of each block's own ``Q_i`` with the tree's ``n × n`` transform for it.
What differs is the local factorization: a Cholesky QR (CholeskyQR2, or shifted
CholeskyQR3 of Fukaya et al. 2020 — with a fourth round when the third leaves a well
conditioned but not yet orthonormal block — when the block is ill-conditioned) runs as
matrix products at BLAS-3 speed instead of Householder panels, guarded by the Gram of its
last round and falling back to Householder QR when the guard trips. The result is stable for
κ(A) up to ~1/u because every ``Q_i`` is orthonormal to working precision.

Passes over the input: ``R`` reads ``A`` once. ``Q`` is returned lazily and reads ``A``
a second time when computed (each block recomputes its ``Q_i`` from the small factors
kept on the cluster), so memory stays bounded by a few blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed

from pipeline.backend import array_module, is_sparse, to_host
from pipeline.cost import Cost
from pipeline.linalg import _kernels as k
from pipeline.linalg._graph import dense_row_blocks, fetch, persist, stack_row_blocks, unfused
from pipeline.linalg._validation import as_matrix, check_bool, check_int, check_tall

DEFAULT_BLOCK_BYTES = 64 * 2**20

# Keyword for dask.compute/persist of anything that reads ``a`` again after tsqr() (its Q,
# metrics on ``TSQRResult.a``): graph optimization would fuse ``a``'s keys into new task
# definitions that conflict with the ones the scheduler remembers from the R pass.
UNOPTIMIZED = {"optimize_graph": False}


def compute_again(*collections: Any) -> tuple[Any, ...]:
    """``dask.compute`` of collections that read a factorization's input again (its Q or
    U pass, metrics on ``result.a``), without the graph optimization that would clash
    with the keys the scheduler remembers (see :data:`UNOPTIMIZED`)."""
    return dask.compute(*collections, **UNOPTIMIZED)


# Key prefixes of the one-per-row-block tasks of each pass (what progress counts): R's
# pass, Q's, and Q·M's (svd's U).
R_PASS_TASK = "factor_block"
Q_PASS_TASK = "block_q"
Q_TIMES_PASS_TASK = "block_q_times"


# Block-sized arrays a task holds at once: the block and two Cholesky-QR iterates (or
# Householder's copy and Q; while a rechunk merges row chunks: the chunks and the block).
BLOCK_BUFFERS = 3
# n × n arrays kept per row block: its R, up to three more Cholesky factors and the
# transform Q needs. A tree node stacks its children's R and holds the stack, its QR's
# copy and Q: about four per child.
BLOCK_SQUARES = 4
NODE_SQUARES = 4


def tsqr_cost(
    shape: tuple[int, int], *, compute_q: bool, transpose: bool = False, extra_columns: int = 0
) -> Cost:
    """What :func:`tsqr` costs on a matrix of ``shape`` (or its transpose): one pass for
    ``R``, a second for ``Q`` (the input kept in memory between them when it fits).

    ``extra_columns`` widens each block (the exact SVD's centring column): blocks then
    need that many more rows, and a task one more buffer per column added.
    """
    n = (shape[0] if transpose else shape[1]) + extra_columns
    return Cost(
        passes=2 if compute_q else 1,
        exact=True,
        columns=n,
        min_rows=n,
        buffers=BLOCK_BUFFERS + extra_columns,
        keeps=compute_q,
        block_squares=BLOCK_SQUARES,
        node_squares=NODE_SQUARES,
        output_blocks=int(compute_q),  # Q_i (or Q_i times a small factor: the SVD's U_i)
        transpose=transpose,
    )


@dataclass
class TSQRResult:
    """Factors of ``A = Q R``.

    Attributes
    ----------
    q : lazy dask array (m, n) with the row chunks of the factorized array, or ``None``.
    r : (n, n) upper-triangular array with non-negative diagonal (computed).
    a : the row-blocked input that was factorized (use it for metrics on the same blocks).
    sumsq : ``‖A‖²_F`` from the same pass.
    column_sums : the column sums of ``A`` in float64 from the same pass
        (``tsqr(..., column_sums=True)``), else ``None``.
    block_methods : how many blocks took each local path (``cholqr2``, ``scholqr3``,
        ``scholqr4``, ``householder``).
    blocks, factors, transforms : per row block, the input block (unoptimized ``Delayed``),
        its persisted :class:`~pipeline.linalg._kernels.BlockFactor` and its ``n × n``
        transform from the reduction tree (``None`` for a single block); ``None`` when
        ``Q`` was not requested. :meth:`q_times` builds on them.
    """

    q: da.Array | None
    r: Any
    a: da.Array
    sumsq: float
    block_methods: dict[str, int] = field(default_factory=dict)
    blocks: list[Delayed] | None = field(default=None, repr=False)
    factors: list[Delayed] | None = field(default=None, repr=False)
    transforms: list[Delayed | None] | None = field(default=None, repr=False)
    column_sums: np.ndarray | None = None

    @property
    def fro_norm(self) -> float:
        """``‖A‖_F``."""
        return float(np.sqrt(self.sumsq))

    def q_times(self, m: Any) -> da.Array:
        """Lazy ``Q @ M`` (m × k) for a small ``n × k`` matrix ``M``, with ``a``'s row chunks.

        ``M`` is folded into each block's ``n × n`` transform, so a block costs what a
        block of ``Q`` costs (one read of ``A_i``) and ``Q`` itself is never formed. As
        for ``q``, compute it with ``**UNOPTIMIZED`` (see :data:`UNOPTIMIZED`).
        """
        if self.factors is None:
            raise ValueError("q_times needs the factors of tsqr(..., compute_q=True)")
        n = self.a.shape[1]
        m = to_host(m)  # small: kept on the host (see pipeline.backend)
        if m.ndim != 2 or m.shape[0] != n:
            raise ValueError(f"M must have shape ({n}, k); got {m.shape}")
        md = delayed(m, pure=True)
        return _q_blocks(self, md, m.shape[1])


def _at_least(rows: tuple[int, ...], floor: int) -> list[int]:
    """``rows`` with consecutive blocks joined until each holds at least ``floor`` rows."""
    sizes, run = [], 0
    for r in rows:
        run += r
        if run >= floor:
            sizes.append(run)
            run = 0
    if run:
        sizes.append(run)
    return sizes


def row_blocks(a: da.Array, block_rows: int | None = None, min_rows: int | None = None) -> da.Array:
    """Rechunk ``a`` into row blocks that span all columns and hold at least ``min_rows`` rows.

    ``min_rows`` defaults to the number of columns (what a local QR needs). Existing row
    chunks are kept when they already qualify and are not larger than twice the target;
    otherwise blocks aim at ``block_rows`` rows (default: about 64 MiB per block), rounded
    to a multiple of the input's row chunk so storage chunks are not split. A short last
    block is merged into the one before it. Sparse blocks (planned by stored bytes, see
    :mod:`pipeline.io.sparse`) are kept unless ``block_rows`` is given.
    """
    if block_rows is not None:
        check_int(block_rows, "block_rows", low=1)
    m, n = a.shape
    floor = min(m, n if min_rows is None else min_rows)
    target = block_rows or max(1, DEFAULT_BLOCK_BYTES // (n * a.dtype.itemsize))
    target = max(target, floor)
    rows = a.chunks[0]
    keep = len(a.chunks[1]) == 1 and all(floor <= r <= 2 * target for r in rows[:-1])
    if is_sparse(a._meta) and block_rows is None:  # planned by stored bytes: keep, merging
        sizes = _at_least(rows, floor)  # blocks below the floor into the next
    elif keep and block_rows is None:
        sizes = list(rows)
    else:
        step = rows[0] if rows[0] <= target else target
        step = max(floor, (target // step) * step)
        sizes = [step] * (m // step) + ([m % step] if m % step else [])
    if len(sizes) > 1 and sizes[-1] < floor:
        short = sizes.pop()  # (not `sizes[-2] += sizes.pop()`: the store would miss by one)
        sizes[-1] += short
    if tuple(sizes) == a.chunks[0] and len(a.chunks[1]) == 1:
        return a
    method = "tasks" if is_sparse(a._meta) else None  # P2P moves numpy buffers only
    return a.rechunk((tuple(sizes), (n,)), method=method)


def _tree(leaf_rs: list[Delayed], split_every: int) -> tuple[Delayed, list[Delayed | None]]:
    """Reduce ``R`` factors in a tree; return the root ``R`` and each leaf's transform."""
    if len(leaf_rs) == 1:
        return leaf_rs[0], [None]
    levels: list[list[tuple[Delayed, int]]] = []  # per level: (node q, number of children)
    rs = leaf_rs
    while len(rs) > 1:
        groups = [rs[i : i + split_every] for i in range(0, len(rs), split_every)]
        root = len(groups) == 1
        nodes = [delayed(k.stack_qr, nout=2, pure=True)(*g, root=root) for g in groups]
        levels.append([(q, len(g)) for (q, _), g in zip(nodes, groups, strict=True)])
        rs = [r for _, r in nodes]
    # Walk down: a child's transform is its piece of the parent's q times the parent's.
    parents: list[Delayed | None] = [None]
    for level in reversed(levels):
        children: list[Delayed | None] = []
        for (node_q, n_children), parent in zip(level, parents, strict=True):
            children += [
                delayed(k.child_transform, pure=True)(node_q, j, parent) for j in range(n_children)
            ]
        parents = children
    return rs[0], parents


def tsqr(
    a: da.Array,
    *,
    compute_q: bool = True,
    block_rows: int | None = None,
    split_every: int = 16,
    column_sums: bool = False,
) -> TSQRResult:
    """QR factorization of a tall-and-skinny dask array.

    Parameters
    ----------
    a : dask (or numpy) array (m, n) with m ≥ n, any chunking, dense or scipy.sparse
        blocks (densified one row block of about 64 MiB per task); integers and bool are
        computed in float64, float16 in float32 (see :func:`working_dtype`)
    compute_q : build ``Q`` (lazy; a second read of ``a`` when computed)
    block_rows : rows per block (default: about 64 MiB per block, at least ``n``)
    split_every : fan-in of the reduction tree of ``R`` factors
    column_sums : also sum the columns in float64, from the same pass (``column_sums``)

    Returns
    -------
    TSQRResult
        ``r`` is computed (one pass over ``a``); ``q`` is lazy. The small per-block
        factors that ``q`` needs are persisted (on the cluster under ``distributed``).
        ``q`` and ``r`` are in the working dtype of ``a`` (float32 for float32 input,
        float64 for float64 and integer input); ``sumsq`` is a float64 scalar.

    Raises
    ------
    InputError
        For a wide matrix (factorize ``a.T``), a complex or non-numeric dtype, bad
        options.
    NonFiniteInputError
        When ``a`` holds NaN or Inf (found during the pass that computes ``r``).
    """
    a = dense_row_blocks(as_matrix(a), DEFAULT_BLOCK_BYTES)
    check_tall(a.shape)
    check_bool(compute_q, "compute_q")
    check_bool(column_sums, "column_sums")
    check_int(split_every, "split_every", low=2)
    a = row_blocks(a, block_rows)
    offsets = np.concatenate([[0], np.cumsum(a.chunks[0])[:-1]]).tolist()
    # Unoptimized blocks: the scheduler keeps these keys as the lineage of the persisted
    # factors, so every later pass over ``a`` must define them the same way. Q (and
    # q_times) are UnfusedArrays, safe to compute as they are; anything derived from them
    # or from ``a`` is computed with ``optimize_graph=False`` (see UNOPTIMIZED).
    blocks = a.to_delayed(optimize_graph=False)[:, 0].tolist()
    factors = [
        delayed(k.factor_block, pure=True)(b, off) for b, off in zip(blocks, offsets, strict=True)
    ]
    root_r, transforms = _tree([delayed(k.block_r, pure=True)(f) for f in factors], split_every)
    summary = delayed(k.summarize, pure=True)(*factors)
    # column sums read the same block keys, so they come from the same pass
    sums = delayed(_total, pure=True)(*[delayed(_column_sums, pure=True)(b) for b in blocks])

    if not compute_q:  # leaf and root R have a non-negative diagonal
        r, info, colsum = dask.compute(root_r, summary, sums if column_sums else None)
        return TSQRResult(None, r, a, info["sumsq"], info["block_methods"], column_sums=colsum)

    # Keep the small per-block state on the cluster; Q re-reads A block by block.
    extra = [sums] if column_sums else []
    root_r, summary, factors, transforms, *extra = persist(
        root_r, summary, factors, transforms, *extra
    )
    r, info, *colsum = fetch(root_r, summary, *extra)
    res = TSQRResult(None, r, a, info["sumsq"], info["block_methods"], blocks, factors, transforms)
    res.column_sums = colsum[0] if colsum else None
    res.q = _q_blocks(res, None, a.shape[1])
    return res


def _column_sums(block: Any) -> np.ndarray:
    """Column sums of a block in float64, on the host."""
    return to_host(block.sum(axis=0, dtype=array_module(block).float64))


def _total(*parts: np.ndarray) -> np.ndarray:
    """The sum of the blocks' pieces (float64)."""
    return np.sum(parts, axis=0, dtype=np.float64)


def _block_q_times(a: Any, factor: k.BlockFactor, transform: Any | None, m: Any | None) -> Any:
    """``Q_i · transform · M`` of one block (``transform · M`` formed on the host)."""
    if m is not None:
        m = to_host(m).astype(a.dtype, copy=False)
        transform = m if transform is None else transform @ m
    return k.block_q(a, factor, transform)


def _q_blocks(res: TSQRResult, m: Delayed | None, width: int) -> da.Array:
    """Lazy ``Q`` (``m`` is ``None``) or ``Q M``, one task per row block of ``res.a``."""
    func = k.block_q if m is None else _block_q_times
    extra = () if m is None else (m,)
    parts = [
        delayed(func, pure=True)(b, f, t, *extra)
        for b, f, t in zip(res.blocks, res.factors, res.transforms, strict=True)
    ]
    return unfused(stack_row_blocks(parts, res.a, width, "tsqr-q"))
