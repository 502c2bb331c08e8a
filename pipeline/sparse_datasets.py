"""Synthetic sparse count matrices written as CSR to Zarr, block by block.

``sparse`` is cell × gene-like: eight cell types, each a distribution over genes on top of
a power-law gene popularity, and a log-normal sequencing depth per cell; a row's counts
are the genes its reads hit (a multinomial draw, so the row's non-zeros grow with depth
and popular genes are dense columns). ``counts`` is a topic model's document × term
matrix: 20 topics drawn from a sparse Dirichlet over terms, each document a Dirichlet
mixture of topics and a log-normal length. Both target ``density`` on average.

The layout is AnnData's (see :mod:`pipeline.io.sparse`). With ``array`` the store is an
AnnData root — ``X`` (the CSR group) plus ``obs``/``var`` dataframes with index only
(``cell_<i>``/``gene_<j>``, or ``doc_<i>``/``term_<j>``) — else a bare CSR group. Rows
are generated in blocks from their own seeds and appended, so memory stays bounded by a
block; local stores appear complete or not at all (written aside, renamed into place).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr

from pipeline.io.anndata_out import ANNDATA, DICT
from pipeline.io.owners import written_aside
from pipeline.sections import SyntheticSpec

BLOCK_ROWS = 4096
ENTRY_CHUNK = 1 << 20  # entries per chunk of data and indices
TYPES, TOPICS = 8, 20
# AnnData's encodings of the elements written here (besides ANNDATA and DICT)
ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}
_SCALAR = {"encoding-type": "numeric-scalar", "encoding-version": "0.2.0"}
_STRING = {"encoding-type": "string", "encoding-version": "0.2.0"}


def _profiles(spec: SyntheticSpec) -> np.ndarray:
    """Per type/topic, a probability distribution over the columns (rows of the result)."""
    n = spec.shape[1]
    rng = np.random.default_rng([spec.seed, 2**31])
    if spec.kind == "counts":
        return rng.dirichlet(np.full(n, 0.05), size=TOPICS)
    popularity = rng.permutation((1.0 + np.arange(n)) ** -0.8)
    marker = np.exp(rng.standard_normal((TYPES, n)))
    p = popularity[None, :] * marker
    return p / p.sum(axis=1, keepdims=True)


def _draws_per_row(spec: SyntheticSpec) -> float:
    """Reads (or words) per row at which distinct columns hit reach about ``density``."""
    n = spec.shape[1]
    target = spec.density * n
    return -n * np.log1p(-min(spec.density, 0.95)) if spec.kind == "sparse" else target * 1.3


def draw(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    """``size`` indices drawn ∝ the weights whose cumulative sum is ``cdf``."""
    picks = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    return np.minimum(picks, cdf.size - 1)


def sparse_block(spec: SyntheticSpec, profiles: np.ndarray, block: int, rows: int) -> sp.csr_matrix:
    """Rows ``block × BLOCK_ROWS …`` of the matrix, from the block's own seed."""
    n = spec.shape[1]
    rng = np.random.default_rng([spec.seed, block])
    depth = rng.lognormal(0.0, 0.5, rows)
    draws = rng.poisson(_draws_per_row(spec) * depth / np.exp(0.125))
    if spec.kind == "counts":
        theta = rng.dirichlet(np.full(TOPICS, 0.1), size=rows)
        per_source = np.array([rng.multinomial(d, t) for d, t in zip(draws, theta, strict=True)])
    else:
        kind = rng.integers(0, TYPES, rows)
        per_source = np.zeros((rows, TYPES), dtype=np.int64)
        per_source[np.arange(rows), kind] = draws
    row_ids, cols = [], []
    for t in range(profiles.shape[0]):
        counts = per_source[:, t]
        total = int(counts.sum())
        if not total:
            continue
        cols.append(draw(rng, np.cumsum(profiles[t]), total))
        row_ids.append(np.repeat(np.arange(rows), counts))
    r = np.concatenate(row_ids) if row_ids else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    out = sp.csr_matrix((np.ones(r.size, dtype=spec.dtype), (r, c)), shape=(rows, n))
    out.sum_duplicates()  # repeated hits of one column are its count
    return out


def _index_frame(group: Any, name: str, labels: list[str]) -> None:
    """An AnnData dataframe with an index only."""
    frame = group.create_group(
        name,
        attributes={
            "_index": "_index",
            "column-order": [],
            "encoding-type": "dataframe",
            "encoding-version": "0.2.0",
        },
    )
    arr = frame.create_array(
        "_index",
        shape=(len(labels),),
        dtype=str,
        attributes={"encoding-type": "string-array", "encoding-version": "0.2.0"},
    )
    arr[...] = np.array(labels, dtype=object)


