"""What a method is: its config model, its checks, its runner and the outputs it declares.

A method module defines a :class:`MethodSpec` subclass (its entry under ``methods:``) and a
:class:`Method` that bundles everything the rest of the pipeline needs to know about it.
The registry (:mod:`pipeline.methods`) builds the config union, the JSON Schema, the
report's table keys and plot links from these declarations, and :class:`RunContext` only
lets a runner write the arrays and plots its :class:`Method` declares — so a method cannot
forget a piece without a test noticing.

This module is imported by the config loader: it names no dask, zarr or distributed.
"""

from __future__ import annotations

import json
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from pipeline.memory import Cost

if TYPE_CHECKING:
    import dask.array as da
    from distributed import Client

    from pipeline.config import OutputSpec
    from pipeline.io.artifacts import RunOutput

log = logging.getLogger(__name__)


def _leaf_types(annotation: Any) -> set[Any]:
    """The types a field admits at its top level: ``int | None`` → ``{int, NoneType}``."""
    if typing.get_origin(annotation) is Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_leaf_types(a) for a in typing.get_args(annotation)))
    return {annotation}


def _item_types(annotation: Any, n: int) -> list[Any] | None:
    """Annotations of the ``n`` items of a list or tuple value, or ``None`` if not a sequence."""
    for leaf in _leaf_types(annotation):
        origin, args = typing.get_origin(leaf), typing.get_args(leaf)
        if origin is list and args:
            return [args[0]] * n
        if origin is tuple and args:
            return [args[0]] * n if args[-1] is Ellipsis else list(args[:n])
    return None


def bool_as_number(value: Any, annotation: Any) -> str | None:
    """What ``annotation`` wants when ``value`` holds ``true``/``false`` in place of a number.

    ``None`` when ``value`` is fine. Lists and tuples are checked item by item; nested
    models check their own fields.
    """
    if isinstance(value, bool):
        leaves = _leaf_types(annotation)
        if bool not in leaves and Any not in leaves and leaves & {int, float}:
            return "an integer" if float not in leaves else "a number"
    elif isinstance(value, list | tuple):
        for item, ann in zip(value, _item_types(annotation, len(value)) or [], strict=False):
            if wanted := bool_as_number(item, ann):
                return wanted
    return None


class StrictModel(BaseModel):
    """A frozen pydantic model that refuses unknown keys (every job-file section).

    Two rules hold for every field of every section, so no field can forget them:
    numbers are finite (``.inf``/``.nan`` are refused: no count, time or tolerance is
    infinite) and booleans are not numbers (pydantic's lax mode ran ``rank: true`` as
    rank 1). The error of the second names the field in its context (``ctx["field"]``,
    see :func:`pipeline.config.format_validation_error`): a model-level validator is the
    one place that sees every raw value — a field validator for ``*`` is not allowed on
    the methods' ``method`` discriminator.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                key = info.alias or name
                if key in data and (wanted := bool_as_number(data[key], info.annotation)):
                    raise PydanticCustomError(
                        "bool_not_number",
                        "must be {wanted}, not a boolean, got {value}",
                        {"field": key, "wanted": wanted, "value": json.dumps(data[key])},
                    )
        return data


class MethodSpec(StrictModel):
    """Options every method accepts; each method's spec adds its own and a ``method`` tag."""

    method: str
    block_rows: int | None = Field(
        None, ge=1, description="rows per block; default: blocks of about 64 MiB"
    )


def check_tall_input(shape: tuple[int, int], transpose: bool, where: str) -> None:
    """Refuse a matrix that is wide for a method factorizing tall ones, naming the
    ``transpose`` option (``where`` is the field path, e.g. ``"methods[0]"``)."""
    from pipeline.linalg import check_tall

    if transpose:
        check_tall(shape[::-1], name=f"{where}: its transpose", hint="set transpose: false")
    else:
        hint = "set transpose: true to factorize the transpose"
        check_tall(shape, name=f"{where}: the input", hint=hint)


