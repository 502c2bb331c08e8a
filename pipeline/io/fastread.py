"""Direct chunk reads for plain Zarr arrays: object bytes from fsspec, decoded by numcodecs.

zarr-python 3 reads a chunk on its own event-loop thread and decodes it into a buffer that
is then copied into the result; for the large chunks this pipeline reads, that is a third
of a worker's read time (measured: 25 × 64 MiB zstd chunks on 2 workers, 3.2–3.3 s through
zarr, 1.7–2.1 s direct). The direct path covers the common layouts — Zarr v2 (numcodecs
compressor and filters, C or F order) and Zarr v3 (``bytes`` + at most one of zstd, gzip,
blosc), regular chunk grid, no sharding, native byte order — and decodes into a fresh,
writable array. Anything else is read through zarr (:func:`plan` returns ``None``).
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numcodecs
import numpy as np

_V3_COMPRESSORS = {"zstd": numcodecs.Zstd, "gzip": numcodecs.GZip, "blosc": numcodecs.Blosc}


@dataclass(frozen=True)
class ChunkReader:
    """How to turn a chunk index into an array: everything pickles to the workers."""

    fs: Any
    root: str  # the array's folder in ``fs``
    keys: Any  # metadata with ``encode_chunk_key((i, j))``
    chunk_shape: tuple[int, int]
    dtype: np.dtype
    order: str
    fill_value: Any
    compressor: Any | None
    filters: tuple[Any, ...] = ()
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # never reuse keys across opens

    def __dask_tokenize__(self) -> str:
        return self.token

    def read(self, i: int, j: int, shape: tuple[int, int]) -> np.ndarray:
        """Chunk ``(i, j)`` cut to ``shape`` (edge chunks are stored padded)."""
        path = f"{self.root}/{self.keys.encode_chunk_key((i, j))}"
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:  # never written: the fill value
            return np.full(shape, self.fill_value, dtype=self.dtype)
        nbytes = self.chunk_shape[0] * self.chunk_shape[1] * self.dtype.itemsize
        if self.compressor is not None:
            buf = self.compressor.decode(raw, out=np.empty(nbytes, dtype=np.uint8))
        else:
            buf = bytearray(raw)
        for f in reversed(self.filters):
            buf = f.decode(buf)
        chunk = np.frombuffer(buf, dtype=self.dtype).reshape(self.chunk_shape, order=self.order)
        if tuple(shape) != self.chunk_shape:
            chunk = np.ascontiguousarray(chunk[: shape[0], : shape[1]])
        return chunk


def _native(dtype: np.dtype) -> bool:
    return dtype.byteorder in ("=", "|") or dtype.byteorder == (
        "<" if sys.byteorder == "little" else ">"
    )


def plan(arr: Any, fs: Any, root: str) -> ChunkReader | None:
    """A :class:`ChunkReader` for ``arr`` stored at ``root`` in ``fs``, or ``None``."""
    md = arr.metadata
    dtype = np.dtype(arr.dtype)
    if arr.ndim != 2 or not _native(dtype) or dtype.kind not in "fiu":
        return None
    chunk_shape = tuple(int(c) for c in arr.chunks)
    if md.zarr_format == 2:
        compressor, filters, order = md.compressor, tuple(md.filters or ()), md.order
    else:
        grid = type(md.chunk_grid).__name__
        codecs = list(md.codecs)
        first = type(codecs[0]).__name__ if codecs else ""
        if grid != "RegularChunkGrid" or first != "BytesCodec" or len(codecs) > 2:
            return None
        endian = getattr(codecs[0].endian, "value", codecs[0].endian)
        if endian not in (None, sys.byteorder):
            return None
        compressor, filters, order = None, (), "C"
        if len(codecs) == 2:
            name = codecs[1].to_dict().get("name")
            if name not in _V3_COMPRESSORS:
                return None
            compressor = _V3_COMPRESSORS[name]()  # decoding needs no parameters
    fill = md.fill_value if md.fill_value is not None else 0
    return ChunkReader(
        fs=fs,
        root=root.rstrip("/"),
        keys=md,
        chunk_shape=chunk_shape,
        dtype=dtype,
        order=order,
        fill_value=fill,
        compressor=compressor,
        filters=filters,
    )


def _read_block(reader: ChunkReader, block_info: Any = None) -> np.ndarray:
    info = block_info[None]
    i, j = info["chunk-location"]
    return reader.read(i, j, info["chunk-shape"])


def read_array(reader: ChunkReader, shape: tuple[int, int]) -> da.Array:
    """The whole array as a dask array with the storage chunks, one task per chunk."""
    chunks = da.core.normalize_chunks(reader.chunk_shape, shape)
    return da.map_blocks(
        _read_block,
        reader,
        chunks=chunks,
        dtype=reader.dtype,
        meta=np.empty((0, 0), dtype=reader.dtype),
        name=f"read-zarr-{reader.token}",
    )
