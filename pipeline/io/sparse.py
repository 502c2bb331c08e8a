"""Sparse CSR/CSC matrices stored in Zarr (AnnData's layout), read in row blocks planned by
non-zeros and never densified as a whole.

The layout is AnnData's sparse encoding (also what ``factorize generate --kind sparse``
writes): a group with attributes ``encoding-type: csr_matrix | csc_matrix`` and
``shape: [rows, cols]``, holding 1-D arrays ``data`` (values), ``indices`` (column indices
for CSR, row indices for CSC; int32 or int64) and ``indptr`` (``major + 1`` offsets,
``major`` = rows for CSR, columns for CSC). Zarr v2 or v3, sharded or not: the block
reads go through zarr, which fetches only the chunks (or, inside a shard, the chunks'
byte ranges) that a block's slice of ``data`` and ``indices`` covers.

Blocks: ``indptr`` is read first (``major + 1`` integers, on the client) and cut into
blocks of about :data:`BLOCK_BYTES` of stored ``data`` + ``indices``, so a block of dense
rows and a block of nearly empty rows cost the same memory (rows per block capped by
:data:`MAX_BLOCK_ROWS`, so the dense ``rows × sketch`` temporaries of the methods stay
small). Each block is a ``scipy.sparse.csr_matrix`` (scipy's matrix class is what dask's
concatenation of sparse blocks understands).

CSC stores ``Aᵀ`` as CSR: its blocks are column blocks of ``A``, re-blocked into rows by
dask (sparse pieces move between workers; nothing is densified) — a pass over a CSC input
therefore holds up to the sparse matrix's size across the cluster, where CSR streams
block by block. Store CSR when the matrix is larger than the cluster's memory.

Values are checked as each block is read: an index outside the matrix raises
:class:`~pipeline.errors.InputError`, NaN or Inf :class:`~pipeline.errors.NonFiniteInputError`
(both name the row and the array), so a bad store fails the first pass, never a result.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import scipy.sparse as sp

from pipeline.errors import InputError, NonFiniteInputError, first_line
from pipeline.io.fastread import quiet_worker_log

ENCODINGS = {"csr_matrix": "csr", "csc_matrix": "csc"}
BLOCK_BYTES = 64 * 2**20  # stored data + indices per block, like a dense block's 64 MiB
MAX_BLOCK_ROWS = 65_536  # a rows × 128 float64 temporary stays at 64 MiB


def sparse_encoding(node: Any) -> str | None:
    """``"csr"`` / ``"csc"`` for a Zarr group in AnnData's sparse encoding, else ``None``."""
    return ENCODINGS.get(str(node.attrs.get("encoding-type", "")))


