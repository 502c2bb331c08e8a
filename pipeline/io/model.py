"""Open a job's input when it is a model checkpoint (safetensors) rather than a matrix.

The job's ``input.url`` names a ``.safetensors`` file, or a folder holding
``model.safetensors`` or a sharded ``model.safetensors.index.json``; only headers are read
here (:func:`pipeline.io.safetensors.open_checkpoint`), the tensors by byte ranges later.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.io.safetensors import Checkpoint, open_checkpoint
from pipeline.io.source import locate_input
from pipeline.io.stores import Location
from pipeline.sections import InputSpec


@dataclass(frozen=True)
class ModelManifest:
    """What was opened: small, JSON-able, safe to log (URL credentials redacted)."""

    url: str
    files: int  # shards
    tensors: int
    params: int
    dtypes: dict[str, int]  # tensors per safetensors dtype code
    stored_bytes: int
    fingerprint: str | None = None  # set by the run (see pipeline.fingerprint)
    format: str = "safetensors"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    def describe(self) -> str:
        """One line for logs and ``factorize validate``."""
        dtypes = ", ".join(f"{n} {code}" for code, n in sorted(self.dtypes.items()))
        shards = f" in {self.files} shards" if self.files > 1 else ""
        return (
            f"safetensors checkpoint, {self.tensors} tensors{shards} ({dtypes}), "
            f"{self.params:,} parameters"
        )


def manifest_of(ckpt: Checkpoint) -> ModelManifest:
    """The manifest of an opened checkpoint."""
    dtypes = Counter(t.dtype for t in ckpt.tensors.values())
    return ModelManifest(
        ckpt.display,
        len(ckpt.files),
        len(ckpt.tensors),
        ckpt.params(),
        dict(dtypes),
        ckpt.total_bytes,
    )


def open_model(spec: InputSpec, at: Location | None = None) -> tuple[Checkpoint, ModelManifest]:
    """Open the checkpoint at ``input.url`` (headers only).

    Raises
    ------
    InputError
        A missing path, a folder without a checkpoint, a corrupt or unreadable header.
    """
    ckpt = open_checkpoint(at or locate_input(spec), "input.url")
    return ckpt, manifest_of(ckpt)
