"""Open the input matrix, validate it, and return it as a dask array."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.config import InputSpec, redact
from pipeline.errors import InputError
from pipeline.io.fastread import plan, read_array
from pipeline.io.stores import split_url, zarr_store
from pipeline.linalg import working_dtype


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["shape"], d["chunks"] = list(self.shape), list(self.chunks)
        return d


def _open_node(spec: InputSpec) -> Any:
    """The Zarr array named by ``spec`` (store may be v2 or v3)."""
    where = redact(spec.url)
    try:
        fs, path = split_url(spec.url, spec.storage_options)
    except (ValueError, ImportError) as exc:
        raise InputError(f"input.url: cannot open {where!r}: {exc}") from None
    try:
        exists = fs.exists(path)
    except Exception as exc:  # network/credential errors from object stores
        raise InputError(f"input.url: cannot reach {where!r}: {exc}") from None
    if not exists:
        raise InputError(f"input.url: {where!r} does not exist")
    store = zarr_store(spec.url, spec.storage_options, read_only=True)
    try:
        node = zarr.open(store=store, mode="r")
    except Exception as exc:
        raise InputError(f"input.url: {where!r} is not a Zarr store ({exc})") from None
    if spec.array is None:
        if isinstance(node, zarr.Group):
            names = sorted(name for name, _ in node.arrays())
            hint = f"; it holds arrays: {', '.join(names)}" if names else " with no arrays"
            raise InputError(
                f"input.array: {where!r} is a Zarr group; set input.array to one of its "
                f"arrays{hint}"
            )
        return node
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
    if not isinstance(arr, zarr.Array):
        raise InputError(f"input.array: {spec.array!r} in {where!r} is a group, not an array")
    return arr


def _check_array(arr: Any, spec: InputSpec) -> None:
    name = f"{redact(spec.url)}" + (f"/{spec.array}" if spec.array else "")
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


def open_matrix(spec: InputSpec) -> tuple[da.Array, InputManifest]:
    """Open and validate the input, without reading its values.

    Integers are cast to float64, float16 to float32; float32 and float64 stay as stored.
    The dask chunks are the storage chunks, read directly where the layout allows it
    (:mod:`pipeline.io.fastread`), else through zarr.

    Returns
    -------
    (array, manifest)

    Raises
    ------
    InputError
        Missing store or array, not 2-D, empty, or a non-real-numeric dtype.
    """
    arr = _open_node(spec)
    _check_array(arr, spec)
    fs, root = split_url(spec.url, spec.storage_options)
    reader = plan(arr, fs, f"{root.rstrip('/')}/{spec.array}" if spec.array else root)
    x = read_array(reader, tuple(arr.shape)) if reader else da.from_zarr(arr)
    dtype = np.dtype(arr.dtype)
    if working_dtype(dtype) != dtype:  # the library's one rule: ints → f64, f16 → f32
        x = x.astype(working_dtype(dtype))
    manifest = InputManifest(
        url=redact(spec.url),
        array=spec.array,
        shape=(int(arr.shape[0]), int(arr.shape[1])),
        chunks=(int(arr.chunks[0]), int(arr.chunks[1])),
        dtype=str(dtype),
        zarr_format=int(arr.metadata.zarr_format),
    )
    return x, manifest
