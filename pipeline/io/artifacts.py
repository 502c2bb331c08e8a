"""Atomic result folders: ``<output.url>/<name>/`` with ``factors.zarr`` and ``metrics.json``.

Everything is written into a hidden staging folder beside the final one and moved into
place only when the run succeeded. On a local filesystem the move is one ``rename``, so
``<name>/`` either does not exist or is complete. On object stores (no atomic rename)
the files are moved with ``metrics.json`` last: a result is complete exactly when its
``metrics.json`` exists with ``"status": "completed"``.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.backend import to_host
from pipeline.config import OutputSpec, redact
from pipeline.errors import ArtifactExistsError
from pipeline.io.stores import is_local, split_url, zarr_store

log = logging.getLogger(__name__)

FACTORS = "factors.zarr"
METRICS = "metrics.json"


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def check_output_free(spec: OutputSpec, name: str) -> None:
    """Refuse early when ``<url>/<name>`` exists and ``overwrite`` is false.

    Raises
    ------
    ArtifactExistsError
    """
    fs, root = split_url(spec.url, spec.storage_options)
    final = _join(root, name)
    if not spec.overwrite and fs.exists(final):
        raise ArtifactExistsError(
            f"output: {redact(_join(spec.url, name))} already exists; "
            "set output.overwrite: true to replace it, or change name"
        )


def read_published(spec: OutputSpec, name: str) -> dict[str, Any] | None:
    """The ``metrics.json`` of a complete result at ``<url>/<name>/``, else ``None``."""
    fs, root = split_url(spec.url, spec.storage_options)
    try:
        metrics = json.loads(fs.cat_file(_join(root, name, METRICS)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return metrics if metrics.get("status") == "completed" else None


class RunOutput:
    """The staging folder of one run, published atomically by :meth:`publish`.

    Parameters
    ----------
    spec : where results go
    name : the job name (the final folder's name)
    """

    def __init__(self, spec: OutputSpec, name: str, staging: str | None = None) -> None:
        self.spec = spec
        self.name = name
        self.fs, self.root = split_url(spec.url, spec.storage_options)
        self.final = _join(self.root, name)
        self.staging = staging or _join(self.root, f".{name}.partial-{uuid.uuid4().hex[:12]}")
        self._group: zarr.Group | None = None

    @property
    def staging_url(self) -> str:
        """fsspec URL (or local path) of the staging folder."""
        return self._url(self.staging)

    @property
    def final_url(self) -> str:
        """fsspec URL (or local path) of the published folder."""
        return self._url(self.final)

    def _url(self, path: str) -> str:
        if is_local(self.fs):
            return path
        return self.fs.unstrip_protocol(path)

    def begin(self) -> None:
        """Create the staging folder and an empty ``factors.zarr`` group."""
        check_output_free(self.spec, self.name)
        self.fs.makedirs(self.staging, exist_ok=False)
        store = zarr_store(
            _join(self.staging_url, FACTORS), self.spec.storage_options, read_only=False
        )
        self._group = zarr.open_group(store=store, mode="w", zarr_format=3)

    @property
    def group(self) -> zarr.Group:
        """The staging ``factors.zarr`` root group (reopened when resumed by path)."""
        if self._group is None:
            if not self.fs.exists(_join(self.staging, FACTORS)):
                raise RuntimeError("RunOutput.begin() was not called")
            store = zarr_store(
                _join(self.staging_url, FACTORS), self.spec.storage_options, read_only=False
            )
            self._group = zarr.open_group(store=store, mode="r+")
        return self._group

    def factor_array(
        self, method: str, name: str, x: Any, dims: tuple[str, ...], attrs: dict | None = None
    ) -> Any:
        """Write a small factor now, or return a lazy store of a dask array.

        Returns
        -------
        ``None`` for in-memory arrays (already written); for dask arrays a ``Delayed``
        that writes it when computed (compute it together with the metrics that read
        the same blocks, so the input is read once).
        """
        sub = self.group.require_group(method)
        if isinstance(x, da.Array):
            x = _aligned_to_regular_chunks(x)
            chunks = tuple(c[0] for c in x.chunks)
        else:
            x = to_host(x)
            chunks = x.shape
        arr = sub.create_array(
            name,
            shape=x.shape,
            dtype=x.dtype,
            chunks=chunks,
            dimension_names=dims,
            attributes=attrs or {},
            overwrite=True,
        )
        if isinstance(x, da.Array):
            return da.store(x, arr, lock=False, compute=False)
        arr[...] = np.asarray(x)
        return None

    def write_json(self, filename: str, payload: dict[str, Any]) -> None:
        """Write a JSON file into the staging folder."""
        with self.fs.open(_join(self.staging, filename), "w") as f:
            json.dump(payload, f, indent=2, default=_json_default)
            f.write("\n")

    def write_bytes(self, filename: str, data: bytes) -> None:
        """Write a binary file (a plot) into the staging folder."""
        with self.fs.open(_join(self.staging, filename), "wb") as f:
            f.write(data)

    def publish(self, metrics: dict[str, Any]) -> str:
        """Write ``metrics.json`` and move the staging folder into place.

        An existing result is replaced only with ``overwrite: true``, and only now, after
        the new one is complete. Returns the final URL.
        """
        with warnings.catch_warnings():  # xarray reads v3 consolidated metadata fine
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.group.store)
        self.write_json(METRICS, metrics)
        exists = self.fs.exists(self.final)
        if exists and not self.spec.overwrite:
            raise ArtifactExistsError(
                f"output: {redact(self._url(self.final))} appeared while this run was "
                "computing; the new result is left out of place at "
                f"{redact(self.staging_url)}"
            )
        old = None
        if exists:
            old = _join(self.root, f".{self.name}.old-{uuid.uuid4().hex[:12]}")
            self._move(self.final, old)
        self._move(self.staging, self.final)
        if old is not None:
            self.fs.rm(old, recursive=True)
        return self.final_url

    def _move(self, src: str, dst: str) -> None:
        if is_local(self.fs):
            os.rename(src, dst)  # atomic on one filesystem
            return
        # Object stores: everything but metrics.json first, so completeness shows last.
        files = [p for p in self.fs.find(src) if not p.endswith("/" + METRICS)]
        for path in files:
            self.fs.mv(path, dst + path[len(src) :])
        if self.fs.exists(_join(src, METRICS)):
            self.fs.mv(_join(src, METRICS), _join(dst, METRICS))
        self.fs.rm(src, recursive=True)

    def abort(self) -> None:
        """Remove the staging folder (after a failure); never touches a published result."""
        try:
            if self.fs.exists(self.staging):
                self.fs.rm(self.staging, recursive=True)
        except Exception as exc:  # cleanup must not hide the original error
            log.warning("could not remove staging folder %s: %s", self.staging_url, exc)


def _aligned_to_regular_chunks(x: da.Array) -> da.Array:
    """Rechunk, where needed, so each dask block maps onto whole Zarr chunks.

    Zarr chunks are regular: along each axis a chunking like ``(b, b, …, last)`` with any
    ``last`` already aligns (no two tasks write into one Zarr chunk); an axis chunked
    otherwise is rechunked to its first chunk's size.
    """
    regular = all(all(size == c[0] for size in c[:-1]) for c in x.chunks)
    return x if regular else x.rechunk(tuple(c[0] for c in x.chunks))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")
