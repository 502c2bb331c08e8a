"""Checks before anything is written: can the run create its output and its input here,
and does its output stay clear of its input?

``factorize validate`` and the CLI before a run call these (through
:func:`pipeline.jobs.precheck`), so a job that cannot write its result is refused with one
line and exit 2 instead of failing at ``run`` with exit 1. They look, never write: a
folder's permissions by ``os.access`` (which also answers for read-only filesystems, the
one thing that stops root) and the free space by ``shutil.disk_usage``.

Permissions and space are checked on local paths only: on object stores they are the
server's business (a write there fails with the store's own error). The overlap of output
and input (:func:`check_output_apart`) is checked on every kind of store.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.io.stores import Location, effective_options, is_local, split_url
from pipeline.sections import RATING_KINDS, SPARSE_KINDS

if TYPE_CHECKING:
    from pipeline.sections import InputSpec, OutputSpec


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


def check_output_writable(out: Location, name: str) -> None:
    """Refuse a local output the run cannot write: ``<url>/`` not creatable or not writable
    (staging folder and the final rename both live there), or ``<url>/<name>`` a file.

    Raises
    ------
    ConfigError
    """
    if not out.local:
        return
    root = out.path
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
    if recipe.kind in SPARSE_KINDS:  # CSR: about density of the entries, 4-byte indices
        need = int(need * recipe.density * (1 + 4 / np.dtype(recipe.dtype).itemsize))
        need += 8 * (rows + 1)
    if recipe.kind in RATING_KINDS:  # and the true factors
        need += 8 * (rows + cols) * (recipe.rank or 10)
    free = shutil.disk_usage(base).free
    if need > free:
        raise InputError(
            f"input.create_if_missing: a {rows}×{cols} {recipe.dtype} matrix needs "
            f"{format_size(need)} but {base} has {format_size(free)} free; "
            "make shape smaller or point input.url elsewhere"
        )


# --------------------------------------------------------------------------- overlap


@dataclass(frozen=True)
class Place:
    """Where a URL points, comparable with another place.

    Attributes
    ----------
    store : ``"local"``, or the protocol and endpoint of an object store
        (``"s3 http://127.0.0.1:9000"``; ``"s3 "`` for the default endpoint)
    path : the absolute path in that store: symbolic links and ``..`` resolved locally,
        ``..``, ``.`` and repeated slashes collapsed in object keys
    shown : the URL as given, with what it resolves to when that differs (for messages)
    """

    store: str
    path: PurePosixPath
    shown: str

    def contains(self, other: Place) -> bool:
        """Whether ``other`` is this place or lies inside it."""
        return self.store == other.store and other.path.is_relative_to(self.path)


def _endpoint(url: str, storage_options: dict[str, Any] | None) -> str:
    """The object store's endpoint as the job names it (``""``: the provider's default)."""
    opts = effective_options(url, storage_options)
    client = opts.get("client_kwargs") if isinstance(opts.get("client_kwargs"), dict) else {}
    endpoint = opts.get("endpoint_url") or client.get("endpoint_url") or ""
    return str(endpoint).rstrip("/").lower()


def place_of(url: str, storage_options: dict[str, Any] | None = None) -> Place:
    """The :class:`Place` that ``url`` (a local path or fsspec URL) points to."""
    from pipeline.secrets import redact

    fs, path = split_url(url, storage_options)
    if is_local(fs):
        resolved = os.path.realpath(path)
        shown = path if path == resolved else f"{path} (resolves to {resolved})"
        return Place("local", PurePosixPath(resolved), shown)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    key = posixpath.normpath("/" + path.strip("/"))
    shown = redact(url)
    if key.strip("/") != path.strip("/"):
        shown += f" (resolves to {protocol}://{key.lstrip('/')})"
    return Place(f"{protocol} {_endpoint(url, storage_options)}", PurePosixPath(key), shown)


def check_output_apart(spec: InputSpec, output: OutputSpec, name: str) -> None:
    """Refuse an output that is the input store, lies inside it, or holds it.

    The run writes ``<output.url>/<name>`` and its staging folder beside it, and replaces
    ``<name>`` with ``overwrite``: none of that may touch the input. Paths are compared
    after resolving symbolic links and ``..`` (locally) on the same store (object
    stores: the same protocol and endpoint).

    Parameters
    ----------
    spec
        The job's input.
    output
        The job's output.
    name
        The job's name (the result folder).

    Raises
    ------
    ConfigError
    """
    try:
        result = place_of(posixpath.join(output.url, name), output.storage_options)
        store = place_of(spec.url, spec.storage_options)
    except Exception:  # an unknown protocol, a driver not installed: the next checks say so
        return
    fix = "choose another output.url or name"
    if result.contains(store) and store.contains(result):
        raise ConfigError(
            f"output: {result.shown} is the input store {store.shown}: the run "
            f"would replace its own input; {fix}"
        )
    if store.contains(result):
        raise ConfigError(
            f"output: {result.shown} lies inside the input store {store.shown}: "
            f"the run would write into its own input; {fix}"
        )
    if result.contains(store):
        raise ConfigError(
            f"output: the input store {store.shown} lies inside the output {result.shown}, "
            f"which the run would replace; {fix}"
        )