class CsrWriter:
    """A CSR matrix in AnnData's encoding, appended row block by row block.

    ``data`` and ``indices`` grow with each block (chunks of ``ENTRY_CHUNK`` entries);
    ``indptr`` is kept in memory (``m + 1`` entries) and written by :meth:`close`. Both
    index arrays are int32 when ``max_entries`` (the entries expected at most) fits, else
    int64 — one dtype, as scipy makes them (scipy refuses mixed index dtypes in ``tocoo``
    and friends) — unless ``indptr_dtype`` sets indptr's.
    """

    def __init__(
        self,
        group: Any,
        shape: tuple[int, int],
        dtype: str,
        max_entries: int,
        indptr_dtype: Any = None,
    ) -> None:
        m, n = shape
        small = max(max_entries, n) <= np.iinfo(np.int32).max
        index_dtype = np.dtype(np.int32 if small else np.int64)
        self.indptr_dtype = np.dtype(indptr_dtype or index_dtype)
        group.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [m, n]}
        )
        self.group = group
        self.shape = shape
        self.data = group.create_array("data", shape=(0,), dtype=dtype, chunks=(ENTRY_CHUNK,))
        self.indices = group.create_array(
            "indices", shape=(0,), dtype=index_dtype, chunks=(ENTRY_CHUNK,)
        )
        self.indptr = np.zeros(m + 1, dtype=np.int64)
        self.rows = 0

    def append(self, block: sp.csr_matrix) -> None:
        """The next ``block.shape[0]`` rows (canonical CSR: sorted, no duplicates)."""
        r0, rows = self.rows, block.shape[0]
        lo = int(self.indptr[r0])
        hi = lo + block.nnz
        if hi > np.iinfo(self.indptr_dtype).max:
            raise RuntimeError(f"CSR writer: {hi} entries overflow {self.indptr_dtype} indices")
        self.data.resize((hi,))
        self.indices.resize((hi,))
        self.data[lo:hi] = block.data.astype(self.data.dtype, copy=False)
        self.indices[lo:hi] = block.indices
        self.indptr[r0 + 1 : r0 + rows + 1] = lo + block.indptr[1:]
        self.rows += rows

    def close(self) -> int:
        """Write ``indptr``; the number of stored entries."""
        if self.rows != self.shape[0]:
            raise RuntimeError(f"CSR writer got {self.rows} of {self.shape[0]} rows")
        ptr = self.group.create_array(
            "indptr", shape=self.indptr.shape, dtype=self.indptr_dtype, chunks=(ENTRY_CHUNK,)
        )
        ptr[...] = self.indptr.astype(self.indptr_dtype)
        return int(self.indptr[-1])


def anndata_skeleton(
    root: Any, obs_names: list[str], var_names: list[str], matrix: str = "X"
) -> Any:
    """Make ``root`` an AnnData root: ``obs``/``var`` with these names, the dict groups
    empty; returns the (empty) group of the matrix, to be filled by :class:`CsrWriter`."""
    root.attrs.update(ANNDATA)
    _index_frame(root, "obs", obs_names)
    _index_frame(root, "var", var_names)
    for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        root.create_group(name, attributes=DICT)
    return root.require_group(matrix)


def write_uns(group: Any, values: dict[str, Any]) -> None:
    """Scalars, strings and 1-D arrays into an AnnData ``uns`` dict group."""
    for key, value in values.items():
        if isinstance(value, str):
            arr = group.create_array(key, shape=(), dtype=str, attributes=_STRING)
        elif isinstance(value, np.ndarray):
            arr = group.create_array(key, shape=value.shape, dtype=value.dtype, attributes=ARRAY)
        else:
            value = np.asarray(value)
            arr = group.create_array(key, shape=(), dtype=value.dtype, attributes=_SCALAR)
        arr[...] = value


def write_sparse_local(path: str, spec: SyntheticSpec, array: str | None) -> None:
    """Write the recipe into a hidden sibling folder, then rename it into place."""
    m, n = spec.shape
    with written_aside(path) as aside:
        group = zarr.open_group(aside, mode="w", zarr_format=3)
        if array:
            rows, cols = ("doc", "term") if spec.kind == "counts" else ("cell", "gene")
            obs, var = [f"{rows}_{i}" for i in range(m)], [f"{cols}_{j}" for j in range(n)]
            group = anndata_skeleton(group, obs, var, array)
        # int32 indices (columns), int64 indptr
        writer = CsrWriter(group, (m, n), spec.dtype, 0, indptr_dtype=np.int64)
        profiles = _profiles(spec)
        for b, r0 in enumerate(range(0, m, BLOCK_ROWS)):
            writer.append(sparse_block(spec, profiles, b, min(BLOCK_ROWS, m - r0)))
        writer.close()


def cell_type_counts(
    m: int,
    n: int,
    types: int = 10,
    density: float = 0.05,
    seed: int = 0,
    dtype: Any = np.float64,
) -> sp.csr_matrix:
    """Poisson counts (CSR) of ``types`` cell types, as single-cell data: cell ``c`` of type
    ``t`` has rates ``depth_c · p_t``, ``p_t`` a gene profile (a mild power-law gene
    popularity times log-normal markers), ``depth`` log-normal (σ 0.1), scaled to about
    ``density`` non-zeros.

    Its centred spectrum is flat as count data's is — the cell-type components within a
    few % of each other over a Poisson-noise bulk (issue 20's matrix had λ₂/λ₁ = 0.94,
    λ₂₀/λ₂₁ = 1.003) — the hard case of randomized PCA (tests and ``bench_rsvd.py``).
    """
    rng = np.random.default_rng(seed)
    popularity = rng.permutation((1.0 + np.arange(n)) ** -0.1)
    profiles = popularity * np.exp(0.5 * rng.standard_normal((types, n)))
    profiles /= profiles.sum(axis=1, keepdims=True)
    rates = rng.lognormal(0.0, 0.1, m)[:, None] * profiles[rng.integers(0, types, m)]
    lo, hi = 1.0, 1e8  # the scale at which a Poisson draw is non-zero with `density`
    for _ in range(50):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if np.mean(-np.expm1(-mid * rates[:500])) < density else (lo, mid)
    return sp.csr_matrix(rng.poisson(mid * rates).astype(dtype))
