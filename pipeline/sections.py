"""The job file's sections: the strict base model and every section but ``methods``.

A leaf of the import graph (pydantic, and lazily dask's size parser and distributed's
view of this machine's memory): the I/O, cluster and checkpoint modules take the sections
they need from here, and :mod:`pipeline.config` assembles the whole job from these and the
method registry (:mod:`pipeline.methods`).
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


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


NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"  # a plain folder name: no ".", "..", ".hidden"
# The staging folder ".<name>.partial-<12 hex>" adds 22 characters and must fit the usual
# 255-byte file-name limit (ext4, xfs, btrfs, S3 keys' path parts); 200 leaves room for the
# other hidden siblings (".<name>.old-<hex>") and a prefix on object stores.
NAME_MAX = 200
# The least memory_limit per worker: a worker that has imported the pipeline (numpy, scipy,
# zarr, dask.array) holds ~170 MiB; the nanny pauses it at 80 % and restarts it at 95 % of
# the limit, so below 256 MiB it is restarted before it holds a single block.
MIN_WORKER_MEMORY = 256 << 20
# Kinds whose workers run on this machine: their memory_limit must fit its memory.
LOCAL_KINDS = ("local", "local-cuda")

# A ratings log (users × items, the stored entries the observations): explicit 1–5 stars or
# implicit click counts, with the true factors kept (see pipeline.rating_datasets).
RATING_KINDS = ("ratings", "clicks")
# written as CSR groups (see pipeline.sparse_datasets, pipeline.rating_datasets)
SPARSE_KINDS = ("sparse", "counts", *RATING_KINDS)
MODEL_KINDS = ("transformer",)  # written as safetensors checkpoints (pipeline.datasets)
SYNTHETIC_KINDS = ("gaussian", "lowrank", "vandermonde", "nonnegative", *SPARSE_KINDS, *MODEL_KINDS)
PACKAGED_KINDS = ("digits", "sample-image")


class SyntheticSpec(StrictModel):
    """Recipe for a matrix written to ``input.url`` when the store is missing."""

    kind: Literal[
        "gaussian",
        "lowrank",
        "vandermonde",
        "nonnegative",
        "sparse",
        "counts",
        "ratings",
        "clicks",
        "digits",
        "sample-image",
        "transformer",
    ] = Field(
        "gaussian",
        description="gaussian: i.i.d. N(0,1); lowrank: decaying spectrum; vandermonde: "
        "ill-conditioned columns x**j; nonnegative: rank-10 W₀H₀ plus noise; sparse: a "
        "cell × gene-like count matrix (8 cell types, power-law gene use, varying depth) "
        "stored as CSR; counts: a topic-model document × term count matrix (20 topics) "
        "stored as CSR — both an AnnData store with input.array: X, else a bare CSR group; "
        "ratings: a users × items log of 1–5 star ratings in half stars (low rank plus "
        "biases plus Gaussian noise, which entries are observed set by Zipf-distributed user "
        "activity and item popularity); clicks: implicit counts (Poisson of a non-negative "
        "low-rank affinity times popularity) — both an AnnData store (the matrix at "
        "input.array, default X) keeping the true factors in obsm/true_U, varm/true_V and "
        "uns/synthetic; digits: scikit-learn's 1797 × 64 handwritten digits; sample-image: "
        "scikit-learn's 427 × 640 sample photo in grey levels (these two need scikit-learn); "
        "transformer: a safetensors checkpoint of a decoder-like model, shape (layers, "
        "hidden), weights with decaying spectra (input of method compress)",
    )
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="(rows, columns); required for synthetic kinds, fixed for packaged data"
    )
    chunks: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="storage chunks; default: row blocks of about 32 MiB"
    )
    dtype: Literal["float32", "float64"] = "float64"
    seed: int = Field(0, ge=0, description="random seed (≥ 0); each chunk derives its own")
    density: float = Field(
        0.05,
        gt=0,
        le=1,
        description="sparse kinds: about this share of entries non-zero (ratings, clicks: "
        "observed)",
    )
    rank: int | None = Field(
        None,
        ge=1,
        description="ratings, clicks: rank of the true factors (default 10); other kinds take none",
    )

    @model_validator(mode="after")
    def _shape_matches_kind(self) -> SyntheticSpec:
        if self.kind in SYNTHETIC_KINDS and self.shape is None:
            raise ValueError(f"shape is required for kind {self.kind!r}")
        if self.kind in PACKAGED_KINDS and self.shape is not None:
            raise ValueError(f"kind {self.kind!r} has a fixed shape; remove shape")
        if self.rank is not None and self.kind not in RATING_KINDS:
            raise ValueError(
                f"rank is used by kinds ratings and clicks only (kind is {self.kind!r})"
            )
        return self


class InputSpec(StrictModel):
    """Where the matrix lives."""

    url: str = Field(description="local path or fsspec URL (file://, s3://, memory://)")
    array: str | None = Field(
        None, description="path of the 2-D array inside the store; omit when the store is the array"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="handed to fsspec; secrets are never logged or written"
    )
    create_if_missing: SyntheticSpec | None = Field(
        None, description="write a synthetic matrix to url when the store does not exist"
    )
    missing_chunks: Literal["error", "fill"] = Field(
        "error",
        description="a chunk absent from the store: error refuses the input (validate and run "
        "count them); fill reads it as the array's fill value, with a warning giving the count. "
        "Zarr omits chunks equal to the fill value (zarr-python 3 by default: "
        "write_empty_chunks=False), so an all-zero block written by zarr is absent: set fill "
        "for such intentionally sparse stores",
    )

    @field_validator("url")
    @classmethod
    def _url_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class WaitForWorkers(StrictModel):
    """Wait for workers before computing (clusters whose workers start as batch jobs)."""

    n: int = Field(ge=1, description="workers to wait for")
    timeout: float = Field(600.0, gt=0, le=86400, description="seconds; then the job fails")


CLUSTER_CLASS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"
CLASS_ONLY = ("cluster_class", "cluster_kwargs", "scale", "adapt_kwargs")
NOT_CLIENT_KWARGS = ("address", "asynchronous", "scheduler_file")  # set by the kind


class ClusterSpec(StrictModel):
    """Which Dask cluster runs the job (prefect-dask's vocabulary for ``kind: class``)."""

    kind: Literal["local", "address", "local-cuda", "class", "scheduler-file"] = Field(
        "local",
        description="local: embedded LocalCluster; address: an existing scheduler; "
        "local-cuda: LocalCUDACluster (needs the gpu extra); class: any cluster class "
        "(cluster_class, e.g. dask_jobqueue.SLURMCluster); scheduler-file: the scheduler "
        "that wrote scheduler_file (dask scheduler --scheduler-file)",
    )
    address: str | None = Field(None, description="scheduler address for kind: address")
    cluster_class: str | None = Field(
        None,
        pattern=CLUSTER_CLASS_PATTERN,
        description="kind: class — dotted path of the cluster class, e.g. "
        "dask_jobqueue.SLURMCluster, dask_kubernetes.operator.KubeCluster",
    )
    cluster_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="kind: class — passed to the class as given"
    )
    scale: dict[str, Any] | None = Field(
        None, description="kind: class — cluster.scale(**scale), e.g. {n: 4} or {jobs: 2}"
    )
    adapt_kwargs: dict[str, Any] | None = Field(
        None, description="kind: class — cluster.adapt(**adapt_kwargs), e.g. {maximum: 10}"
    )
    client_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to distributed.Client (not address/asynchronous)"
    )
    scheduler_file: str | None = Field(None, description="kind: scheduler-file — its path")
    wait_for_workers: WaitForWorkers | None = Field(
        None, description="non-local kinds: wait for n workers, fail after timeout seconds"
    )
    dask_config: dict[str, Any] = Field(
        default_factory=dict,
        description="dask.config.set(...) in this process before the cluster class is imported",
    )
    n_workers: int | None = Field(None, ge=1, description="local kinds: default from the machine")
    threads_per_worker: int | None = Field(None, ge=1)
    memory_limit: str | int = Field(
        "auto",
        description="per worker, e.g. '4GiB' or bytes, at least 256 MiB and, for local kinds, "
        "at most the machine's memory; 'auto' splits the machine's memory",
    )
    connect_timeout: float = Field(
        20.0, gt=0, le=86400, description="seconds to wait for kind: address (at most a day)"
    )

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit_sane(cls, v: str | int, info: ValidationInfo) -> str | int:
        if v == "auto":
            return v
        if isinstance(v, str):
            from dask.utils import parse_bytes  # lazily: the config loader names no dask

            try:
                size = parse_bytes(v)
            except (ValueError, OverflowError):
                raise ValueError("must be 'auto', a byte count or a size such as '4GiB'") from None
        else:
            size = v
        if size < MIN_WORKER_MEMORY:
            raise ValueError(
                "must be 'auto' or at least 256 MiB per worker (a worker holds ~170 MiB "
                "once the pipeline is loaded)"
            )
        kind = info.data.get("kind")  # declared before memory_limit, so validated already
        if kind in LOCAL_KINDS:
            _fits_this_machine(size, kind)
        return v

    @model_validator(mode="after")
    def _fields_match_kind(self) -> ClusterSpec:
        if self.address and self.cluster_class:
            raise ValueError("address and cluster_class exclude each other (as in prefect-dask)")
        for field, kind in (("address", "address"), ("scheduler_file", "scheduler-file")):
            if self.kind == kind and not getattr(self, field):
                raise ValueError(f"{field} is required when kind is {kind!r}")
            if self.kind != kind and getattr(self, field):
                raise ValueError(f"{field} is only used with kind: {kind} (kind is {self.kind!r})")
        if self.kind == "class" and not self.cluster_class:
            raise ValueError("cluster_class is required when kind is 'class'")
        given = [f for f in CLASS_ONLY if getattr(self, f)]
        if self.kind != "class" and given:
            raise ValueError(f"{given[0]} is only used with kind: class (kind is {self.kind!r})")
        if self.scale and self.adapt_kwargs:
            raise ValueError("scale and adapt_kwargs exclude each other: a fixed or adaptive size")
        if bad := [k for k in NOT_CLIENT_KWARGS if k in self.client_kwargs]:
            raise ValueError(f"client_kwargs may not set {bad[0]!r} (the kind sets it)")
        if self.wait_for_workers and self.kind in ("local", "local-cuda"):
            raise ValueError(
                "wait_for_workers is for kinds class, address and scheduler-file (local "
                "clusters start their workers before the job runs)"
            )
        return self


