"""URL → filesystem and Zarr store, for local paths and any fsspec URL."""

from __future__ import annotations

import os
import warnings
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def split_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(filesystem, path)`` for a local path or fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def is_local(fs: Any) -> bool:
    """True for the local filesystem (where rename is atomic)."""
    return isinstance(fs, LocalFileSystem)


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool) -> Any:
    """A Zarr v3 store object for ``url``: ``LocalStore`` for paths, ``FsspecStore`` else."""
    from zarr.storage import FsspecStore, LocalStore

    fs, path = split_url(url, storage_options)
    if is_local(fs):
        return LocalStore(os.path.abspath(path), read_only=read_only)
    with warnings.catch_warnings():  # zarr wraps synchronous filesystems itself
        warnings.filterwarnings("ignore", message=".*asynchronous=True", category=UserWarning)
        return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
