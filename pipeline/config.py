"""Job configuration: pydantic models, the YAML loader and the JSON Schema.

The models here are the single source of truth for the job file (see the contract in
ARCHITECTURE.md): the CLI, the Prefect flow parameters and ``factorize schema`` all come
from :class:`JobConfig`. Unknown keys are errors, and every error names the file and the
field path, e.g. ``configs/x.yaml: methods[0].block_rows: must be ≥ 1, got 0``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.methods import METHODS
from pipeline.methods.base import StrictModel

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"

SYNTHETIC_KINDS = ("gaussian", "lowrank", "vandermonde", "nonnegative")
PACKAGED_KINDS = ("digits", "sample-image")


class SyntheticSpec(StrictModel):
    """Recipe for a matrix written to ``input.url`` when the store is missing."""

    kind: Literal["gaussian", "lowrank", "vandermonde", "nonnegative", "digits", "sample-image"] = (
        Field(
            "gaussian",
            description="gaussian: i.i.d. N(0,1); lowrank: decaying spectrum; vandermonde: "
            "ill-conditioned columns x**j; nonnegative: rank-10 W₀H₀ plus noise; digits: "
            "scikit-learn's 1797 × 64 handwritten digits; sample-image: scikit-learn's "
            "427 × 640 sample photo in grey levels (the last two need scikit-learn)",
        )
    )
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="(rows, columns); required for synthetic kinds, fixed for packaged data"
    )
    chunks: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="storage chunks; default: row blocks of about 32 MiB"
    )
    dtype: Literal["float32", "float64"] = "float64"
    seed: int = 0

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

    @field_validator("url")
    @classmethod
    def _url_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class ClusterSpec(StrictModel):
    """Which Dask cluster runs the job."""

    kind: Literal["local", "address", "local-cuda"] = Field(
        "local",
        description="local: embedded LocalCluster; address: an existing scheduler; "
        "local-cuda: LocalCUDACluster (needs the gpu extra)",
    )
    address: str | None = Field(None, description="scheduler address for kind: address")
    n_workers: int | None = Field(None, ge=1, description="local kinds: default from the machine")
    threads_per_worker: int | None = Field(None, ge=1)
    memory_limit: str | int = Field(
        "auto", description="per worker, e.g. '4GiB' or bytes; 'auto' splits the machine's memory"
    )
    connect_timeout: float = Field(20.0, gt=0, description="seconds to wait for kind: address")

    @model_validator(mode="after")
    def _address_matches_kind(self) -> ClusterSpec:
        if self.kind == "address" and not self.address:
            raise ValueError("address is required when kind is 'address'")
        if self.kind != "address" and self.address:
            raise ValueError(f"address is only used with kind: address (kind is {self.kind!r})")
        return self


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

    name: str = Field(pattern=NAME_PATTERN, description="names the run folder")
    input: InputSpec
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    methods: list[AnyMethodSpec] = Field(min_length=1)
    output: OutputSpec = Field(default_factory=OutputSpec)
    skip_if_complete: bool = Field(
        False,
        description="do nothing when the output holds a complete result of this same config "
        "and unchanged input (fingerprint of the config, input shape/chunks/dtype and store)",
    )

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
        return f"must be {sym} {ctx[key]}, got {got!r}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}, got {got!r}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s), got {len(got or [])}"
    if kind == "union_tag_invalid":
        return f"unknown method {ctx.get('tag')!r}; implemented: {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "each method needs a 'method:' key"
    msg = err["msg"].removeprefix("Value error, ")
    msg = f"{msg[0].lower()}{msg[1:]}"
    return f"{msg}, got {got!r}" if isinstance(got, str | int | float) else msg


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: ``<source>: <field path>: <what is wrong>`` for the first error."""
    errors = exc.errors()
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {_loc_to_path(tuple(first['loc']))}: {_describe(first)}{more}"


# --------------------------------------------------------------------------- loading


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
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file ({type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: YAML syntax error{where}: {problem}") from None
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
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: YAML syntax error: {exc}") from None
        return parse_config(data)
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


_SECRET_KEY = re.compile(r"(key|secret|token|password|passwd|credential|session)", re.I)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value: Any) -> Any:
    """Copy of ``value`` with secrets masked: credential-like keys and URL user-info."""
    if isinstance(value, dict):
        return {
            k: "***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub("***@", value)
    return value


def redacted_dump(config: JobConfig) -> dict[str, Any]:
    """The config as a JSON-able dict with secrets masked (for logs and provenance)."""
    return redact(config.model_dump(mode="json"))
