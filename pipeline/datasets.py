"""Synthetic matrices written chunk by chunk to Zarr (demo data, tests, benchmarks).

Each chunk is generated from its own seed, so memory stays bounded by a chunk and the
result does not depend on how many workers write it.
"""

from __future__ import annotations

import logging
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.config import SyntheticSpec
from pipeline.errors import InputError
from pipeline.io.stores import zarr_store

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 32 * 2**20


def _default_chunks(shape: tuple[int, int], itemsize: int) -> tuple[int, int]:
    rows = max(1, min(shape[0], DEFAULT_CHUNK_BYTES // (shape[1] * itemsize)))
    return rows, shape[1]


def _lowrank_basis(n: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal right factor (rank × n) and a decaying spectrum shared by all blocks."""
    rng = np.random.default_rng([seed, 2**31])
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    spectrum = 1.0 / (1.0 + np.arange(rank)) ** 1.5
    return v.T, spectrum


def _block(
    kind: str,
    seed: int,
    block_id: tuple[int, int],
    start: int,
    shape: tuple[int, int],
    n_total: int,
    dtype: str,
    extra: Any,
) -> np.ndarray:
    m, n = shape
    rng = np.random.default_rng([seed, *block_id])
    if kind == "gaussian":
        out = rng.standard_normal((m, n))
    elif kind == "vandermonde":
        x = (start + np.arange(m)) / max(1, extra["rows"] - 1)
        out = x[:, None] ** np.arange(n_total)[None, block_id[1] * extra["cols"] :][:, :n]
    elif kind == "nonnegative":  # W₀H₀ + noise, W₀ per block, H₀ shared
        h0 = np.random.default_rng([seed, 2**31]).random((10, n_total))
        w0 = rng.random((m, 10))
        out = w0 @ h0[:, block_id[1] * extra["cols"] :][:, :n] + 0.1 * rng.random((m, n))
    else:  # lowrank: A = U diag(s) Vᵀ + 1e-3 noise, U ~ Gaussian/√m
        vt, s = extra["vt"], extra["s"]
        u = rng.standard_normal((m, len(s))) / np.sqrt(extra["rows"])
        out = (u * s) @ vt[:, block_id[1] * extra["cols"] :][:, :n]
        out += 1e-3 * rng.standard_normal((m, n)) / np.sqrt(extra["rows"])
    return out.astype(dtype, copy=False)


def packaged_matrix(kind: str) -> np.ndarray:
    """A real matrix that ships with scikit-learn (no download)."""
    try:
        from sklearn import datasets
    except ImportError:
        raise InputError(
            f"input.create_if_missing.kind: {kind!r} needs scikit-learn; "
            "pip install scikit-learn (it is in the test extra)"
        ) from None
    if kind == "digits":
        return datasets.load_digits().data.astype(np.float64)
    image = datasets.load_sample_image("china.jpg").astype(np.float64)
    return image @ np.array([0.299, 0.587, 0.114])  # grey levels, 427 × 640


def synthetic_array(spec: SyntheticSpec) -> da.Array:
    """A lazy dask array of the recipe, chunked like the store it will be written to."""
    dtype = np.dtype(spec.dtype)
    if spec.shape is None:  # packaged data
        data = packaged_matrix(spec.kind).astype(dtype)
        return da.from_array(data, chunks=spec.chunks or data.shape)
    m, n = spec.shape
    chunks = spec.chunks or _default_chunks(spec.shape, dtype.itemsize)
    if spec.kind == "lowrank" and chunks[1] != n:
        chunks = (chunks[0], n)
    extra: dict[str, Any] = {"rows": m, "cols": chunks[1]}
    if spec.kind == "lowrank":
        extra["vt"], extra["s"] = _lowrank_basis(n, min(m, n, 100), spec.seed)
    template = da.empty((m, n), chunks=chunks, dtype=dtype)

    def make(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        info = block_info[0]
        (r0, _), _ = info["array-location"]
        return _block(
            spec.kind, spec.seed, info["chunk-location"], r0, block.shape, n, spec.dtype, extra
        )

    return da.map_blocks(make, template, dtype=dtype, meta=np.empty((0, 0), dtype))


def write_synthetic(
    url: str, spec: SyntheticSpec, storage_options: dict | None = None, array: str | None = None
) -> None:
    """Write the recipe to ``url`` (a Zarr v3 array, or ``array`` inside a new group)."""
    x = synthetic_array(spec)
    store = zarr_store(url, storage_options, read_only=False)
    if array:
        root = zarr.open_group(store=store, mode="a", zarr_format=3)
        target = root.create_array(
            array, shape=x.shape, dtype=x.dtype, chunks=x.chunksize, overwrite=True
        )
    else:
        target = zarr.create_array(
            store=store, shape=x.shape, dtype=x.dtype, chunks=x.chunksize, overwrite=True
        )
    log.info("writing %s matrix %s to %s", spec.kind, x.shape, url)
    da.store(x, target, lock=False)
