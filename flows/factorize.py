"""Flows: ``factorize`` (one job: prepare → one task per method → publish, with a metrics
table, a Markdown report and a link as artifacts) and ``factorize-batch`` (several jobs as
concurrent flow runs sharing one Dask cluster).

The lifecycle is :func:`pipeline.jobs.execute`'s; this module only wraps its steps as
tasks. Tasks take and return small values (the config model, a
:class:`~pipeline.jobs.PreparedRun`, metric dicts); the Dask client lives in the flow's
cluster context and tasks use it as the default client. No task caches: inputs name data
that can change under the same path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.logging import get_run_logger
from pydantic import BeforeValidator

from pipeline.cluster import cluster_from_spec
from pipeline.config import JobConfig, check_unique_names, config_from_any
from pipeline.errors import UserError
from pipeline.io.stores import location_of
from pipeline.jobs import (
    PreparedRun,
    Steps,
    completed_result,
    compute,
    execute,
    plan,
    prepare,
    publish,
)
from pipeline.methods import METHODS
from pipeline.progress import Progress, progress_sink
from pipeline.reports import headline, png_data_uri, report_markdown
from pipeline.secrets import check_references, redact, scrubbed_errors
from pipeline.sections import ClusterSpec, OutputSpec

log = logging.getLogger(__name__)


def _as_config(value: Any) -> Any:
    """Parse a mapping, YAML text or a path into a JobConfig with our one-line errors."""
    if isinstance(value, JobConfig):
        return value
    try:
        return config_from_any(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None


# The flow parameter: typed by the config model, so the Prefect UI shows the job's schema;
# a path or YAML text (``prefect deployment run … --param config=job.yaml``) is also taken.
JobParameter = Annotated[JobConfig | str, BeforeValidator(_as_config)]


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
def prepare_task(config: JobConfig) -> PreparedRun:
    """Create the input if asked, check input and output, open the staging folder."""
    with scrubbed_errors():
        return prepare(config)


@task(name="compute", cache_policy=NO_CACHE)
def compute_task(run: PreparedRun, index: int) -> dict[str, Any]:
    """Run one method on the cluster and write its factors into the staging folder."""
    with scrubbed_errors():
        return compute(run, index)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(run: PreparedRun) -> PreparedRun:
    """Plan the methods for the cluster's workers (blocks, keep, passes, memory)."""
    with scrubbed_errors():
        return plan(run)


