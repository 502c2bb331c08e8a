"""Job configuration: pydantic models, the YAML loader and the JSON Schema.

The models here are the single source of truth for the job file (see the contract in
ARCHITECTURE.md): the CLI, the Prefect flow parameters and ``factorize schema`` all come
from :class:`JobConfig`. Unknown keys are errors, and every error names the file and the
field path, e.g. ``configs/x.yaml: methods[0].block_rows: must be ≥ 1, got 0``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError
from pipeline.methods import METHODS
from pipeline.methods.base import StrictModel
from pipeline.methods.rank import UNION_TAGS

NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"  # a plain folder name: no ".", "..", ".hidden"
# The staging folder ".<name>.partial-<12 hex>" adds 22 characters and must fit the usual
# 255-byte file-name limit (ext4, xfs, btrfs, S3 keys' path parts); 200 leaves room for the
# other hidden siblings (".<name>.old-<hex>") and a prefix on object stores.
NAME_MAX = 200
# Job files are a few hundred bytes (configs/ holds 390–500 B each). 1 MiB is ~2,000× that,
# parses in about a second and bounds the parser's memory (a 50 MB YAML list took 87 s and
# 2.2 GB); the value and depth bounds stop alias bombs, which are cheap to parse but
# explode when anything walks them.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_VALUES = 100_000
YAML_MAX_DEPTH = 100
# The least memory_limit per worker: a worker that has imported the pipeline (numpy, scipy,
# zarr, dask.array) holds ~170 MiB; the nanny pauses it at 80 % and restarts it at 95 % of
# the limit, so below 256 MiB it is restarted before it holds a single block.
MIN_WORKER_MEMORY = 256 << 20
# Kinds whose workers run on this machine: their memory_limit must fit its memory.
LOCAL_KINDS = ("local", "local-cuda")

SYNTHETIC_KINDS = ("gaussian", "lowrank", "vandermonde", "nonnegative", "sparse", "counts")
SPARSE_KINDS = ("sparse", "counts")  # written as CSR groups (see pipeline.sparse_datasets)
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
        "digits",
        "sample-image",
    ] = Field(
        "gaussian",
        description="gaussian: i.i.d. N(0,1); lowrank: decaying spectrum; vandermonde: "
        "ill-conditioned columns x**j; nonnegative: rank-10 W₀H₀ plus noise; sparse: a "
        "cell × gene-like count matrix (8 cell types, power-law gene use, varying depth) "
        "stored as CSR; counts: a topic-model document × term count matrix (20 topics) "
        "stored as CSR — both an AnnData store with input.array: X, else a bare CSR group; "
        "digits: scikit-learn's 1797 × 64 handwritten digits; sample-image: scikit-learn's "
        "427 × 640 sample photo in grey levels (the last two need scikit-learn)",
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
        0.05, gt=0, le=1, description="sparse kinds: about this share of entries non-zero"
    )

    @model_validator(mode="after")
    def _shape_matches_kind(self) -> SyntheticSpec:
        if self.kind in SYNTHETIC_KINDS and self.shape is None:
            raise ValueError(f"shape is required for kind {self.kind!r}")
        if self.kind in PACKAGED_KINDS and self.shape is not None:
            raise ValueError(f"kind {self.kind!r} has a fixed shape; remove shape")
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
    from pipeline.memory import machine_memory  # lazily: it asks distributed

    total = machine_memory()
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


AnyMethodSpec = Annotated[
    Union[tuple(m.spec for m in METHODS.values())],  # noqa: UP007 (built at run time)
    Field(discriminator="method"),
]


class OutputSpec(StrictModel):
    """Where results go: ``<url>/<name>/``."""

    url: str = Field("artifacts", description="folder or fsspec URL")
    overwrite: bool = Field(False, description="replace an existing result of the same name")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class JobConfig(StrictModel):
    """A factorization job: one input, a cluster, one or more methods, one output."""

    name: str = Field(
        description="names the run folder: a plain folder name (letters, digits, _ - .; not "
        f"starting with '.'), at most {NAME_MAX} characters",
        json_schema_extra={"pattern": NAME_PATTERN, "maxLength": NAME_MAX},
    )
    input: InputSpec
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    methods: list[AnyMethodSpec] = Field(min_length=1)
    output: OutputSpec = Field(default_factory=OutputSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    skip_if_complete: bool = Field(
        False,
        description="do nothing when the output holds a complete result of this same config "
        "and unchanged input (fingerprint of the config, input shape/chunks/dtype and store)",
    )

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, v: str) -> str:
        if len(v) > NAME_MAX:
            raise ValueError(
                f"must be at most {NAME_MAX} characters (its staging folder "
                ".<name>.partial-<12 hex> must fit the 255-byte file-name limit)"
            )
        if v.startswith("."):
            raise ValueError(
                "must be a plain folder name, not starting with '.' (no '.', '..' or hidden names)"
            )
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError(f"must match {NAME_PATTERN} (letters, digits, '_', '-', '.')")
        return v

    @field_validator("methods")
    @classmethod
    def _methods_unique(cls, methods: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for m in methods:
            if m.method in seen:
                raise ValueError(f"method {m.method!r} is listed twice; list each method once")
            seen.add(m.method)
        return methods


# --------------------------------------------------------------------------- errors


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    """Turn pydantic's ``('methods', 0, 'tsqr', 'q')`` into ``methods[0].q``."""
    out = ""
    skip_tag = False
    for part in loc:
        if part in UNION_TAGS:  # tags of other tagged unions (rank: number or rule)
            continue
        if skip_tag:  # discriminated unions insert the tag value after the index
            skip_tag = False
            if isinstance(part, str) and part in METHODS:
                continue
        if isinstance(part, int):
            out += f"[{part}]"
            skip_tag = True
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _shown(got: Any, limit: int = 40) -> str:
    """``repr(got)``, cut short for long strings (a 5,000-character name stays one line)."""
    text = repr(got)
    if len(text) <= limit:
        return text
    size = f" ({len(got)} characters)" if isinstance(got, str) else ""
    return f"{text[:limit]}…{size}"