@dataclass(frozen=True)
class FactorArray:
    """An array a method writes to ``factors.zarr/<method>/<name>``.

    ``when`` says whether a given spec writes it (e.g. ``Q`` only with ``q: true``).
    """

    name: str
    dims: tuple[str, ...]
    when: Callable[[Any], bool] = field(default=lambda spec: True)


@dataclass(frozen=True)
class AnnDataSlots:
    """Where a method's factors go in ``adata.zarr`` for an AnnData input (scanpy's names).

    ``obsm/<obsm>`` gets the row scores (``U·diag(S)``, or ``W``), ``varm/<varm>`` the
    column loadings (``Vtᵀ``, or ``Hᵀ``), and ``uns/<uns>/`` the spectrum summary
    (``variance`` and ``variance_ratio`` for PCA, ``singular_values`` otherwise).
    """

    obsm: str
    varm: str
    uns: str | None = None


def spectral_slots(spec: Any) -> AnnDataSlots:
    """SVD-type methods: PCA where scanpy keeps it (``center``), else an SVD beside it."""
    return (
        AnnDataSlots("X_pca", "PCs", "pca")
        if spec.center
        else AnnDataSlots("X_svd", "SVD_V", "svd")
    )


@dataclass(frozen=True)
class Method:
    """Everything that makes a method, registered once in :mod:`pipeline.methods`.

    Attributes
    ----------
    name : the ``method:`` tag in job files and the group name in ``factors.zarr``
    spec : its config model (a :class:`MethodSpec` subclass with ``method: Literal[name]``)
    check : ``check(spec, shape, where)`` refuses, before any compute, a spec that cannot
        run on a matrix of ``shape`` (``where`` is the field path, e.g. ``"methods[0]"``)
    run : ``run(spec, a, ctx) -> metrics`` factorizes ``a`` and writes through ``ctx``
    cost : ``cost(spec, shape) -> Cost``: passes, block layout and memory per block (the
        runner lays out its blocks by it, ``factorize plan`` predicts from it)
    arrays : the arrays it may write, with their dimension names
    headline : metric keys shown in the CLI summary and the Prefect table artifact
    plots : file names of the plots it writes next to ``metrics.json``
    example : a small valid entry of ``methods:`` (docs and the contract test)
    on_published : called with ``(output spec, job name)`` once the result is in place
        (e.g. to remove checkpoints the result supersedes)
    anndata : ``anndata(spec)`` names the :class:`AnnDataSlots` of its factors in the
        ``adata.zarr`` written for AnnData inputs (``None``: not written there)
    sparse : ``run`` takes sparse row blocks as they are (``scipy.sparse``); otherwise a
        sparse input reaches it densified one row block at a time
    """

    name: str
    spec: type[MethodSpec]
    check: Callable[[Any, tuple[int, int], str], None]
    run: Callable[[Any, da.Array, RunContext], dict[str, Any]]
    cost: Callable[[Any, tuple[int, int]], Cost]
    arrays: tuple[FactorArray, ...]
    headline: tuple[str, ...]
    example: dict[str, Any]
    plots: tuple[str, ...] = ()
    on_published: Callable[[OutputSpec, str], None] | None = None
    anndata: Callable[[Any], AnnDataSlots] | None = None
    sparse: bool = False

    def arrays_for(self, spec: MethodSpec) -> dict[str, tuple[str, ...]]:
        """``{array name: dimension names}`` that ``spec`` writes."""
        return {a.name: a.dims for a in self.arrays if a.when(spec)}


