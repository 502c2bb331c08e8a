"""The job config model: loading, one-line errors naming file and field, schema, redaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import JobConfig, json_schema, load_config, parse_config, redact
from pipeline.errors import ConfigError
from tests.conftest import REPO

BASE = {"name": "x", "input": {"url": "a.zarr"}, "methods": [{"method": "tsqr"}]}


def with_(**over):
    job = json.loads(json.dumps(BASE))
    for dotted, value in over.items():
        node = job
        *path, last = dotted.split("__")
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
    return job


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")))
def test_example_configs_are_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig) and cfg.methods


def test_defaults():
    cfg = parse_config(BASE)
    assert cfg.cluster.kind == "local" and cfg.cluster.memory_limit == "auto"
    assert cfg.output.url == "artifacts" and cfg.output.overwrite is False
    assert cfg.methods[0].q is True and cfg.methods[0].transpose is False


@pytest.mark.parametrize(
    "job,expected",
    [
        (with_(methods__0__block_rows=0), "x.yaml: methods[0].block_rows: must be ≥ 1, got 0"),
        (with_(methods__0__q="maybe"), "x.yaml: methods[0].q: input should be a valid boolean"),
        (with_(methods__0__method="pca"), "x.yaml: methods[0]: unknown method 'pca'"),
        (with_(input__colour="red"), "x.yaml: input.colour: unknown key"),
        (with_(extra=1), "x.yaml: extra: unknown key"),
        (with_(name="a b"), "x.yaml: name: must match"),
        (with_(methods=[]), "x.yaml: methods: must have at least 1 item"),
        (with_(cluster={"kind": "address"}), "x.yaml: cluster: address is required"),
        (with_(cluster={"n_workers": 0}), "x.yaml: cluster.n_workers: must be ≥ 1, got 0"),
        (with_(methods=[{"method": "tsqr"}, {"method": "tsqr"}]), "listed twice"),
        ({"input": {"url": "a"}, "methods": [{"method": "tsqr"}]}, "x.yaml: name: required"),
        (with_(name="."), "x.yaml: name: must be a plain folder name, not starting with '.'"),
        (with_(name=".."), "x.yaml: name: must be a plain folder name"),
        (with_(name=".hidden"), "x.yaml: name: must be a plain folder name"),
        (with_(name="a/b"), "x.yaml: name: must match"),
        (with_(name="n" * 201), "x.yaml: name: must be at most 200 characters"),
        (with_(name="n" * 5000), "255-byte file-name limit), got 'nnnn"),
        (
            with_(methods=[{"method": "svd", "rank": True}]),
            "x.yaml: methods[0].rank: must be an integer, not a boolean, got true",
        ),
        (
            with_(methods=[{"method": "nmf", "rank": 2, "max_iter": False}]),
            "x.yaml: methods[0].max_iter: must be an integer, not a boolean, got false",
        ),
        (
            with_(methods=[{"method": "rsvd", "rank": 2, "seed": True}]),
            "x.yaml: methods[0].seed: must be an integer, not a boolean",
        ),
        (
            with_(methods=[{"method": "nmf", "rank": 2, "tol": True}]),
            "x.yaml: methods[0].tol: must be a number, not a boolean",
        ),
        (
            with_(methods=[{"method": "nmf", "rank": 2, "tol": float("nan")}]),
            "x.yaml: methods[0].tol: input should be a finite number",
        ),
        (with_(cluster={"n_workers": True}), "x.yaml: cluster.n_workers: must be an integer, not"),
        (
            with_(cluster={"connect_timeout": float("inf")}),
            "x.yaml: cluster.connect_timeout: input should be a finite number, got inf",
        ),
        (
            with_(cluster={"connect_timeout": 1e300}),
            "x.yaml: cluster.connect_timeout: must be ≤ 86400",
        ),
        (
            with_(cluster={"memory_limit": -5}),
            "x.yaml: cluster.memory_limit: must be 'auto' or at least 256 MiB per worker",
        ),
        (with_(cluster={"memory_limit": "-5GB"}), "x.yaml: cluster.memory_limit: must be 'auto'"),
        (with_(cluster={"memory_limit": "64MiB"}), "at least 256 MiB per worker"),
        (with_(cluster={"memory_limit": "lots"}), "a size such as '4GiB', got 'lots'"),
        (with_(cluster={"memory_limit": True}), "x.yaml: cluster.memory_limit: must be an int"),
        (
            with_(input__create_if_missing={"shape": [True, 5]}),
            "x.yaml: input.create_if_missing.shape: must be an integer, not a boolean",
        ),
    ],
)
def test_errors_name_file_and_field(job, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(job, source="configs/x.yaml")
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300
    assert msg.startswith("configs/x.yaml: ") and expected.split("x.yaml: ")[-1] in msg


def _renamed(key: str, to: str) -> dict:
    """BASE with its top-level ``key`` misspelt as ``to``."""
    job = json.loads(json.dumps(BASE))
    job[to] = job.pop(key)
    return job


@pytest.mark.parametrize(
    "job,expected",
    [
        # a misspelt required key: the unknown key is reported, not "required key is missing"
        (_renamed("input", "imput"), "imput: unknown key (did you mean 'input'?) (and 1 more)"),
        (_renamed("methods", "method"), "method: unknown key (did you mean 'methods'?) (and"),
        (with_(clustr={}), "clustr: unknown key (did you mean 'cluster'?)"),
        (
            with_(cluster={"n_worker": 2}),
            "cluster.n_worker: unknown key (did you mean 'n_workers'?)",
        ),
        (
            with_(methods=[{"method": "rsvd", "rnak": 3}]),
            "methods[0].rnak: unknown key (did you mean 'rank'?) (and 1 more)",
        ),
        (
            with_(methods=[{"method": "rsvd", "rank": {"max": 3, "enrgy": 0.9}}]),
            "methods[0].rank.enrgy: unknown key (did you mean 'energy'?)",
        ),
        (
            with_(methods=[{"method": "nmf", "rank": 2, "max_iters": 3}]),
            "methods[0].max_iters: unknown key (did you mean 'max_iter'?)",
        ),
        (
            with_(input__create_if_missing={"kind": "gaussian", "shpe": [3, 3]}),
            "input.create_if_missing.shpe: unknown key (did you mean 'shape'?)",
        ),
        (with_(output={"overwirte": True}), "output.overwirte: unknown key (did you mean"),
        (with_(methods=[{"method": "tsqr", "zzzz": 1}]), "methods[0].zzzz: unknown key"),
    ],
)
def test_unknown_key_names_the_closest_allowed_one(job, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(job, source="x.yaml")
    assert str(err.value).startswith(f"x.yaml: {expected}"), str(err.value)
    if "did you mean" not in expected:
        assert "did you mean" not in str(err.value)


def test_known_keys_follow_the_models():
    from pipeline.config import known_keys
    from pipeline.methods import METHODS

    assert {"input", "methods", "cluster", "output", "name"} <= set(known_keys(()))
    assert set(known_keys(("methods", 0, "nmf"))) == set(METHODS["nmf"].spec.model_fields)
    assert "kind" in known_keys(("input", "create_if_missing"))


def test_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(unsafe)
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\nlist:\n" + "- 1\n" * 300_000)
    with pytest.raises(ConfigError, match=r"huge.yaml: larger than 1 MiB"):
        load_config(huge)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: x\nx: " + "[" * 101 + "]" * 101 + "\n")
    with pytest.raises(ConfigError, match=r"deep.yaml: YAML nested more than 100 levels"):
        load_config(deep)
    deeper = tmp_path / "deeper.yaml"  # beyond Python's recursion limit in PyYAML itself
    deeper.write_text("name: x\nx: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match=r"deeper.yaml: YAML nested too deeply"):
        load_config(deeper)
    digits = tmp_path / "digits.yaml"
    digits.write_text("name: x\nseed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"digits.yaml: YAML value cannot be read: Exceeds"):
        load_config(digits)
    date = tmp_path / "date.yaml"
    date.write_text("name: x\nwhen: 2020-13-45\n")
    with pytest.raises(ConfigError, match=r"date.yaml: YAML value cannot be read: month"):
        load_config(date)


def test_schema_lists_exactly_the_implemented_methods():
    from pipeline.methods import METHODS

    schema = json.loads(json_schema())
    assert schema["title"] == "zarr-factorize job"
    mapping = schema["properties"]["methods"]["items"]["discriminator"]["mapping"]
    assert set(mapping) == set(METHODS)
    assert schema["additionalProperties"] is False
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values())


def test_redaction():
    cfg = {
        "url": "s3://user:pw@bucket/x",
        "storage_options": {
            "key": "AKIA",
            "secret": "s",
            "endpoint_url": "http://127.0.0.1:9000",
            "client_kwargs": {"aws_session_token": "t"},
        },
    }
    out = redact(cfg)
    assert out["url"] == "s3://***@bucket/x"
    assert out["storage_options"]["key"] == "***" and out["storage_options"]["secret"] == "***"
    assert out["storage_options"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert out["storage_options"]["client_kwargs"]["aws_session_token"] == "***"