@dataclass
class SparseReader:
    """Reads row blocks of a CSR layout (of ``A``, or of ``Aᵀ`` for CSC); pickles to workers."""

    data: Any  # zarr arrays
    indices: Any
    indptr: Any
    minor: int  # columns of the CSR layout
    name: str  # the group in messages (credentials redacted)
    transposed: bool  # CSC: the CSR rows are A's columns
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __dask_tokenize__(self) -> str:
        return self.token

    def read(self, r0: int, r1: int, dtype: np.dtype) -> sp.csr_matrix:
        """Rows ``r0:r1`` of the CSR layout as a canonical ``csr_matrix`` of ``dtype``.

        Raises
        ------
        InputError
            An index outside ``0 … minor − 1``.
        NonFiniteInputError
            NaN or Inf among the values.
        """
        ptr = self._slice(self.indptr, "indptr", r0, r1 + 1).astype(np.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        values = self._slice(self.data, "data", lo, hi)
        idx = self._slice(self.indices, "indices", lo, hi)
        if hi > lo:
            self._check(ptr, values, idx, r0)
        block = sp.csr_matrix(
            (values.astype(dtype, copy=False), idx, ptr - lo), shape=(r1 - r0, self.minor)
        )
        block.sum_duplicates()  # canonical: the sums of squares below count each entry once
        return block

    def _slice(self, arr: Any, key: str, lo: int, hi: int) -> np.ndarray:
        """``arr[lo:hi]`` through zarr; a chunk that does not decode is a user error naming
        the array (codec errors are ``RuntimeError``/``ValueError``; I/O errors such as
        timeouts are left to the retries)."""
        try:
            return np.asarray(arr[lo:hi])
        except (RuntimeError, ValueError, TypeError) as exc:
            quiet_worker_log()
            raise InputError(
                f"input: {self.name}/{key} is corrupt: entries {lo}…{hi - 1} do not decode "
                f"({first_line(exc)})"
            ) from None

    def _row_of(self, ptr: np.ndarray, position: int, r0: int) -> int:
        return r0 + int(np.searchsorted(ptr, ptr[0] + position, side="right")) - 1

    def _check(self, ptr: np.ndarray, values: np.ndarray, idx: np.ndarray, r0: int) -> None:
        major, minor_name = ("column", "row") if self.transposed else ("row", "column")
        bad = np.flatnonzero((idx < 0) | (idx >= self.minor))
        if bad.size:
            quiet_worker_log()
            at = self._row_of(ptr, int(bad[0]), r0)
            raise InputError(
                f"input: {self.name}/indices holds {minor_name} index {int(idx[bad[0]])} in "
                f"{major} {at}, outside 0…{self.minor - 1}"
            )
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            quiet_worker_log()
            at = self._row_of(ptr, int(np.argmin(np.isfinite(values))), r0)
            raise NonFiniteInputError(
                f"input: {self.name}/data holds NaN or Inf (first in {major} {at})"
            )


@dataclass(frozen=True)
class SparseLayout:
    """What the client learned from the group's metadata and ``indptr``."""

    fmt: str  # "csr" or "csc"
    shape: tuple[int, int]
    dtype: np.dtype
    nnz: int
    stored_bytes: int  # data + indices (+ indptr) in memory
    bounds: tuple[int, ...]  # block edges along the CSR layout's rows

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])


def _member(group: Any, key: str, name: str) -> Any:
    import zarr

    node = group.get(key)
    if not isinstance(node, zarr.Array) or node.ndim != 1:
        raise InputError(f"input: {name} is a sparse group without a 1-D array {key!r}")
    return node


def _shape(group: Any, name: str) -> tuple[int, int]:
    shape = group.attrs.get("shape")
    ok = (
        isinstance(shape, list | tuple)
        and len(shape) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    )
    if not ok:
        raise InputError(
            f"input: {name} needs a 'shape' attribute of two positive integers, got {shape!r}"
        )
    return int(shape[0]), int(shape[1])


def inspect_sparse(group: Any, name: str) -> tuple[SparseLayout, SparseReader]:
    """Check a sparse group's metadata and ``indptr`` (read whole) and plan its blocks.

    Raises
    ------
    InputError
        Unknown encoding, missing arrays, bad dtypes, ``shape``/``indptr``/``data``
        lengths that disagree, or ``indptr`` not starting at 0 or decreasing.
    """
    fmt = sparse_encoding(group)
    if fmt is None:
        enc = group.attrs.get("encoding-type")
        raise InputError(
            f"input: {name} has encoding-type {enc!r}; csr_matrix or csc_matrix is supported"
        )
    shape = _shape(group, name)
    data, indices, indptr = (_member(group, k, name) for k in ("data", "indices", "indptr"))
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "fiu":
        raise InputError(f"input: {name}/data has dtype {dtype}; a real numeric dtype is required")
    for arr, key in ((indices, "indices"), (indptr, "indptr")):
        if np.dtype(arr.dtype).kind not in "iu":
            raise InputError(f"input: {name}/{key} has dtype {arr.dtype}; integers are required")
    major, minor = shape if fmt == "csr" else shape[::-1]
    if indptr.shape[0] != major + 1:
        what = "rows" if fmt == "csr" else "columns"
        raise InputError(
            f"input: {name}/indptr has {indptr.shape[0]} entries; shape {list(shape)} ({fmt}) "
            f"needs {major + 1} ({what} + 1)"
        )
    if data.shape[0] != indices.shape[0]:
        raise InputError(
            f"input: {name}/data has {data.shape[0]} entries but indices has {indices.shape[0]}"
        )
    ptr = np.asarray(indptr[...], dtype=np.int64)
    if ptr[0] != 0 or ptr[-1] != data.shape[0]:
        raise InputError(
            f"input: {name}/indptr runs from {ptr[0]} to {ptr[-1]}; it must run from 0 to "
            f"{data.shape[0]} (the length of data)"
        )
    if ptr.size > 1 and (drop := np.flatnonzero(np.diff(ptr) < 0)).size:
        raise InputError(f"input: {name}/indptr decreases at entry {int(drop[0]) + 1}")
    per_entry = dtype.itemsize + np.dtype(indices.dtype).itemsize
    layout = SparseLayout(
        fmt=fmt,
        shape=shape,
        dtype=dtype,
        nnz=int(ptr[-1]),
        stored_bytes=int(ptr[-1]) * per_entry + ptr.size * 8,
        bounds=plan_blocks(ptr, per_entry),
    )
    reader = SparseReader(data, indices, indptr, minor, name, transposed=fmt == "csc")
    return layout, reader


