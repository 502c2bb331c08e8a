"""Graph helpers shared by the algorithms."""

from __future__ import annotations

import sys
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask._task_spec import Alias
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph

from pipeline.backend import dense_meta, is_sparse


def persist(*collections: Any, **kwargs: Any) -> tuple[Any, ...]:
    """``dask.persist`` that returns only once the results exist.

    Under ``distributed``, a persisted graph may still be waiting to be registered by the
    scheduler when the caller drops the futures it was built on (the previous iterate, a
    sketch); the scheduler then cancels it with "lost dependencies". Waiting here makes
    dropping inputs safe. ``distributed`` is used only when the caller already loaded it.
    """
    out = dask.persist(*collections, **kwargs)
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        futures = distributed.futures_of(out)
        if futures:
            distributed.wait(futures)
    return out


def fetch(*persisted: Any) -> tuple[Any, ...]:
    """Values of persisted single-key ``Delayed`` objects.

    Under ``distributed`` this gathers the futures directly, without submitting a new graph
    (saves a scheduler round trip in every NMF iteration); otherwise ``dask.compute``.
    """
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        futures = [distributed.futures_of(p) for p in persisted]
        if all(len(f) == 1 for f in futures):
            return tuple(distributed.default_client().gather([f[0] for f in futures]))
    return dask.compute(*persisted)


def stack_row_blocks(blocks: list[Any], like: da.Array, width: int, prefix: str) -> da.Array:
    """Row blocks (``Delayed``, persisted or not) as one dask array with ``like``'s row chunks
    (dense blocks, also when ``like``'s are sparse; see :func:`stack_blocks`)."""
    return stack_blocks(blocks, like.chunks[0], width, prefix, dense_meta(like))


def stack_blocks(
    blocks: list[Any], chunks: tuple[int, ...], width: int, prefix: str, meta: Any = None
) -> da.Array:
    """Row blocks (``Delayed``, persisted or not; other values are wrapped) as one dask array
    with row ``chunks``, ``width`` columns and ``meta``'s type and dtype (default: float64
    numpy).

    One layer of aliases straight to the block keys, named after them. (Not
    ``da.concatenate`` of ``da.from_delayed`` pieces: once an optimized graph fused those
    two layers, a later graph with the unfused ``concatenate-…`` keys redefined them, which
    the distributed scheduler reports as "Detected different `run_spec`".)
    """
    meta = np.empty((0, 0)) if meta is None else meta
    blocks = [b if isinstance(b, Delayed) else delayed(b, pure=True) for b in blocks]
    name = f"{prefix}-{tokenize([b.key for b in blocks], meta.dtype, width)}"
    layer = {(name, i, 0): Alias((name, i, 0), b.key) for i, b in enumerate(blocks)}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=blocks)
    return da.Array(graph, name, (tuple(chunks), (width,)), dtype=meta.dtype, meta=meta)


def _cull_only(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Drop what ``keys`` do not need and fuse nothing (see :class:`UnfusedArray`)."""
    if not isinstance(dsk, HighLevelGraph):
        dsk = HighLevelGraph.from_collections(str(id(dsk)), dsk, dependencies=())
    return dsk.cull(set(da.core.flatten(keys)))


class UnfusedArray(da.Array):
    """A dask array whose own compute, persist or store never fuses its graph.

    For arrays that read the input again after a pass whose results are persisted (TSQR's
    ``Q``, SVD's ``U``): the scheduler remembers the input's keys as the lineage of the
    persisted factors, and an optimized graph would redefine them with fused
    dependencies ("Detected different `run_spec`"). Arrays derived from it (slices,
    products) are plain dask arrays again: compute those with ``optimize_graph=False``.
    """

    __slots__ = ()
    __dask_optimize__ = staticmethod(_cull_only)


def unfused(x: da.Array) -> UnfusedArray:
    """``x`` as an :class:`UnfusedArray` (same graph, name, chunks and meta)."""
    return UnfusedArray(x.dask, x.name, x.chunks, dtype=x.dtype, meta=x._meta)


def sum_block_pieces(
    a: da.Array, func: Any, piece: tuple[int, int], *args: Any, **kw: Any
) -> da.Array:
    """Lazy sum (float64) of ``func(block, *args)`` over the row blocks of ``a``, where each
    call returns a ``piece``-shaped host array (the small result of a block kernel; see
    :mod:`pipeline.backend`)."""
    nb, (rows, cols) = a.numblocks[0], piece
    parts = da.map_blocks(
        func,
        a,
        *args,
        chunks=((rows,) * nb, (cols,)),
        dtype=a.dtype,
        meta=np.empty((0, 0), dtype=a.dtype),
        **kw,
    )
    return parts.reshape(nb, rows, cols).sum(axis=0, dtype=np.float64)


def _dense(block: Any) -> Any:
    """A sparse block as a dense numpy array (dense blocks pass through)."""
    return block.toarray() if is_sparse(block) else block


def dense_row_blocks(x: da.Array, block_bytes: int) -> da.Array:
    """``x`` with scipy.sparse blocks as dense row blocks of about ``block_bytes`` each, one
    densified per task (for the algorithms that factorize dense blocks: TSQR, the exact
    SVD); ``x`` itself when its blocks are dense. The sparse pieces are cut to the dense
    size first, so no task ever holds more than one dense block — never the whole matrix.
    (The job layer's :func:`pipeline.io.sparse.densified` does the same for inputs it read.)
    """
    if not is_sparse(x._meta):
        return x
    m, n = x.shape
    rows = int(max(1, min(m, block_bytes // (n * x.dtype.itemsize))))
    sizes = (rows,) * (m // rows) + ((m % rows,) if m % rows else ())
    x = x.rechunk((sizes, (n,)), method="tasks")  # P2P moves numpy buffers only
    return x.map_blocks(_dense, dtype=x.dtype, meta=np.empty((0, 0), dtype=x.dtype))
