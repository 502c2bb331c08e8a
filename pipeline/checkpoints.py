"""Checkpoints of a running job, beside its output: a few arrays and a JSON state.

A checkpoint lives in ``<output.url>/.<name>.checkpoint/`` (hidden, like the staging
folder). A new one is written aside and put in place by
:func:`~pipeline.io.artifacts.replace_tree`: two renames on a local filesystem; on object
stores the old ``state.json`` is deleted first, the files copied, and ``state.json``
copied last. ``state.json`` is written last and marks a checkpoint complete; it
records an ``identity`` (what the checkpoint belongs to) that :meth:`Checkpoints.load`
compares, so a resumed job refuses a checkpoint of a different job. What goes in and how
it maps back to an algorithm's state is the method's business (see ``methods/nmf.py``);
the lifecycle removes it once the result is in place (methods declaring ``checkpoints``).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.backend import host_blocks
from pipeline.errors import InputError
from pipeline.io.artifacts import remove_tree, replace_tree
from pipeline.io.stores import Location

log = logging.getLogger(__name__)

STATE = "state.json"


class Checkpoints:
    """Save and load one job's checkpoint: tall dask arrays, small numpy arrays, a state."""

    def __init__(self, out: Location, name: str) -> None:
        self.out = out
        self.fs = out.fs
        self.root = out.path.rstrip("/")
        self.path = f"{self.root}/.{name}.checkpoint"

    def _url(self, path: str) -> str:
        return self.out.at(path).full_url

    def exists(self) -> bool:
        """Whether a complete checkpoint is there."""
        return bool(self.fs.exists(f"{self.path}/{STATE}"))

    def save(
        self,
        identity: dict[str, Any],
        state: dict[str, Any],
        tall: dict[str, da.Array],
        small: dict[str, np.ndarray],
    ) -> None:
        """Write the arrays (``tall`` from the cluster, block by block) and the state;
        replace the previous checkpoint."""
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self._write(tmp, {"identity": identity, **state}, tall, small)
            replace_tree(self.fs, tmp, self.path, STATE)
        except BaseException:
            remove_tree(self.fs, tmp)  # a failed save leaves the previous checkpoint alone
            raise

    def _write(
        self,
        tmp: str,
        state: dict[str, Any],
        tall: dict[str, da.Array],
        small: dict[str, np.ndarray],
    ) -> None:
        """Write a complete checkpoint into ``tmp``, ``state.json`` last."""
        self.fs.makedirs(tmp, exist_ok=True)
        for key, x in tall.items():
            store = self.out.at(f"{tmp}/{key}.zarr").zarr_store(read_only=False)
            rows = max(x.chunks[0])
            target = zarr.create_array(
                store=store, shape=x.shape, dtype=x.dtype, chunks=(rows, *x.shape[1:])
            )
            da.store(host_blocks(x).rechunk((rows, *x.shape[1:])), target, lock=False)
        for key, x in small.items():
            with self.fs.open(f"{tmp}/{key}.npy", "wb") as f:
                np.save(f, x)
        self.fs.pipe_file(f"{tmp}/{STATE}", json.dumps(state).encode())

    def load(
        self, identity: dict[str, Any], row_chunks: tuple[int, ...]
    ) -> tuple[dict[str, Any], dict[str, da.Array], dict[str, np.ndarray]]:
        """``(state, tall arrays with these row chunks, small arrays)`` of the checkpoint.

        Raises
        ------
        InputError
            When the checkpoint's identity differs from ``identity`` (another input or
            other options).
        """
        with self.fs.open(f"{self.path}/{STATE}") as f:
            state = json.load(f)
        saved = state.pop("identity")
        if saved != identity:
            diff = sorted(k for k in identity if saved.get(k) != identity[k])
            raise InputError(
                f"resume: the checkpoint at {self._url(self.path)} was made with different "
                f"{', '.join(diff)}; remove it or set resume: false"
            )
        tall, small = {}, {}
        for path in self.fs.ls(self.path, detail=False):
            key = path.rstrip("/").rsplit("/", 1)[-1]
            if key.endswith(".zarr"):
                store = self.out.at(path).zarr_store(read_only=True)
                arr = zarr.open_array(store=store, mode="r")
                tall[key.removesuffix(".zarr")] = da.from_zarr(
                    arr, chunks=(row_chunks, *arr.shape[1:])
                )
            elif key.endswith(".npy"):
                with self.fs.open(path, "rb") as f:
                    small[key.removesuffix(".npy")] = np.load(f)
        return state, tall, small

    def remove(self) -> None:
        """Delete the checkpoint (after the result is published); a missing one is fine."""
        remove_tree(self.fs, self.path)