@dataclass
class RunContext:
    """What a runner may touch: the staging output (only its declared arrays and plots),
    the Dask client, and the job's output location (for checkpoints)."""

    method: Method
    out: RunOutput
    client: Client | None
    job_name: str
    output: OutputSpec
    backend: str = "numpy"  # where the blocks live: numpy (host) or cupy (device)
    sparse_bytes: int | None = None  # a sparse input's size in memory (for keep_in_memory)
    predicted_peak: int | None = None  # bytes per worker, set by row_blocks

    def write(self, name: str, x: Any) -> Any:
        """Write a declared factor array; a dask array returns a lazy store to compute."""
        dims = {a.name: a.dims for a in self.method.arrays}
        if name not in dims:
            raise KeyError(f"{self.method.name} does not declare an array {name!r}")
        return self.out.factor_array(self.method.name, name, x, dims[name])

    def write_plot(self, filename: str, png: bytes) -> None:
        """Write a declared plot next to ``metrics.json``."""
        if filename not in self.method.plots:
            raise KeyError(f"{self.method.name} does not declare a plot {filename!r}")
        self.out.write_bytes(filename, png)

    def row_blocks(self, a: da.Array, spec: MethodSpec, cost: Cost) -> tuple[da.Array, bool]:
        """``a`` (transposed if ``cost`` says so) in the row blocks ``cost`` needs, checked
        against the workers' memory and kept in memory when the method keeps it and it
        fits; records the predicted peak memory per worker. Returns ``(blocks, kept)``."""
        from pipeline.cluster import check_block_memory
        from pipeline.memory import predicted_peak, workers_of

        a = method_blocks(a, spec, cost)
        check_block_memory(self.client, a, cost.buffers, self.method.name)
        kept = False
        if cost.keeps:
            a, kept = self.keep_in_memory(a)
        workers = workers_of(self.client)
        if workers is not None:
            size = block_bytes(a, self.sparse_bytes)
            self.predicted_peak = predicted_peak(cost, a.chunks[0], size, kept, workers)
            if workers.memory_limit and self.predicted_peak > workers.memory_limit:
                log.warning(
                    "%s: predicted peak %.0f MiB per worker exceeds memory_limit %.0f MiB; "
                    "raise cluster.memory_limit or lower block_rows of the method",
                    self.method.name,
                    self.predicted_peak / 2**20,
                    workers.memory_limit / 2**20,
                )
        return a, kept

    def watch_pass(self, prefix: str, blocks: int, passes: int, done: int) -> Any:
        """A context in which the blocks of pass ``done + 1`` of ``passes`` are reported as
        their tasks (named ``prefix``) finish (see :func:`pipeline.progress.watch_blocks`)."""
        from pipeline.progress import Progress, report, watch_blocks

        def on_count(n: int) -> None:
            finished = done * blocks + min(n, blocks)
            detail = f"pass {done + 1}/{passes}"
            report(
                Progress(
                    self.job_name, self.method.name, finished, passes * blocks, "block", detail
                )
            )

        return watch_blocks(self.client, prefix, on_count)

    def keep_in_memory(self, a: da.Array) -> tuple[da.Array, bool]:
        """Persist ``a`` on the cluster when it fits (:func:`pipeline.cluster.keep_in_memory`)."""
        from pipeline.backend import is_sparse
        from pipeline.cluster import keep_in_memory

        nbytes = self.sparse_bytes if is_sparse(a._meta) else None
        return keep_in_memory(a, self.client, on_device=self.backend != "numpy", nbytes=nbytes)


def method_blocks(a: da.Array, spec: MethodSpec, cost: Cost) -> da.Array:
    """The row blocks a method with ``cost`` factorizes (``a`` transposed if it says so)."""
    from pipeline.linalg import row_blocks

    return row_blocks(a.T if cost.transpose else a, spec.block_rows, min_rows=cost.min_rows)


def block_bytes(a: da.Array, sparse_bytes: int | None = None) -> int:
    """Bytes in memory of ``a``'s largest row block (a sparse input's share of its size)."""
    from pipeline.backend import is_sparse

    rows = max(a.chunks[0])
    if is_sparse(a._meta) and sparse_bytes is not None:
        return -(-sparse_bytes * rows // a.shape[0])
    return rows * a.shape[1] * a.dtype.itemsize
