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
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError
from pipeline.methods import METHODS
from pipeline.methods.rank import UNION_TAGS
from pipeline.secrets import redact
from pipeline.sections import (
    MODEL_KINDS,
    NAME_MAX,
    NAME_PATTERN,
    SPARSE_KINDS,
    ClusterSpec,
    ComputeSpec,
    InputSpec,
    OutputSpec,
    StrictModel,
    SyntheticSpec,
    WaitForWorkers,
)

# Job files are a few hundred bytes (configs/ holds 390–500 B each). 1 MiB is ~2,000× that,
# parses in about a second and bounds the parser's memory (a 50 MB YAML list took 87 s and
# 2.2 GB); the value and depth bounds stop alias bombs, which are cheap to parse but
# explode when anything walks them.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_VALUES = 100_000
YAML_MAX_DEPTH = 100

AnyMethodSpec = Annotated[
    Union[tuple(m.spec for m in METHODS.values())],  # noqa: UP007 (built at run time)
    Field(discriminator="method"),
]


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
        model = [m.method for m in methods if METHODS[m.method].input == "model"]
        if model and len(methods) > 1:
            raise ValueError(
                f"{model[0]} reads a model checkpoint, not a matrix: list it alone in its job"
            )
        return methods

    @model_validator(mode="after")
    def _input_fits_the_methods(self) -> JobConfig:
        created = self.input.create_if_missing
        makes_model = created is not None and created.kind in MODEL_KINDS
        method = self.methods[0].method
        if self.input_kind == "model" and (self.input.array or (created and not makes_model)):
            raise ValueError(
                f"input: {method} reads a safetensors checkpoint at input.url; remove "
                "input.array, and create_if_missing unless its kind is transformer"
            )
        if self.input_kind == "model" and self.compute.backend == "cupy":
            raise ValueError(
                f"compute.backend: {method} runs its layers with numpy on the workers' CPUs; "
                "remove compute.backend: cupy"
            )
        if self.input_kind == "matrix" and makes_model:
            raise ValueError(
                f"input.create_if_missing.kind: {created.kind!r} writes a model checkpoint, "
                f"which {method} cannot read (method compress does)"
            )
        sparse_only = [m.method for m in self.methods if METHODS[m.method].needs_sparse]
        if sparse_only and self.compute.backend == "cupy":
            raise ValueError(
                f"compute.backend: {sparse_only[0]} runs its per-row solves with numpy on the "
                "workers' CPUs; remove compute.backend: cupy"
            )
        if sparse_only and created is not None and created.kind not in SPARSE_KINDS:
            raise ValueError(
                f"input.create_if_missing.kind: {sparse_only[0]} needs a sparse store whose "
                f"stored entries are the observations; {created.kind!r} writes a dense array "
                f"(use one of {', '.join(SPARSE_KINDS)})"
            )
        return self

    @property
    def input_kind(self) -> str:
        """``"model"`` when the job's method reads a checkpoint, else ``"matrix"``."""
        return METHODS[self.methods[0].method].input


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


def metrics_schema() -> str:
    """The JSON Schema of ``metrics.json``'s ``methods`` entry: each registered method's
    typed metrics (:attr:`pipeline.methods.base.Method.metrics`), pretty-printed."""
    from pydantic import TypeAdapter
    from typing_extensions import TypedDict

    methods = TypedDict(  # type: ignore[misc]
        "MethodsMetrics", {name: m.metrics for name, m in METHODS.items()}, total=False
    )
    schema = TypeAdapter(methods).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "zarr-factorize metrics.json: methods"
    return json.dumps(schema, indent=2, ensure_ascii=False)


def redacted_dump(config: JobConfig) -> dict[str, Any]:
    """The config as a JSON-able dict with secrets masked (for logs and provenance)."""
    return redact(config.model_dump(mode="json"))


__all__ = [  # the job model: JobConfig and, re-exported, its sections
    "ClusterSpec",
    "ComputeSpec",
    "InputSpec",
    "JobConfig",
    "OutputSpec",
    "SyntheticSpec",
    "WaitForWorkers",
    "check_unique_names",
    "config_from_any",
    "format_validation_error",
    "json_schema",
    "load_config",
    "metrics_schema",
    "parse_config",
    "redacted_dump",
]
