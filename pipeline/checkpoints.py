"""NMF checkpoints: W, H and the iteration state of a running job, beside its output.

A checkpoint lives in ``<output.url>/.<name>.checkpoint/`` (hidden, like the staging
folder) and is replaced atomically on a local filesystem: a new one is written aside and
renamed over the old. It records what it belongs to (input shape and chunks, rank, solver,
init, seed), so ``resume: true`` refuses a checkpoint of a different job. It is removed
once the job's result is published.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.config import NMFSpec, OutputSpec
from pipeline.errors import InputError
from pipeline.io.stores import is_local, split_url, zarr_store
from pipeline.linalg.nmf import NMFState

log = logging.getLogger(__name__)


def _identity(spec: NMFSpec, a: da.Array) -> dict[str, Any]:
    return {
        "shape": list(a.shape),
        "row_chunks": list(a.chunks[0]),
        "dtype": str(a.dtype),
        "rank": spec.rank,
        "solver": spec.solver,
        "init": spec.init,
        "seed": spec.seed,
    }


class Checkpoints:
    """Save and load :class:`~pipeline.linalg.NMFState` for one job."""

    def __init__(self, output: OutputSpec, name: str) -> None:
        self.output = output
        self.fs, root = split_url(output.url, output.storage_options)
        self.root = root.rstrip("/")
        self.path = f"{self.root}/.{name}.checkpoint"

    def _url(self, path: str) -> str:
        return path if is_local(self.fs) else self.fs.unstrip_protocol(path)

    def exists(self) -> bool:
        """Whether a complete checkpoint is there."""
        return bool(self.fs.exists(f"{self.path}/state.json"))

    def save(self, state: NMFState, w: da.Array, spec: NMFSpec, a: da.Array) -> None:
        """Write W (from the cluster), H and the state; replace the previous checkpoint."""
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(tmp, exist_ok=True)
        store = zarr_store(self._url(f"{tmp}/W.zarr"), self.output.storage_options, read_only=False)
        target = zarr.create_array(
            store=store, shape=w.shape, dtype=w.dtype, chunks=(max(w.chunks[0]), w.shape[1])
        )
        da.store(w.rechunk((max(w.chunks[0]), w.shape[1])), target, lock=False)
        with self.fs.open(f"{tmp}/H.npy", "wb") as f:
            np.save(f, state.h)
        payload = {
            "identity": _identity(spec, a),
            "iteration": state.iteration,
            "history": state.history,
            "converged": state.converged,
        }
        with self.fs.open(f"{tmp}/state.json", "w") as f:  # written last: marks completeness
            json.dump(payload, f)
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        self.fs.mv(tmp, self.path, recursive=True)
        log.info("nmf: checkpoint at iteration %d", state.iteration)

    def load(self, spec: NMFSpec, a: da.Array) -> NMFState:
        """The saved state, with W's blocks chunked like ``a``.

        Raises
        ------
        InputError
            When the checkpoint belongs to a different input or different options.
        """
        with self.fs.open(f"{self.path}/state.json") as f:
            payload = json.load(f)
        expected = _identity(spec, a)
        if payload["identity"] != expected:
            diff = sorted(k for k in expected if payload["identity"].get(k) != expected[k])
            raise InputError(
                f"resume: the checkpoint at {self._url(self.path)} was made with different "
                f"{', '.join(diff)}; remove it or set resume: false"
            )
        with self.fs.open(f"{self.path}/H.npy", "rb") as f:
            h = np.load(f)
        store = zarr_store(
            self._url(f"{self.path}/W.zarr"), self.output.storage_options, read_only=True
        )
        w = da.from_zarr(zarr.open_array(store=store, mode="r"), chunks=(a.chunks[0], spec.rank))
        return NMFState(
            w_blocks=w.to_delayed(optimize_graph=False)[:, 0].tolist(),
            h=h,
            iteration=int(payload["iteration"]),
            history=list(payload["history"]),
            converged=bool(payload["converged"]),
        )

    def remove(self) -> None:
        """Delete the checkpoint (after the result is published)."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
