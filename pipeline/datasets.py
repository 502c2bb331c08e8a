"""Synthetic matrices written chunk by chunk to Zarr (demo data, tests, benchmarks).

Each chunk is generated from its own seed, so memory stays bounded by a chunk and the
result does not depend on how many workers write it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.errors import InputError
from pipeline.io.owners import written_aside
from pipeline.io.stores import is_local, split_url, zarr_store
from pipeline.rating_datasets import write_ratings_local
from pipeline.secrets import redact
from pipeline.sections import MODEL_KINDS, RATING_KINDS, SPARSE_KINDS, InputSpec, SyntheticSpec
from pipeline.sparse_datasets import write_sparse_local

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


def _create(store: Any, x: da.Array, array: str | None) -> zarr.Array:
    """An empty Zarr v3 array for ``x`` in ``store`` (inside a new group when ``array``).

    Every chunk is written, also an all-zero one (``write_empty_chunks``): the store is
    complete, and a stale object of an earlier failed write is overwritten.
    """
    kw: dict[str, Any] = {
        "shape": x.shape,
        "dtype": x.dtype,
        "chunks": x.chunksize,
        "config": {"write_empty_chunks": True},
    }
    if array:
        root = zarr.open_group(store=store, mode="a", zarr_format=3)
        return root.create_array(array, overwrite=True, **kw)
    return zarr.create_array(store=store, overwrite=True, **kw)


def _write_local(path: str, x: da.Array, array: str | None) -> None:
    """Write into a hidden sibling folder, then rename it into place (atomic on one disk)."""
    from zarr.storage import LocalStore

    with written_aside(path) as aside:
        _store_settled(x, _create(LocalStore(aside), x, array))


def _store_settled(x: da.Array, target: zarr.Array) -> None:
    """``da.store`` on threads of this process that have all stopped when it returns or raises.

    Dask raises at the first failed chunk while other chunks are still being written, and a
    chunk written after the caller removed the folder re-creates it (Zarr makes the parent
    folders of every chunk it writes): a failed write left a hidden ``.partial-*`` folder.
    Here the running chunks finish and the queued ones are dropped before the error goes
    on. The target is a local path, so this process's threads are the ones that can write
    it (a Dask cluster's workers may sit on other machines).
    """
    from dask.system import CPU_COUNT

    pool = ThreadPoolExecutor(CPU_COUNT, thread_name_prefix="zf-generate")
    try:
        da.store(x, target, lock=False, scheduler="threads", pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_metadata_last(
    url: str, storage_options: dict | None, x: da.Array, array: str | None
) -> None:
    """Object stores (no rename): chunks first, then the metadata documents, the root last.

    The store is a Zarr store — "exists" for :func:`input_will_be_created` —
    only once every chunk is in place; a failed write leaves no metadata and is
    overwritten by the next attempt.
    """
    from zarr.core.array import AsyncArray
    from zarr.core.sync import sync
    from zarr.storage import MemoryStore, StorePath

    docs: dict[str, Any] = {}
    meta = _create(MemoryStore(docs), x, array)  # the metadata documents, nothing written
    store = zarr_store(url, storage_options, read_only=False)
    target = zarr.Array(
        AsyncArray(
            metadata=meta.metadata,
            store_path=StorePath(store, array or ""),
            config={"write_empty_chunks": True},
        )
    )
    da.store(x, target, lock=False)
    for key in sorted(docs, key=lambda k: -k.count("/")):  # the array's, then the group's
        sync(store.set(key, docs[key]))


def transformer_tensors(layers: int, hidden: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a decoder-like checkpoint (Llama's names): embeddings, per layer
    four attention projections, a gated MLP of width 3 × hidden and two norms, a final norm."""
    h, wide = hidden, 3 * hidden
    out = [("model.embed_tokens.weight", (8 * h, h))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        out += [(f"{pre}.self_attn.{p}_proj.weight", (h, h)) for p in "qkvo"]
        out += [(f"{pre}.mlp.{p}_proj.weight", (wide, h)) for p in ("gate", "up")]
        out += [(f"{pre}.mlp.down_proj.weight", (h, wide))]
        norms = ("input_layernorm", "post_attention_layernorm")
        out += [(f"{pre}.{n}.weight", (h,)) for n in norms]
    return [*out, ("model.norm.weight", (h,))]


def _decaying_weight(shape: tuple[int, ...], tau: float, rng: np.random.Generator) -> np.ndarray:
    """A weight whose singular values decay about as ``exp(−i/τ)``, plus a little noise;
    a vector of norm gains around 1."""
    if len(shape) == 1:
        return 1 + 0.1 * rng.standard_normal(shape)
    m, n = shape
    k = min(m, n)
    scale = np.exp(-np.arange(k) / tau) / np.sqrt(max(m, n))
    left = rng.standard_normal((m, k)) * scale
    return left @ rng.standard_normal((k, n)) + 1e-3 * rng.standard_normal((m, n)) / np.sqrt(n)


def write_transformer(fs: Any, path: str, spec: SyntheticSpec) -> None:
    """A safetensors checkpoint of :func:`transformer_tensors` at ``path`` (float32, or
    float64), attention spectra decaying faster than the MLP's; written aside locally and
    renamed into place, so it appears complete or not at all."""
    from pipeline.io.safetensors import TensorOut, encode, write_checkpoint

    layers, hidden = spec.shape
    code = "F32" if spec.dtype == "float32" else "F64"
    tensors = []
    for i, (name, shape) in enumerate(transformer_tensors(layers, hidden)):
        tau = hidden / (16 if "self_attn" in name else 4)

        def data(i: int = i, shape: tuple[int, ...] = shape, tau: float = tau) -> bytes:
            return encode(_decaying_weight(shape, tau, np.random.default_rng((spec.seed, i))), code)

        nbytes = int(np.prod(shape)) * np.dtype(spec.dtype).itemsize
        tensors.append(TensorOut(name, code, shape, nbytes, data))
    folder, filename = path.rstrip("/").rsplit("/", 1) if "/" in path else (".", path)
    fs.makedirs(folder, exist_ok=True)
    aside = f".{filename}.partial"  # written as <aside>.safetensors, then renamed
    write_checkpoint(fs, folder, aside, tensors, {"format": "pt"}, max_shard_bytes=2**62)
    fs.mv(f"{folder}/{aside}.safetensors", path)


def write_synthetic(
    url: str, spec: SyntheticSpec, storage_options: dict | None = None, array: str | None = None
) -> None:
    """Write the recipe to ``url`` (a Zarr v3 array, or ``array`` inside a new group).

    The store appears complete or not at all: on the local filesystem it is written to a
    hidden sibling folder and renamed into place; on object stores its metadata is written
    after every chunk. A failed write (a full disk, a killed worker) leaves nothing that a
    retry or the next run would take for the input.
    """
    fs, path = split_url(url, storage_options)
    if spec.kind in MODEL_KINDS:
        log.info("writing a %s checkpoint %s to %s", spec.kind, spec.shape, redact(url))
        write_transformer(fs, path, spec)
        return
    if spec.kind in SPARSE_KINDS:
        if not is_local(fs):
            raise InputError(
                f"input.create_if_missing.kind: {spec.kind!r} is written to local paths only; "
                "generate it locally and copy it to the object store"
            )
        log.info("writing %s matrix %s to %s", spec.kind, spec.shape, redact(url))
        write = write_ratings_local if spec.kind in RATING_KINDS else write_sparse_local
        write(path, spec, array)
        return
    x = synthetic_array(spec)
    log.info("writing %s matrix %s to %s", spec.kind, x.shape, redact(url))
    if is_local(fs):
        _write_local(path, x, array)
    else:
        _write_metadata_last(url, storage_options, x, array)


def input_will_be_created(spec: InputSpec) -> bool:
    """True when the input store is absent and ``input.create_if_missing`` will write it.

    Locally the store is renamed into place when complete, so "absent" is "no such path"
    (a folder that holds something else is never overwritten). On object stores its
    metadata is written last (:func:`write_synthetic`), so "absent" is
    "no Zarr metadata at the root": the leftover of a failed write is written again.
    """
    if spec.create_if_missing is None:
        return False
    fs, path = split_url(spec.url, spec.storage_options)
    if is_local(fs) or spec.create_if_missing.kind in MODEL_KINDS:  # one file, put whole
        return not fs.exists(path)
    root = path.rstrip("/")
    return not any(fs.exists(f"{root}/{doc}") for doc in ("zarr.json", ".zgroup", ".zarray"))