def _describe(err: dict[str, Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    bounds = {
        "greater_than_equal": ("≥", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("≤", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        sym, key = bounds[kind]
        return f"must be {sym} {ctx[key]}, got {_shown(got)}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}, got {_shown(got)}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s), got {len(got or [])}"
    if kind == "union_tag_invalid":
        return f"unknown method {ctx.get('tag')!r}; implemented: {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "each method needs a 'method:' key"
    msg = err["msg"].removeprefix("Value error, ")
    msg = f"{msg[0].lower()}{msg[1:]}"
    return f"{msg}, got {_shown(got)}" if isinstance(got, str | int | float) else msg


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (through Optional, unions, lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the job file allows in the mapping at ``loc`` (pydantic's error location,
    e.g. ``('methods', 0, 'rsvd')``): the fields of every model that can sit there."""
    models: list[type[BaseModel]] = [JobConfig]
    for part in loc:
        if isinstance(part, int) or part in UNION_TAGS:
            continue  # list items and other unions' tags: the same candidate models
        if part in METHODS and not any(part in m.model_fields for m in models):
            models = [METHODS[part].spec]  # the tag of the methods' union
            continue
        models = [
            model
            for parent in models
            for name, info in parent.model_fields.items()
            if part in (name, info.alias)
            for model in _models_in(info.annotation)
        ]
    return sorted({info.alias or name for m in models for name, info in m.model_fields.items()})


def _did_you_mean(err: dict[str, Any]) -> str:
    """For an unknown key, `` (did you mean 'x'?)`` naming the closest allowed key."""
    loc = tuple(err["loc"])
    close = difflib.get_close_matches(str(loc[-1]), known_keys(loc[:-1]), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report: an unknown key before a missing one (a misspelt required key
    makes both, and the unknown key names the typo)."""
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    return unknown[0] if unknown else errors[0]


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: ``<source>: <field path>: <what is wrong>`` for the first error (an
    unknown key names the closest allowed one)."""
    errors = exc.errors()
    first = _first_error(errors)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    loc = tuple(first["loc"])
    if first["type"] == "bool_not_number":  # raised by the model, about one of its fields
        loc = (*loc, first["ctx"]["field"])
    hint = _did_you_mean(first) if first["type"] == "extra_forbidden" else ""
    return f"{source}: {_loc_to_path(loc)}: {_describe(first)}{hint}{more}"


# --------------------------------------------------------------------------- loading


def _too_large(source: str) -> str:
    return f"{source}: larger than {YAML_MAX_BYTES >> 20} MiB; a job file is a few hundred bytes"


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text (``yaml.safe_load``) within the bounds of a job file.

    Parameters
    ----------
    text
        The YAML document.
    source
        Names it in errors (the file, or ``config`` for a flow parameter).

    Raises
    ------
    ConfigError
        Over :data:`YAML_MAX_BYTES`, a syntax error, or a value YAML cannot build.
    """
    if len(text) > YAML_MAX_BYTES or len(text.encode("utf-8")) > YAML_MAX_BYTES:
        raise ConfigError(_too_large(source))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except ValueError as exc:  # values YAML parses but Python refuses: 5,000-digit ints, dates
        raise ConfigError(f"{source}: YAML value cannot be read: {exc}") from None


def check_bounded(data: Any, source: str) -> None:
    """Refuse data that holds more than :data:`YAML_MAX_VALUES` values (aliases followed)
    or nests deeper than :data:`YAML_MAX_DEPTH`, stopping at the bound.

    A YAML alias bomb parses cheaply, its aliases sharing one object, but anything that
    walks it (validation, the dump for logs and ``metrics.json``) visits every path: 3.5 GB
    in 40 s. This walk counts visits, not objects, so it stops after the bound.

    Raises
    ------
    ConfigError
    """
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > YAML_MAX_VALUES:
            raise ConfigError(
                f"{source}: YAML expands to more than {YAML_MAX_VALUES} values (aliases?); "
                "a job holds a few dozen"
            )
        if depth > YAML_MAX_DEPTH:
            raise ConfigError(f"{source}: YAML nested more than {YAML_MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            seen += len(node)  # the keys
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)


def parse_config(data: Any, source: str = "config") -> JobConfig:
    """Validate a mapping (parsed YAML, JSON or a flow parameter) into a :class:`JobConfig`.

    Raises
    ------
    ConfigError
        With one line naming ``source`` and the offending field.
    """
    if isinstance(data, JobConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    check_bounded(data, source)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | os.PathLike[str]) -> JobConfig:
    """Read and validate a YAML job file (``yaml.safe_load``).

    Parameters
    ----------
    path
        The job file.

    Raises
    ------
    ConfigError
        When the file is missing, is not valid YAML, or fails validation.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:  # at most one byte past the bound, whatever the file is
            raw = f.read(YAML_MAX_BYTES + 1)
        if len(raw) > YAML_MAX_BYTES:  # refused before decoding or parsing
            raise ConfigError(_too_large(str(p)))
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file ({type(exc).__name__})") from None
    data = load_yaml(text, str(p))
    if data is None:
        raise ConfigError(f"{p}: config file is empty")
    return parse_config(data, source=str(p))


def config_from_any(config: str | os.PathLike[str] | dict[str, Any] | JobConfig) -> JobConfig:
    """Accept a path, a YAML string, a mapping or a model (what flow parameters carry)."""
    if isinstance(config, JobConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    text = str(config)
    if "\n" in text or text.lstrip().startswith("{"):
        return parse_config(load_yaml(text, "config"))
    return load_config(text)


def check_unique_names(configs: list[JobConfig]) -> None:
    """Jobs run together (a batch, one ``serve``) must write to distinct result folders.

    Raises
    ------
    ConfigError
    """
    names = [c.name for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"name: jobs run together need distinct names; repeated: {repeated}")


def json_schema() -> str:
    """The job config's JSON Schema, pretty-printed."""
    schema = JobConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "zarr-factorize job"
    return json.dumps(schema, indent=2, ensure_ascii=False)


def redact(value: Any) -> Any:
    """Copy of ``value`` with secrets masked, by key name and by value shape.

    See :func:`pipeline.secrets.redact` (credential-like keys, auth tuples, Authorization
    headers, URL user-info, ``AccountKey=``/``SharedAccessSignature`` strings; references
    such as ``${env:NAME}`` stay visible).
    """
    from pipeline.secrets import redact as _redact

    return _redact(value)


def redacted_dump(config: JobConfig) -> dict[str, Any]:
    """The config as a JSON-able dict with secrets masked (for logs and provenance)."""
    return redact(config.model_dump(mode="json"))
