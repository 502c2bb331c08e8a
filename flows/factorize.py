"""The ``factorize`` flow: prepare → one task per method → publish, plus a metrics table.

Tasks take and return small values (the config model, a manifest, a staging path, metric
dicts); the Dask client lives in the flow's cluster context and tasks use it as the
default client. No task caches: inputs name data that can change under the same path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pipeline.cluster import cluster_from_spec
from pipeline.config import JobConfig, config_from_any
from pipeline.errors import UserError
from pipeline.io.source import InputManifest
from pipeline.jobs import TABLE_KEYS, abort_job, now_iso, prepare_job, publish_job, run_method


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups, never errors the user must fix (a missing file stays missing)."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


@task(
    name="prepare",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_unless_user_error,
    cache_policy=NO_CACHE,
)
def prepare(config: JobConfig) -> tuple[InputManifest, str]:
    """Create the input if asked, validate input and output, open the staging folder."""
    return prepare_job(config)


@task(name="compute", cache_policy=NO_CACHE)
def compute(config: JobConfig, index: int, staging: str) -> dict[str, Any]:
    """Run one method on the cluster and write its factors into the staging folder."""
    return run_method(config, index, staging)


@task(
    name="publish",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_unless_user_error,
    cache_policy=NO_CACHE,
)
def publish(
    config: JobConfig,
    manifest: InputManifest,
    staging: str,
    results: dict[str, dict[str, Any]],
    started: str,
) -> dict[str, Any]:
    """Write metrics.json and move the result into place."""
    return publish_job(config, manifest, staging, results, started)


def _metrics_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"method": method, "metric": key, "value": res[key]}
        for method, res in report["methods"].items()
        for key in TABLE_KEYS
        if res.get(key) is not None
    ]


def _artifact_key(name: str) -> str:
    key = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"metrics-{key}"[:100]


def _run_name() -> str:
    """Name flow runs after the job: ``name`` from a mapping, the file stem from a path."""
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    if isinstance(config, dict) and isinstance(config.get("name"), str):
        return config["name"]
    if isinstance(config, str) and "\n" not in config:
        return Path(config).stem
    return "factorize"


@flow(name="factorize", flow_run_name=_run_name, validate_parameters=True)
def factorize(config: dict[str, Any] | str) -> dict[str, Any]:
    """Run a factorization job.

    Parameters
    ----------
    config : the job as a mapping (the YAML's content), YAML text, or a path to a YAML
        file (resolved on the machine that runs the flow)

    Returns
    -------
    The job's ``metrics.json`` content.
    """
    logger = get_run_logger()
    cfg = config_from_any(config)
    started = now_iso()
    logger.info("job %s: %d method(s) on %s", cfg.name, len(cfg.methods), cfg.input.url)
    manifest, staging = prepare(cfg)
    try:
        with cluster_from_spec(cfg.cluster):
            results = {
                spec.method: compute.with_options(name=f"compute-{spec.method}")(cfg, i, staging)
                for i, spec in enumerate(cfg.methods)
            }
        report = publish(cfg, manifest, staging, results, started)
    except BaseException:
        abort_job(cfg, staging)
        raise
    create_table_artifact(
        key=_artifact_key(cfg.name),
        table=_metrics_table(report),
        description=f"Metrics of {cfg.name}; factors at {report['output']}",
    )
    logger.info("job %s: completed; result at %s", cfg.name, report["output"])
    return report
