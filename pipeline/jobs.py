"""Running a job: the one place that joins config, input, methods and the output folder.

The steps are small functions over small values (configs, manifests, paths, dicts) so the
Prefect flow can call each from a task; :func:`run_job` chains them for use without
Prefect (notebooks, tests, scripts).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from distributed import Client, default_client

from pipeline.checkpoints import Checkpoints
from pipeline.cluster import check_cluster_available
from pipeline.config import JobConfig, NMFSpec, config_from_any, redact, redacted_dump
from pipeline.datasets import write_synthetic
from pipeline.fingerprint import job_fingerprint
from pipeline.io.artifacts import RunOutput, check_output_free, read_published
from pipeline.io.source import InputManifest, open_matrix
from pipeline.io.stores import split_url
from pipeline.methods import RUNNERS, check_applicable
from pipeline.reports import report_markdown

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


def input_will_be_created(config: JobConfig) -> bool:
    """True when the input store is absent and ``input.create_if_missing`` will write it."""
    spec = config.input
    if spec.create_if_missing is None:
        return False
    fs, path = split_url(spec.url, spec.storage_options)
    return not fs.exists(path)


def ensure_input(config: JobConfig) -> None:
    """Create the synthetic input of ``input.create_if_missing`` when the store is absent."""
    spec = config.input
    if input_will_be_created(config):
        write_synthetic(spec.url, spec.create_if_missing, spec.storage_options, spec.array)


def precheck(config: JobConfig) -> InputManifest | None:
    """Everything that can be refused before a cluster or Prefect starts.

    Returns the input's manifest, or ``None`` when the input will be created by the run
    (then only the cluster kind and the output are checked). A job that
    ``skip_if_complete`` will skip passes (its output exists, and that is fine).
    """
    if input_will_be_created(config):
        check_cluster_available(config.cluster)
        check_output_free(config.output, config.name)
        return None
    if completed_result(config) is not None:
        return open_matrix(config.input)[1]
    return inspect_job(config)


def inspect_job(config: JobConfig) -> InputManifest:
    """Open the input and check every method and the output, computing nothing.

    Raises
    ------
    InputError, ArtifactExistsError
    """
    check_cluster_available(config.cluster)
    _, manifest = open_matrix(config.input)
    for i, spec in enumerate(config.methods):
        check_applicable(spec, manifest.shape, i)
    check_output_free(config.output, config.name)
    return manifest


def completed_result(config: JobConfig) -> dict[str, Any] | None:
    """With ``skip_if_complete``: the published report when it answers this very job.

    That is, a complete result exists at ``<output.url>/<name>/`` and its fingerprint (config,
    input manifest and store, see :mod:`pipeline.fingerprint`) equals the current one.
    """
    if not config.skip_if_complete or input_will_be_created(config):
        return None
    report = read_published(config.output, config.name)
    if report is None:
        return None
    _, manifest = open_matrix(config.input)
    if report.get("input", {}).get("fingerprint") != job_fingerprint(config, manifest):
        log.info("%s: the config or the input changed since the published result", config.name)
        return None
    log.info(
        "%s: skipped — the result at %s is complete and config and input are unchanged",
        config.name,
        report.get("output"),
    )
    return {**report, "skipped": True}


def prepare_job(config: JobConfig) -> tuple[InputManifest, str]:
    """Create the input if asked, validate everything, open the staging folder.

    Returns
    -------
    (manifest, staging path)
    """
    ensure_input(config)
    manifest = inspect_job(config)
    manifest = replace(manifest, fingerprint=job_fingerprint(config, manifest))
    out = RunOutput(config.output, config.name)
    out.begin()
    log.info(
        "%s: input %s%s %s %s chunks %s; writing to %s",
        config.name,
        manifest.url,
        f" [{manifest.array}]" if manifest.array else "",
        "×".join(map(str, manifest.shape)),
        manifest.dtype,
        "×".join(map(str, manifest.chunks)),
        out.staging_url,
    )
    return manifest, out.staging


def _current_client() -> Client | None:
    try:
        return default_client()
    except ValueError:
        return None


def run_method(config: JobConfig, index: int, staging: str) -> dict[str, Any]:
    """Run ``config.methods[index]`` on the current Dask client; write into ``staging``."""
    spec = config.methods[index]
    a, _ = open_matrix(config.input)
    out = RunOutput(config.output, config.name, staging=staging)
    client = _current_client()
    result = RUNNERS[spec.method](spec, a, out, client)
    if client is not None:  # provenance: which cluster computed it
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        result["dask"] = {
            "scheduler": redact(client.scheduler.address),
            "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers),
        }
    log.info("%s: %s finished in %.1f s", config.name, spec.method, result["seconds"])
    return result


def publish_job(
    config: JobConfig,
    manifest: InputManifest,
    staging: str,
    results: dict[str, dict[str, Any]],
    started: str,
) -> dict[str, Any]:
    """Write ``metrics.json`` and move the result into place; return the metrics."""
    fro = next((r["fro_norm"] for r in results.values() if "fro_norm" in r), None)
    report = {
        "name": config.name,
        "status": "completed",
        "input": {**manifest.to_dict(), "fro_norm": fro},
        "methods": results,
        "config": redacted_dump(config),
        "versions": versions(),
        "started": started,
        "finished": now_iso(),
    }
    out = RunOutput(config.output, config.name, staging=staging)
    report["output"] = redact(out.final_url)
    out.write_bytes(REPORT, report_markdown(report).encode())
    out.publish(report)
    if any(isinstance(spec, NMFSpec) for spec in config.methods):
        Checkpoints(config.output, config.name).remove()  # the result supersedes it
    log.info("%s: result published at %s", config.name, report["output"])
    return report


def abort_job(config: JobConfig, staging: str | None) -> None:
    """Remove a failed run's staging folder (a published result is never touched)."""
    if staging:
        RunOutput(config.output, config.name, staging=staging).abort()


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
    from pipeline.cluster import cluster_from_spec

    cfg = config_from_any(config)
    started = now_iso()
    done = completed_result(cfg)
    if done is not None:
        return done
    manifest, staging = prepare_job(cfg)
    try:
        if client is None:
            with cluster_from_spec(cfg.cluster):
                results = _run_methods(cfg, staging)
        else:
            with client.as_current():
                results = _run_methods(cfg, staging)
        return publish_job(cfg, manifest, staging, results, started)
    except BaseException:
        abort_job(cfg, staging)
        raise


def _run_methods(cfg: JobConfig, staging: str) -> dict[str, dict[str, Any]]:
    return {spec.method: run_method(cfg, i, staging) for i, spec in enumerate(cfg.methods)}


__all__ = [
    "abort_job",
    "completed_result",
    "inspect_job",
    "prepare_job",
    "publish_job",
    "run_job",
    "run_method",
]
