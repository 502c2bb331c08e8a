"""Checks before anything is written: can the run create its output and its input here?

``factorize validate`` and the CLI before a run call these (through
:func:`pipeline.jobs.precheck`), so a job that cannot write its result is refused with one
line and exit 2 instead of failing at ``run`` with exit 1. They look, never write: a
folder's permissions by ``os.access`` (which also answers for read-only filesystems, the
one thing that stops root) and the free space by ``shutil.disk_usage``.

Local paths only: on object stores permissions and space are the server's business (a
write there fails with the store's own error).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.io.stores import is_local, split_url

if TYPE_CHECKING:
    from pipeline.config import InputSpec, OutputSpec


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists, else its closest existing ancestor."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_can_create(path: str | os.PathLike[str], field: str) -> Path:
    """Refuse a local ``path`` that cannot be created (or written into, when it exists).

    The closest existing ancestor (``path`` itself when it exists) must be a folder this
    process may write and enter; ``makedirs`` creates the rest.

    Parameters
    ----------
    path
        Local folder the run will create or write into.
    field
        The config field that names it, e.g. ``"output.url"``.

    Returns
    -------
    The closest existing ancestor (where the free space is measured).

    Raises
    ------
    ConfigError
    """
    base = nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{field}: {base} is a file, not a folder, so {path} cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{field}: cannot write to {base} (read-only filesystem or no permission); "
            f"choose another {field}"
        )
    return base


def check_output_writable(spec: OutputSpec, name: str) -> None:
    """Refuse a local output the run cannot write: ``<url>/`` not creatable or not writable
    (staging folder and the final rename both live there), or ``<url>/<name>`` a file.

    Raises
    ------
    ConfigError
    """
    fs, root = split_url(spec.url, spec.storage_options)
    if not is_local(fs):
        return
    final = Path(os.path.abspath(root)) / name
    if final.exists() and not final.is_dir():
        raise ConfigError(
            f"output: {final} exists and is not a result folder; remove it or change name"
        )
    check_can_create(root, "output.url")


def format_size(nbytes: float) -> str:
    """``1536`` → ``'1.5 KiB'`` (binary units up to EiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} EiB"


def check_input_creatable(spec: InputSpec) -> None:
    """Refuse a ``create_if_missing`` input that cannot be written where ``input.url`` points:
    the location is not writable, or the matrix is larger than the free space there.

    The matrix is counted uncompressed: synthetic data (random floats) barely compresses.

    Raises
    ------
    ConfigError, InputError
    """
    recipe = spec.create_if_missing
    if recipe is None:
        return
    fs, path = split_url(spec.url, spec.storage_options)
    if not is_local(fs):
        return
    base = check_can_create(path, "input.url")
    if recipe.shape is None:  # packaged data sets: a few MB
        return
    rows, cols = recipe.shape
    need = rows * cols * np.dtype(recipe.dtype).itemsize
    free = shutil.disk_usage(base).free
    if need > free:
        raise InputError(
            f"input.create_if_missing: a {rows}×{cols} {recipe.dtype} matrix needs "
            f"{format_size(need)} but {base} has {format_size(free)} free; "
            "make shape smaller or point input.url elsewhere"
        )
