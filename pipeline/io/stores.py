"""URL → filesystem and Zarr store, for local paths and any fsspec URL."""

from __future__ import annotations

import os
import warnings
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Object-store calls must neither hang nor fail on one dropped packet. Unbounded, a stalled
# endpoint kept `validate` busy for 413 s: botocore waits 60 s per read with up to 4 attempts,
# and s3fs repeats the whole call 5 times on top. Here botocore alone retries (standard
# mode: throttling and transient errors, with back-off), each read waits at most 20 s; s3fs
# makes one attempt. The job's own ``config_kwargs`` and ``retries`` win.
S3_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 20,
    "retries": {"max_attempts": 3, "mode": "standard"},
}


def effective_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options fsspec gets for ``url``: the job's, plus bounded timeouts for S3."""
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        opts["config_kwargs"] = {**S3_CONFIG, **opts.get("config_kwargs", {})}
    return opts


def split_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(filesystem, path)`` for a local path or fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url, **effective_options(url, storage_options))
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
        return FsspecStore.from_url(
            url, storage_options=effective_options(url, storage_options), read_only=read_only
        )
