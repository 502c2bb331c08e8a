"""Fingerprints for ``skip_if_complete``: is a published result still the answer to this job?

A job's fingerprint hashes what determines its result: the config (minus the keys that only
say *how* to run: ``skip_if_complete``, ``output.overwrite``, ``cluster``), the input's
URL, array path, shape, chunks and dtype (a checkpoint's tensors), and a fingerprint of the
store (and of a method's side inputs: a base checkpoint, Grams): its metadata
documents (``zarr.json`` / ``.zarray`` / ``.zattrs``) plus the name, size and modification
stamp (mtime, or an object store's ETag) of every chunk object. Rewriting chunks in place
therefore changes the fingerprint whenever the storage reports a new stamp; a store whose
files keep size and mtime after a rewrite would not be noticed (documented limitation).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import JobConfig, redacted_dump
from pipeline.io.model import ModelManifest
from pipeline.io.source import InputManifest
from pipeline.io.stores import split_url
from pipeline.methods import METHODS

_METADATA_NAMES = ("zarr.json", ".zarray", ".zattrs", ".zgroup")
_STAMP_KEYS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")


def _stamp(info: dict[str, Any]) -> str:
    for key in _STAMP_KEYS:
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


def store_fingerprint(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Hash of a store's metadata documents and its objects' names, sizes and stamps."""
    fs, root = split_url(url, storage_options or {})
    digest = hashlib.sha256()
    listing = fs.find(root, detail=True)
    for path in sorted(listing):
        info = listing[path]
        rel = path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/")) else path
        digest.update(f"{rel}\0{info.get('size')}\0{_stamp(info)}\n".encode())
        if rel.rsplit("/", 1)[-1] in _METADATA_NAMES:
            digest.update(fs.cat_file(path))
    return digest.hexdigest()


def job_fingerprint(config: JobConfig, manifest: InputManifest | ModelManifest) -> str:
    """Hash of everything that determines the job's result (see the module docstring)."""
    cfg = redacted_dump(config)
    cfg.pop("skip_if_complete", None)
    cfg.pop("cluster", None)
    cfg.get("output", {}).pop("overwrite", None)
    options = config.input.storage_options
    sides = [
        url
        for spec in config.methods
        if (side := METHODS[spec.method].side_inputs) is not None
        for url in side(spec)
    ]
    payload = {
        "config": cfg,
        "input": manifest.to_dict(),
        "store": store_fingerprint(config.input.url, options),
        "side_inputs": [store_fingerprint(url, options) for url in sides],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