def _fits_this_machine(size: int, kind: str) -> None:
    """Refuse a local worker's ``memory_limit`` above this machine's memory (``distributed``
    would cut it down to that without a word). Clusters of other kinds start their workers
    elsewhere, so their limit is the cluster's business.

    Raises
    ------
    ValueError
        With the machine's memory, for pydantic's one-line error.
    """
    from distributed.system import MEMORY_LIMIT  # lazily: the config loader names no dask

    total = int(MEMORY_LIMIT)  # as pipeline.memory.machine_memory counts it
    if size > total:
        raise ValueError(
            f"must be at most this machine's memory, {total / 2**30:.1f} GiB "
            f"({total} bytes), for cluster.kind {kind}"
        )


class ComputeSpec(StrictModel):
    """Where the block products run: host numpy or a GPU's cupy."""

    backend: Literal["auto", "numpy", "cupy"] = Field(
        "auto",
        description="numpy: the CPU; cupy: blocks on the workers' GPUs (needs a gpu extra and a "
        "visible GPU); auto: cupy on cluster.kind local-cuda or when the workers report a GPU, "
        "else numpy",
    )


class OutputSpec(StrictModel):
    """Where results go: ``<url>/<name>/``."""

    url: str = Field("artifacts", description="folder or fsspec URL")
    overwrite: bool = Field(False, description="replace an existing result of the same name")
    codec: Literal["none", "zstd", "lz4"] = Field(
        "none",
        description="compression of the factor arrays in factors.zarr: none (the default: "
        "factors are incompressible floats, zstd saves ~4 % of the bytes and writes 5× "
        "slower), zstd (zarr's default), lz4 (Blosc lz4 with byte shuffle)",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict)
