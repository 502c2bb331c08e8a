"""The output contract, checked for every registered method: a method cannot forget a piece.

Each method's own ``example`` entry runs as a real job (Zarr store on disk, the session
LocalCluster) and must produce exactly the arrays it declares with their dimension names,
the common metrics, its plots, report entries and table rows, leave nothing hidden behind
(staging folders, checkpoints) and never make the scheduler log a redefined key. Config,
schema and error paths come from the same registry.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from pydantic import TypeAdapter

from pipeline.config import json_schema, parse_config
from pipeline.errors import ConfigError
from pipeline.methods import METHODS
from tests.conftest import job_dict, write_anndata, write_array, write_model

COMMON_METRICS = {"residual_rel", "passes", "seconds", "fro_norm", "dask", "memory"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """A tall non-negative matrix every method accepts."""
    path = tmp_path_factory.mktemp("contract") / "in.zarr"
    rng = np.random.default_rng(0)
    a = rng.random((600, 4)) @ rng.random((4, 12)) + 0.01 * rng.random((600, 12))
    write_array(path, a, chunks=(150, 12))
    return path, a


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_watching_scheduler(job, dist_client):
    """Run the job; fail if the scheduler (in this process) saw a key redefined — the
    "Detected different `run_spec`" warning that can end in failures and deadlocks."""
    from pipeline import run_job

    handler = _Messages()
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addHandler(handler)
    try:
        report = run_job(job, client=dist_client)
    finally:
        scheduler_log.removeHandler(handler)
    collisions = [m for m in handler.messages if "run_spec" in m]
    assert not collisions, collisions[0]
    return report


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_writes_exactly_what_it_declares(name, matrix, tmp_path, dist_client):
    import zarr

    from pipeline.reports import headline

    method = METHODS[name]
    path, a = matrix
    job_input = {"url": str(path)}
    if method.input == "model":  # a checkpoint of many matrices, not one
        job_input["url"] = str(write_model(tmp_path / "model.safetensors"))
    if method.needs_sparse:  # the same entries, stored as observations (ALS's ratings)
        job_input = {"url": str(write_anndata(tmp_path / "in.zarr", a)), "array": "X"}
    job = job_dict(tmp_path, "", input=job_input, name=f"contract-{name}", methods=[method.example])
    report = _run_watching_scheduler(job, dist_client)
    out = tmp_path / "out" / f"contract-{name}"
    spec = parse_config(job).methods[0]

    root = zarr.open_group(str(out / "factors.zarr"), mode="r")
    group = root[name] if name in root else {}
    written = {key: tuple(arr.metadata.dimension_names) for key, arr in dict(group).items()}
    assert written == method.arrays_for(spec)
    # every other file is a declared plot or has a declared file stem
    written_files = {"factors.zarr", "metrics.json", "report.md", "adata.zarr"}
    others = {p.name for p in out.iterdir()} - written_files
    declared = {*method.plots, *method.files}
    undeclared = {f for f in others if f not in declared and f.split(".")[0] not in declared}
    assert not undeclared, undeclared

    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["methods"][name]
    common = COMMON_METRICS - ({"fro_norm"} if method.input == "model" else set())
    assert common <= set(result), common - set(result)
    TypeAdapter(method.metrics).validate_python(result)  # declared keys, declared types
    if method.input == "matrix":
        assert result["fro_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-10)
    shown = [key for method_name, key, _ in headline(report) if method_name == name]
    assert shown and set(shown) <= set(method.headline)

    text = (out / "report.md").read_text()
    assert f"### {name}" in text
    for key in shown:
        assert f"| {key} |" in text
    for plot in method.plots:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
        assert plot in text
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"contract-{name}"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_config_schema_and_error_paths(name):
    method = METHODS[name]
    assert method.spec.model_fields["method"].annotation.__args__ == (name,)
    mapping = json.loads(json_schema())["properties"]["methods"]["items"]["discriminator"]
    assert name in mapping["mapping"]
    job = {"name": "x", "input": {"url": "a.zarr"}, "methods": [{**method.example, "bogus": 1}]}
    with pytest.raises(ConfigError) as err:
        parse_config(job, source="x.yaml")
    assert str(err.value) == "x.yaml: methods[0].bogus: unknown key"
    # Every declared headline metric and plot is unique and the example is valid as is.
    assert len(set(method.headline)) == len(method.headline)
    assert "seconds" in method.headline
    parse_config({**job, "methods": [method.example]})


def test_metrics_schema_names_every_method_and_refuses_undeclared_keys():
    """``factorize schema --metrics`` covers every registered method, and a metric a
    method does not declare is refused (a new key must be declared with its type)."""
    from pydantic import ValidationError

    from pipeline.config import metrics_schema

    schema = json.loads(metrics_schema())
    assert set(schema["properties"]) == set(METHODS)
    for method in METHODS.values():
        with pytest.raises(ValidationError, match="undeclared"):
            TypeAdapter(method.metrics).validate_python({"undeclared": 1.0})
        TypeAdapter(method.metrics).validate_python({"residual_rel": None, "passes": 2})