def plan_blocks(
    ptr: np.ndarray,
    entry_bytes: int,
    target: int | None = None,
    max_rows: int = MAX_BLOCK_ROWS,
) -> tuple[int, ...]:
    """Block edges ``(0, …, major)`` with about ``target`` (default :data:`BLOCK_BYTES`)
    bytes of entries per block.

    Each block takes as many rows as fit in ``target`` (a row heavier than ``target`` is
    a block of its own), and at most ``max_rows`` rows: one binary search per block.
    """
    target = target or BLOCK_BYTES
    major = ptr.size - 1
    cum = np.asarray(ptr, dtype=np.int64) * entry_bytes
    edges, pos = [0], 0
    while pos < major:
        fit = int(np.searchsorted(cum, cum[pos] + target, side="right")) - 1
        pos = min(max(fit, pos + 1), pos + max_rows, major)
        edges.append(pos)
    return tuple(edges)


def _read_block(reader: SparseReader, dtype: np.dtype, block_info: Any = None) -> sp.csr_matrix:
    (r0, r1), _ = block_info[None]["array-location"]
    return reader.read(r0, r1, dtype)


def sparse_array(layout: SparseLayout, reader: SparseReader, dtype: Any) -> da.Array:
    """``A`` as a dask array of ``csr_matrix`` row blocks in ``dtype``, one read per block.

    CSC: the CSR blocks of ``Aᵀ`` transposed and re-blocked into rows of about the same
    stored size (see the module docstring).
    """
    dtype = np.dtype(dtype)
    sizes = tuple(int(d) for d in np.diff(layout.bounds))
    m, n = layout.shape
    minor = n if layout.fmt == "csr" else m
    x = da.map_blocks(
        _read_block,
        reader,
        dtype,
        chunks=(sizes, (minor,)),
        dtype=dtype,
        meta=sp.csr_matrix((0, 0), dtype=dtype),
        name=f"read-sparse-{reader.token}-{dtype}",
    )
    if layout.fmt == "csr":
        return x
    rows = _csc_rows(layout)
    row_chunks = (rows,) * (m // rows) + ((m % rows,) if m % rows else ())
    meta = sp.csr_matrix((0, 0), dtype=dtype)
    # tasks, not P2P: distributed's P2P rechunk moves numpy buffers only
    x = x.T.rechunk((row_chunks, (n,)), method="tasks")
    return x.map_blocks(sp.csr_matrix, dtype=dtype, meta=meta)


def _csc_rows(layout: SparseLayout) -> int:
    """Rows per block for a CSC input: about :data:`BLOCK_BYTES` at the mean row density."""
    per_row = max(layout.stored_bytes / layout.shape[0], 1.0)
    return int(max(1, min(MAX_BLOCK_ROWS, layout.shape[0], BLOCK_BYTES // per_row)))


def _dense(block: sp.spmatrix) -> np.ndarray:
    return block.toarray()


def densified(x: da.Array, block_bytes: int = BLOCK_BYTES) -> da.Array:
    """Sparse row blocks as dense ones of about ``block_bytes`` each (for the methods that
    factorize dense blocks: TSQR, the exact SVD). The sparse blocks are cut to the dense
    size first, so no task densifies more than one dense block."""
    m, n = x.shape
    rows = int(max(1, min(m, block_bytes // (n * x.dtype.itemsize))))
    sizes = (rows,) * (m // rows) + ((m % rows,) if m % rows else ())
    x = x.rechunk((sizes, (n,)), method="tasks")  # P2P moves numpy buffers only
    return x.map_blocks(_dense, dtype=x.dtype, meta=np.empty((0, 0), dtype=x.dtype))
