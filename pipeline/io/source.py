"""Open the input matrix, validate it, and return it as a dask array."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.backend import empty_meta, to_device
from pipeline.errors import InputError
from pipeline.io.fastread import plan, read_array
from pipeline.io.sparse import inspect_sparse, sparse_array, sparse_encoding
from pipeline.io.stores import Location, location_of
from pipeline.linalg import working_dtype
from pipeline.secrets import redact
from pipeline.sections import InputSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputManifest:
    """What was opened: small, JSON-able, safe to log (URL credentials redacted)."""

    url: str
    array: str | None
    shape: tuple[int, int]
    chunks: tuple[int, int]
    dtype: str
    zarr_format: int
    fingerprint: str | None = None  # set by the run (see pipeline.fingerprint)
    format: str = "dense"  # dense, csr or csc (see pipeline.io.sparse)
    nnz: int | None = None  # sparse: stored entries
    density: float | None = None  # sparse: nnz / (rows × cols)
    stored_bytes: int | None = None  # sparse: data + indices + indptr in memory

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["shape"], d["chunks"] = list(self.shape), list(self.chunks)
        return d

    def describe(self) -> str:
        """One line for logs: array, shape, dtype and chunks."""
        return (
            f"{f'[{self.array}] ' if self.array else ''}{'×'.join(map(str, self.shape))} "
            f"{self.dtype} chunks {'×'.join(map(str, self.chunks))}"
        )


def locate_input(spec: InputSpec) -> Location:
    """The input's :class:`~pipeline.io.stores.Location`.

    Raises
    ------
    InputError
        An unknown protocol or a filesystem driver not installed.
    """
    try:
        return location_of(spec)
    except (ValueError, ImportError) as exc:
        raise InputError(f"input.url: cannot open {redact(spec.url)!r}: {exc}") from None


def _open_node(spec: InputSpec, at: Location) -> tuple[Any, InputSpec]:
    """The Zarr array or sparse group named by ``spec`` at ``at`` (store may be v2 or v3),
    and the spec with ``array`` filled in (``X`` for an AnnData root given without one)."""
    where, fs, path = at.display, at.fs, at.path
    try:
        exists = fs.exists(path)
    except Exception as exc:  # network/credential errors from object stores
        raise InputError(f"input.url: cannot reach {where!r}: {exc}") from None
    if not exists:
        raise InputError(f"input.url: {where!r} does not exist")
    store = at.zarr_store(read_only=True)
    try:
        node = zarr.open(store=store, mode="r")
    except Exception as exc:
        raise InputError(f"input.url: {where!r} is not a Zarr store ({exc})") from None
    if spec.array is None and isinstance(node, zarr.Group):
        if node.attrs.get("encoding-type") == "anndata":
            spec = spec.model_copy(update={"array": "X"})
        elif sparse_encoding(node):
            return node, spec
    if spec.array is None:
        if isinstance(node, zarr.Group):
            names = sorted(name for name, _ in node.arrays())
            hint = f"; it holds arrays: {', '.join(names)}" if names else " with no arrays"
            raise InputError(
                f"input.array: {where!r} is a Zarr group; set input.array to one of its "
                f"arrays{hint}"
            )
        return node, spec
    if not isinstance(node, zarr.Group):
        raise InputError(
            f"input.array: {where!r} is itself an array; remove input.array (got {spec.array!r})"
        )
    try:
        arr = node[spec.array]
    except KeyError:
        names = sorted(name for name, _ in node.arrays())
        raise InputError(
            f"input.array: {spec.array!r} not found in {where!r}"
            + (f"; it holds arrays: {', '.join(names)}" if names else "; it holds no arrays")
        ) from None
    if isinstance(arr, zarr.Group) and "encoding-type" in arr.attrs:
        return arr, spec  # a sparse matrix (anything else is refused by inspect_sparse)
    if not isinstance(arr, zarr.Array):
        raise InputError(f"input.array: {spec.array!r} in {where!r} is a group, not an array")
    return arr, spec


def array_name(spec: InputSpec) -> str:
    """The input array in messages: the redacted URL, plus ``/array`` inside a group."""
    return f"{redact(spec.url)}" + (f"/{spec.array}" if spec.array else "")


def _check_array(arr: Any, spec: InputSpec) -> None:
    name = array_name(spec)
    if arr.ndim != 2:
        raise InputError(
            f"input: {name} must be a 2-D matrix; got {arr.ndim}-D with shape {tuple(arr.shape)}"
        )
    if 0 in arr.shape:
        raise InputError(f"input: {name} is empty (shape {tuple(arr.shape)})")
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "fiu":
        what = "complex" if dtype.kind == "c" else "non-numeric"
        raise InputError(
            f"input: {name} has {what} dtype {dtype}; a real numeric dtype "
            "(float or integer) is required"
        )


def _missing_chunks(arr: Any, fs: Any, root: str) -> tuple[int, int, tuple[int, ...] | None]:
    """``(missing, total, first missing index)`` over the stored objects of ``arr``.

    One listing of the array's folder. A stored object is a chunk, or a whole shard for a
    sharded array (chunks omitted inside a stored shard are not seen). zarr's
    ``nchunks_initialized`` counts the same objects, but gives no index (and multiplies
    shards by chunks per shard, which overcounts partial edge shards).
    """
    root = root.rstrip("/")
    # with folders: a folder in place of a chunk is reported by the reader as one
    stored = {p[len(root) + 1 :] for p in fs.find(root, withdirs=True)}
    outer = arr.shards or arr.chunks
    grid = [range(math.ceil(s / c)) for s, c in zip(arr.shape, outer, strict=True)]
    missing, first, total = 0, None, 0
    for idx in itertools.product(*grid):
        total += 1
        if arr.metadata.encode_chunk_key(idx) not in stored:
            missing += 1
            first = first or idx
    return missing, total, first


def check_stored_chunks(arr: Any, spec: InputSpec, fs: Any, root: str) -> None:
    """Refuse (``missing_chunks: error``) or warn about (``fill``) chunks absent from the store.

    Raises
    ------
    InputError
        With ``input.missing_chunks: error`` and at least one chunk missing.
    """
    try:
        missing, total, first = _missing_chunks(arr, fs, root)
    except PermissionError as exc:  # e.g. s3:GetObject allowed, s3:ListBucket not
        if spec.missing_chunks == "fill":
            log.warning("input: not allowed to list %s to count its chunks", array_name(spec))
            return
        raise InputError(
            f"input: not allowed to list {array_name(spec)} to check that no chunk is missing "
            f"({type(exc).__name__}); with input.missing_chunks: fill the check is skipped"
        ) from None
    if not missing:
        return
    unit = "shard" if arr.shards else "chunk"
    fill = arr.metadata.fill_value
    if spec.missing_chunks == "fill":
        log.warning(
            "input: %s has %d of %d %ss missing; they read as the fill value %s "
            "(input.missing_chunks: fill)",
            array_name(spec),
            missing,
            total,
            unit,
            fill,
        )
        return
    raise InputError(
        f"input: {array_name(spec)} has {missing} of {total} {unit}s missing (first: "
        f"{tuple(first)}); a Zarr store omits chunks equal to its fill value ({fill}), and "
        "zarr-python 3 does so by default (write_empty_chunks=False: an all-zero block it "
        "writes is missing) — if this store is meant to be sparse, set "
        "input.missing_chunks: fill"
    )


def open_matrix(
    spec: InputSpec,
    *,
    check_chunks: bool = False,
    on_device: bool = False,
    at: Location | None = None,
) -> tuple[da.Array, InputManifest]:
    """Open and validate the input, without reading its values.

    ``at`` is the input's location when the caller has made it (see
    :func:`locate_input`), else it is made here.

    Integers are cast to float64, float16 to float32; float32 and float64 stay as stored.
    The dask chunks are the storage chunks, read directly where the layout allows it
    (:mod:`pipeline.io.fastread`), else through zarr. With ``check_chunks`` the store is
    listed once and missing chunks are refused or counted (:func:`check_stored_chunks`).
    With ``on_device`` the blocks are device arrays: each chunk is copied to the device
    as stored and cast there (see :mod:`pipeline.backend`).

    Returns
    -------
    (array, manifest)

    Raises
    ------
    InputError
        Missing store or array, not 2-D, empty, a non-real-numeric dtype, or (with
        ``check_chunks``) missing chunks.
    """
    at = at or locate_input(spec)
    arr, spec = _open_node(spec, at)
    fs, root = at.fs, at.path
    root = f"{root.rstrip('/')}/{spec.array}" if spec.array else root
    if isinstance(arr, zarr.Group):
        return _open_sparse(arr, spec, fs, root, check_chunks=check_chunks, on_device=on_device)
    _check_array(arr, spec)
    if check_chunks:
        check_stored_chunks(arr, spec, fs, root)
    reader = plan(arr, fs, root, name=array_name(spec), missing=spec.missing_chunks)
    dtype = np.dtype(arr.dtype)
    work = working_dtype(dtype)  # the library's one rule: ints → f64, f16 → f32
    if reader:
        x = read_array(reader, tuple(arr.shape), work, on_device=on_device)
    else:
        x = da.from_zarr(arr)
        if on_device:
            x = x.map_blocks(to_device, work, dtype=work, meta=empty_meta(work, True))
        elif work != dtype:
            x = x.astype(work)
    manifest = InputManifest(
        url=redact(spec.url),
        array=spec.array,
        shape=(int(arr.shape[0]), int(arr.shape[1])),
        chunks=(int(arr.chunks[0]), int(arr.chunks[1])),
        dtype=str(dtype),
        zarr_format=int(arr.metadata.zarr_format),
    )
    return x, manifest


def _open_sparse(
    group: Any, spec: InputSpec, fs: Any, root: str, *, check_chunks: bool, on_device: bool
) -> tuple[da.Array, InputManifest]:
    """A sparse CSR/CSC group as a dask array of sparse row blocks (:mod:`pipeline.io.sparse`)."""
    name = array_name(spec)
    layout, reader = inspect_sparse(group, name)
    if on_device:
        raise InputError(
            f"input: {name} is sparse; the device backend takes dense input only — "
            "set compute.backend: numpy"
        )
    if check_chunks:
        for key in ("data", "indices", "indptr"):
            part = spec.model_copy(update={"array": f"{spec.array or ''}/{key}".lstrip("/")})
            check_stored_chunks(group[key], part, fs, f"{root.rstrip('/')}/{key}")
    work = working_dtype(layout.dtype)
    x = sparse_array(layout, reader, work)
    manifest = InputManifest(
        url=redact(spec.url),
        array=spec.array,
        shape=layout.shape,
        chunks=(int(x.chunks[0][0]), layout.shape[1]),
        dtype=str(layout.dtype),
        zarr_format=int(group.metadata.zarr_format),
        format=layout.fmt,
        nnz=layout.nnz,
        density=layout.density,
        stored_bytes=layout.stored_bytes,
    )
    return x, manifest