@task(
    name="publish",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_unless_user_error,
    cache_policy=NO_CACHE,
)
def publish_task(run: PreparedRun, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write metrics.json and the report, move the result into place."""
    with scrubbed_errors():
        return publish(run, results)


@task(name="check-complete", cache_policy=NO_CACHE)
def check_complete_task(config: JobConfig) -> dict[str, Any] | None:
    """With ``skip_if_complete``: the published report when it still answers this job."""
    with scrubbed_errors():
        return completed_result(config)


def _compute_named(run: PreparedRun, index: int) -> dict[str, Any]:
    return compute_task.with_options(name=f"compute-{run.steps[index]}")(run, index)


TASK_STEPS = Steps(
    check_complete=check_complete_task,
    prepare=prepare_task,
    plan=plan_task,
    compute=_compute_named,
    publish=publish_task,
)


def _metrics_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"method": m, "metric": k, "value": v} for m, k, v in headline(report)]


def _artifact_key(kind: str, name: str) -> str:
    key = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"{kind}-{key}"[:100]


def _link(url: str) -> str:
    """A clickable link for a result location (local paths become file:// URLs)."""
    return url if "://" in url else Path(url).resolve().as_uri()


class ProgressArtifacts:
    """A Prefect progress artifact per method of one job (``progress-<job>-<method>``),
    created at its first event and updated at each one, so the UI shows how far it is."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.ids: dict[str, Any] = {}

    def __call__(self, event: Progress) -> None:
        if event.job != self.job:  # a batch runs several jobs in this process
            return
        key = _artifact_key("progress", f"{event.job}-{event.method}")
        text = f"{event.method}: {event.done}/{event.total} {event.unit}(s) {event.detail}"
        if key in self.ids:
            update_progress_artifact(self.ids[key], progress=event.percent, description=text)
        else:
            self.ids[key] = create_progress_artifact(event.percent, key=key, description=text)


def _published_plots(report: dict[str, Any], output: OutputSpec) -> dict[str, bytes]:
    """The PNG plots of the published result ``<output.url>/<name>/``, by file name.

    A plot that cannot be read is left out (with a warning): the report then names its
    path, and the job, already published, does not fail for a picture.
    """
    where = location_of(output).join(report["name"])
    fs, folder = where.fs, where.path
    plots = {}
    for method in report.get("methods", {}):
        for plot in METHODS[method].plots:
            try:
                plots[plot] = fs.cat_file(f"{folder}/{plot}")
            except OSError as exc:  # FileNotFoundError, and the object stores' errors
                get_run_logger().warning("report: plot %s not read: %s", plot, redact(str(exc)))
    return plots


def _report_with_plots(report: dict[str, Any], output: OutputSpec) -> str:
    """The Markdown report with its plots inline (``data:`` URIs): the Prefect UI shows
    the artifact far from the result's files."""
    images = {name: png_data_uri(png) for name, png in _published_plots(report, output).items()}
    return report_markdown(report, images=images)


def publish_artifacts(report: dict[str, Any], output: OutputSpec) -> None:
    """Metrics table, Markdown report (plots and a diagram of the passes inline) and a link
    to the result, keyed by the job name.

    Parameters
    ----------
    report : the job's ``metrics.json`` content (credentials already masked)
    output : the job's output section, where the published plots are read from
    """
    name = report["name"]
    create_table_artifact(
        key=_artifact_key("metrics", name),
        table=_metrics_table(report),
        description=f"Metrics of {name}; factors at {report['output']}",
    )
    create_markdown_artifact(
        key=_artifact_key("report", name),
        markdown=_report_with_plots(report, output),
        description=f"Report of {name}",
    )
    create_link_artifact(
        key=_artifact_key("result", name),
        link=_link(report["output"]),
        link_text=f"{name}: factors.zarr, metrics.json, report.md",
        description=f"Where {name}'s result is",
    )


@contextmanager
def heartbeats(on: bool) -> Iterator[None]:
    """Prefect's flow-run heartbeats on (as configured) or off for the flow runs started in
    the block. They let a lasting server tell a crashed run; a temporary server dies with
    the run, so there they tell nothing, and their thread delays the end of each run by up
    to a second (it is joined at the end and sleeps in one-second steps)."""
    if on:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _run_name() -> str:
    """Name flow runs after the job: its ``name``, or the file stem of a path."""
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    if isinstance(config, JobConfig):
        return config.name
    if isinstance(config, dict) and isinstance(config.get("name"), str):
        return config["name"]
    if isinstance(config, str) and "\n" not in config:
        return Path(config).stem
    return "factorize"


@flow(name="factorize", flow_run_name=_run_name, validate_parameters=True)
def factorize(config: JobParameter) -> dict[str, Any]:
    """Run a factorization job.

    Parameters
    ----------
    config : the job (its YAML's content as a mapping); YAML text or a path to a YAML
        file (resolved on the machine that runs the flow) are accepted too

    Returns
    -------
    The job's ``metrics.json`` content (with ``"skipped": true`` when ``skip_if_complete``
    found the published result unchanged).
    """
    logger = log  # a `flows` logger: shown by the CLI, sent to the run's log like ours
    with scrubbed_errors():  # the run's state message is stored: no secret in it
        cfg = _as_config(config)  # already a JobConfig unless called with validation off
        logger.info("job %s: %d method(s) on %s", cfg.name, len(cfg.methods), redact(cfg.input.url))
        check_references(cfg)  # a missing variable or Secret block fails here, by key path
        with progress_sink(ProgressArtifacts(cfg.name)):
            report = execute(cfg, TASK_STEPS)
        publish_artifacts(report, cfg.output)
    if report.get("skipped"):
        logger.info(
            "job %s: skipped — result at %s is complete and unchanged", cfg.name, report["output"]
        )
    else:
        logger.info("job %s: completed; result at %s", cfg.name, report["output"])
    return report


@task(name="job", cache_policy=NO_CACHE)
def _job_in_batch(config: JobConfig) -> dict[str, Any]:
    """One job of a batch, as its own (nested) flow run."""
    with scrubbed_errors():
        return factorize(config=config)


@flow(name="factorize-batch", validate_parameters=True)
def factorize_batch(
    configs: list[JobParameter], cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run several jobs concurrently, each as its own flow run, on one shared Dask cluster.

    Parameters
    ----------
    configs : jobs, each as ``factorize`` accepts it (mapping, YAML text or path)
    cluster : the shared cluster (a ``cluster:`` section); default: the first job's

    Returns
    -------
    ``{job name: its metrics.json content}``. The batch fails, naming the failed jobs,
    when any job fails; the others still run to the end.
    """
    logger = log  # a `flows` logger: shown by the CLI, sent to the run's log like ours
    cfgs = [_as_config(c) for c in configs]
    check_unique_names(cfgs)
    spec = ClusterSpec(**cluster) if cluster else cfgs[0].cluster
    with cluster_from_spec(spec) as client:
        shared = ClusterSpec(kind="address", address=client.scheduler.address)
        logger.info("batch of %d jobs on %s", len(cfgs), shared.address)
        futures = [
            _job_in_batch.with_options(name=f"job-{c.name}").submit(
                c.model_copy(update={"cluster": shared})
            )
            for c in cfgs
        ]
        wait(futures)
    reports, failed = {}, []
    for cfg, fut in zip(cfgs, futures, strict=True):
        state = fut.state
        if state.is_completed():
            reports[cfg.name] = fut.result()
        else:
            failed.append(f"{cfg.name} ({state.message or state.name})")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(cfgs)} jobs failed: " + "; ".join(failed))
    return reports
