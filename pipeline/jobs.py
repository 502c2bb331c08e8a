"""The job lifecycle: the one place that joins config, input, methods and the output folder.

A job runs as a fixed sequence of steps over small values (a config, a
:class:`PreparedRun`, metric dicts):

1. ``check_complete`` — with ``skip_if_complete`` only: the published result, if it still
   answers this job;
2. ``prepare`` — create the input if asked, open it once, check every method and the
   output, open the staging folder;
3. ``plan`` — on the cluster: the job's :class:`~pipeline.plan.JobPlan` for the workers
   it got (blocks, keep, passes, predicted memory), refused when blocks cannot fit;
4. ``compute`` — one step per method, each opening the input once and executing its
   part of the plan;
5. ``publish`` — ``metrics.json`` (with the plan), the report, the atomic move into
   place, then the checkpoints the result supersedes are removed.

:func:`execute` runs those steps in order (on failure the staging folder is removed).
:func:`run_job` gives it the plain functions; the Prefect flow gives it the same
functions wrapped as tasks — one lifecycle, two executors.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from pipeline.config import JobConfig, config_from_any, redacted_dump
from pipeline.datasets import input_will_be_created, write_synthetic
from pipeline.errors import InputError
from pipeline.fingerprint import job_fingerprint
from pipeline.io.anndata_out import ADATA, index_names, write_anndata_output
from pipeline.io.artifacts import RunOutput, check_output_free, read_published
from pipeline.io.model import ModelManifest, open_model
from pipeline.io.owners import remove_stale_staging
from pipeline.io.preflight import check_input_creatable, check_output_apart, check_output_writable
from pipeline.io.source import InputManifest, locate_input, open_matrix
from pipeline.io.stores import Location, location_of
from pipeline.memory import measure_peaks, scheduler_workers
from pipeline.methods import METHODS, RunContext
from pipeline.plan import JobPlan, ModelJobPlan, plan_run
from pipeline.progress import Progress
from pipeline.progress import report as report_progress
from pipeline.reports import report_markdown
from pipeline.secrets import redact

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

REPORT = "report.md"  # next to metrics.json: the Markdown report of the run


def now_iso() -> str:
    """The current UTC time, ISO-8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("zarr-factorize", "dask", "distributed", "numpy", "scipy", "zarr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            out[pkg] = "unknown"
    return out


@dataclass(frozen=True)
class PreparedRun:
    """A job whose input is checked and whose staging folder is open.

    Attributes
    ----------
    config : the parsed job
    manifest : what was opened (a matrix's shape, chunks, dtype, or a checkpoint's
        tensors; the fingerprint with ``skip_if_complete``)
    staging : path of the staging folder in the output filesystem
    started : ISO-8601 time the run started
    plan : the plan the methods execute (set by the ``plan`` step, on the cluster)
    """

    config: JobConfig
    manifest: InputManifest | ModelManifest
    staging: str
    started: str
    plan: JobPlan | ModelJobPlan | None = None

    @property
    def steps(self) -> list[str]:
        """The compute steps, one per method, in order."""
        return [spec.method for spec in self.config.methods]

    def output(self) -> RunOutput:
        """The run's staging output (its location made once, here)."""
        return _run_output(self.config, location_of(self.config.output), self.staging)


def _run_output(config: JobConfig, where: Location, staging: str | None = None) -> RunOutput:
    """The job's staging output at ``where`` (``output.url`` resolved), as its output
    section asks (overwrite, codec)."""
    spec = config.output
    return RunOutput(where, config.name, staging, spec.overwrite, spec.codec)


# --------------------------------------------------------------------------- checks


def open_input(
    config: JobConfig, *, check_chunks: bool = False, on_device: bool = False
) -> tuple[Any, InputManifest | ModelManifest]:
    """The job's input, opened without reading values: a matrix (a dask array) or a model
    checkpoint (its headers), with the manifest of what was opened."""
    if config.input_kind == "model":
        return open_model(config.input)
    return open_matrix(config.input, check_chunks=check_chunks, on_device=on_device)


def check_methods(config: JobConfig, data: Any, manifest: InputManifest | ModelManifest) -> None:
    """Each method's own applicability check (rank, shape) for the opened input: a
    matrix's shape, or a checkpoint for a model method; a method that needs a sparse
    store (its stored entries are the observations) refuses a dense one.

    Raises
    ------
    InputError
    """
    for i, spec in enumerate(config.methods):
        method, where = METHODS[spec.method], f"methods[{i}]"
        if config.input_kind == "model":
            method.check(spec, data, where)
            continue
        if method.needs_sparse and manifest.format == "dense":
            raise InputError(
                f"{where}: {spec.method} needs a sparse store (CSR/CSC or AnnData) whose stored "
                f"entries are the observations; {manifest.url} is a dense array"
            )
        method.check(spec, manifest.shape, where)


def inspect_job(config: JobConfig, *, output: bool = True) -> InputManifest | ModelManifest:
    """Open the input once and check every method and the output, computing nothing.

    The output must be writable (:func:`pipeline.io.preflight.check_output_writable`);
    with ``output`` it must also be free (no result of this name, or ``overwrite``).

    Raises
    ------
    InputError, ConfigError, ArtifactExistsError, ClusterError
    """
    from pipeline.backend import check_backend_available
    from pipeline.cluster import check_cluster_available

    check_cluster_available(config.cluster)
    check_backend_available(config.compute, config.cluster)
    data, manifest = open_input(config, check_chunks=True)
    check_methods(config, data, manifest)
    out = location_of(config.output)
    check_output_writable(out, config.name)  # also in prepare: flows skip the CLI
    if output:
        check_output_free(out, config.name, config.output.overwrite)
    return manifest


def precheck(config: JobConfig) -> InputManifest | ModelManifest | None:
    """Everything ``factorize validate`` (and the CLI before starting) can refuse.

    Returns the input's manifest, or ``None`` when the input will be created by the run
    (then only the cluster kind and the output are checked). A job that
    ``skip_if_complete`` will skip passes (its output exists, and that is fine).
    """
    from pipeline.backend import check_backend_available
    from pipeline.cluster import check_cluster_available

    # also in prepare: flows skip the CLI
    check_output_apart(config.input, config.output, config.name)
    if input_will_be_created(config.input):
        check_cluster_available(config.cluster)
        check_backend_available(config.compute, config.cluster)
        check_input_creatable(config.input)
        out = location_of(config.output)
        check_output_writable(out, config.name)
        check_output_free(out, config.name, config.output.overwrite)
        return None
    if completed_result(config) is not None:
        return open_input(config)[1]
    return inspect_job(config)


# --------------------------------------------------------------------------- steps


def completed_result(config: JobConfig) -> dict[str, Any] | None:
    """With ``skip_if_complete``: the published report when it answers this very job.

    That is, a complete result exists at ``<output.url>/<name>/`` and its fingerprint (config,
    input manifest and store, see :mod:`pipeline.fingerprint`) equals the current one.
    Without ``skip_if_complete`` nothing is read or listed.
    """
    if not config.skip_if_complete or input_will_be_created(config.input):
        return None
    report = read_published(location_of(config.output), config.name)
    if report is None:
        return None
    _, manifest = open_input(config)
    if report.get("input", {}).get("fingerprint") != job_fingerprint(config, manifest):
        log.info("%s: the config or the input changed since the published result", config.name)
        return None
    log.info(
        "%s: skipped — the result at %s is complete and config and input are unchanged",
        config.name,
        report.get("output"),
    )
    return {**report, "skipped": True}


def prepare(config: JobConfig) -> PreparedRun:
    """Create the input if asked, open and check it once, open the staging folder."""
    started = now_iso()
    check_output_apart(config.input, config.output, config.name)  # flows skip the CLI
    if input_will_be_created(config.input):
        spec = config.input
        write_synthetic(spec.url, spec.create_if_missing, spec.storage_options, spec.array)
    manifest = inspect_job(config, output=False)  # out.begin() refuses an existing output
    if config.skip_if_complete:  # lists the input store: only when asked for
        manifest = replace(manifest, fingerprint=job_fingerprint(config, manifest))
    where = location_of(config.output)
    remove_stale_staging(where, config.name)  # of runs killed outright
    out = _run_output(config, where)
    out.begin()  # removes what it created when it fails
    try:
        log.info(
            "%s: input %s: %s; writing to %s",
            config.name,
            manifest.url,
            manifest.describe(),
            redact(out.staging_url),
        )
        return PreparedRun(config, manifest, out.staging, started)
    except BaseException:  # a retried prepare must not leak this staging folder
        out.abort()
        raise


def _current_client() -> Client | None:
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def plan(run: PreparedRun) -> PreparedRun:
    """The run with the plan its methods execute, made for the current client's workers
    (see :func:`pipeline.plan.plan_run`)."""
    return replace(run, plan=plan_run(run.config, _current_client()))


def _names(config: JobConfig) -> Callable[[str, list[int]], list[str] | None]:
    """The ids of the input's rows and columns, read on demand (an AnnData input's
    ``obs``/``var`` index; ``None`` for other inputs)."""
    at = locate_input(config.input)
    return lambda part, positions: index_names(at, part, positions)


def compute(run: PreparedRun, index: int) -> dict[str, Any]:
    """Run method ``index`` of the job as planned, on the current Dask client, into the
    staging folder."""
    from pipeline.checkpoints import Checkpoints
    from pipeline.cluster import guard_workers

    config, job_plan = run.config, run.plan
    if job_plan is None:
        raise RuntimeError("compute needs the plan step first")
    spec = config.methods[index]
    method = METHODS[spec.method]
    t0 = time.perf_counter()
    client = _current_client()
    a, _ = open_input(config, on_device=job_plan.backend != "numpy")
    out = run.output()
    ctx = RunContext(
        method,
        out,
        client,
        config.name,
        job_plan.methods[index],
        job_plan.backend,
        Checkpoints(out.out, config.name) if method.checkpoints else None,
        _names(config) if method.needs_sparse else None,
    )
    report_progress(Progress(config.name, spec.method, 0, 1, "step"))
    with guard_workers(client, spec.method), measure_peaks(client) as peaks:
        result = method.run(spec, a, ctx)
    # The runner's kept input and factors are futures inside reference cycles (graphs,
    # results): collect them now, or the workers hold them through the next method.
    del a, ctx
    gc.collect()
    report_progress(Progress(config.name, spec.method, 1, 1, "step"))
    result["backend"] = job_plan.backend
    result["memory"] = {"predicted_peak": job_plan.methods[index].peak, **peaks.to_dict()}
    result["seconds"] = time.perf_counter() - t0
    if client is not None:  # provenance: which cluster computed it
        workers = scheduler_workers(client).values()
        result["dask"] = {
            "scheduler": redact(client.scheduler.address),
            "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers),
        }
    log.info("%s: %s finished in %.1f s", config.name, spec.method, result["seconds"])
    return result


def publish(run: PreparedRun, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write ``metrics.json`` and the report, move the result into place; return the metrics.

    Safe to repeat (Prefect retries it): a publish of this run that already got the
    result in place returns that result's metrics (see :mod:`pipeline.io.artifacts`).
    """
    config = run.config
    fro = next((r["fro_norm"] for r in results.values() if "fro_norm" in r), None)
    report = {
        "name": config.name,
        "status": "completed",
        "input": {**run.manifest.to_dict(), "fro_norm": fro},
        "methods": results,
        "plan": None if run.plan is None else run.plan.to_dict(),
        "config": redacted_dump(config),
        "versions": versions(),
        "started": run.started,
        "finished": now_iso(),
    }
    out = run.output()
    report["output"] = redact(out.final_url)
    report["run_id"] = out.run_id
    done = out.published()  # a retried publish whose first try got the result in place
    if done is not None:
        report = done
    else:
        slots = {
            spec.method: METHODS[spec.method].anndata(spec)
            for spec in config.methods
            if METHODS[spec.method].anndata is not None
        }
        if slots and write_anndata_output(out, locate_input(config.input), slots, results):
            report["anndata"] = ADATA
        out.write_bytes(REPORT, report_markdown(report).encode())
    out.publish(report)  # idempotent; also removes staging a first try left behind
    if any(METHODS[spec.method].checkpoints for spec in config.methods):
        from pipeline.checkpoints import Checkpoints

        Checkpoints(out.out, config.name).remove()  # the result supersedes them
    log.info("%s: result published at %s", config.name, report["output"])
    return report


def abort(run: PreparedRun) -> None:
    """Remove a failed run's staging folder (a published result is never touched)."""
    run.output().abort()


# --------------------------------------------------------------------------- executors


@dataclass(frozen=True)
class Steps:
    """The lifecycle's steps; the flow swaps in the same functions wrapped as tasks."""

    check_complete: Callable[[JobConfig], dict[str, Any] | None] = completed_result
    prepare: Callable[[JobConfig], PreparedRun] = prepare
    plan: Callable[[PreparedRun], PreparedRun] = plan
    compute: Callable[[PreparedRun, int], dict[str, Any]] = compute
    publish: Callable[[PreparedRun, dict[str, dict[str, Any]]], dict[str, Any]] = publish


@contextmanager
def _cluster(config: JobConfig, client: Client | None) -> Iterator[None]:
    """``client`` as the current client, or the job's own cluster for the duration."""
    if client is not None:
        with client.as_current():
            yield
        return
    from pipeline.cluster import cluster_from_spec

    with cluster_from_spec(config.cluster):
        yield


def execute(config: JobConfig, steps: Steps = Steps(), client: Client | None = None) -> dict:
    """Run a job's steps in order; on any failure remove its staging folder and re-raise.

    Returns
    -------
    The content of ``metrics.json`` (with ``"skipped": true`` when ``skip_if_complete``
    found the published result unchanged).
    """
    done = steps.check_complete(config)
    if done is not None:
        return done
    run = steps.prepare(config)
    try:
        with _cluster(config, client):
            run = steps.plan(run)
            results = {name: steps.compute(run, i) for i, name in enumerate(run.steps)}
        return steps.publish(run, results)
    except BaseException:
        abort(run)
        raise


def run_job(config: Any, client: Client | None = None) -> dict[str, Any]:
    """Run a whole job without Prefect on ``client`` (or the job's own cluster).

    Parameters
    ----------
    config : path, YAML text, mapping or :class:`~pipeline.config.JobConfig`
    client : an existing ``distributed.Client``; ``None`` starts ``config.cluster``

    Returns
    -------
    The content of ``metrics.json``.
    """
    return execute(config_from_any(config), client=client)


__all__ = [
    "PreparedRun",
    "Steps",
    "abort",
    "completed_result",
    "compute",
    "execute",
    "inspect_job",
    "plan",
    "precheck",
    "prepare",
    "publish",
    "run_job",
]
