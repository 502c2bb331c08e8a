"""Operating jobs through a Prefect server: submit to a deployment, follow a run, serve.

Used by ``factorize submit`` and ``factorize serve``; the job config travels as the flow
run's ``config`` parameter (its content, not a path), so workers need no access to the
submitter's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import httpx
from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from flows.factorize import factorize
from pipeline.config import JobConfig
from pipeline.errors import UserError

DEFAULT_DEPLOYMENT = "factorize/submit"


class ServerError(UserError):
    """No Prefect server configured or reachable, or no such deployment (exit code 2)."""


def api_url() -> str:
    """The configured Prefect API URL; submission needs a real server."""
    url = PREFECT_API_URL.value()
    if not url:
        raise ServerError(
            "submit needs a Prefect server: set PREFECT_API_URL (e.g. "
            "http://127.0.0.1:4200/api after `prefect server start`)"
        )
    return url


def flow_run_url(flow_run_id: Any) -> str:
    """The UI page of a flow run."""
    ui = PREFECT_UI_URL.value() or api_url().removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _full_name(deployment: str) -> str:
    return deployment if "/" in deployment else f"factorize/{deployment}"


def submit(config: JobConfig, deployment: str = DEFAULT_DEPLOYMENT) -> FlowRun:
    """Create a flow run of ``deployment`` with the job's content as its parameter.

    Raises
    ------
    ServerError
        No API URL, server unreachable, or no such deployment.
    """
    url = api_url()
    name = _full_name(deployment)
    try:
        return run_deployment(
            name,
            parameters={"config": config.model_dump(mode="json")},
            timeout=0,
            as_subflow=False,
        )
    except ObjectNotFound:
        raise ServerError(
            f"--deployment: {name!r} does not exist on {url}; deploy it with "
            "`prefect deploy --all` from the repository root"
        ) from None
    except (httpx.ConnectError, httpx.TimeoutException) as exc:
        raise ServerError(f"cannot reach the Prefect API at {url}: {exc}") from None


def follow(
    flow_run_id: Any, poll_seconds: float = 2.0, on_state: Callable[[str], None] | None = None
) -> FlowRun:
    """Poll a flow run until it reaches a final state; report each new state."""
    last = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            label = state.name if state else "unknown"
            if label != last and on_state is not None:
                on_state(label)
            last = label
            if state is not None and state.is_final():
                return run
            time.sleep(poll_seconds)


def serve_jobs(
    configs: Sequence[JobConfig],
    cron: str | None = None,
    interval: float | None = None,
    timezone: str = "UTC",
) -> None:
    """Serve one deployment per job with the given schedule, without a work pool (blocks).

    Each deployment is named after its job; runs execute in subprocesses of this process.
    """
    schedules: list[Any] = []
    if cron:
        schedules = [Cron(cron, timezone=timezone)]
    elif interval:
        schedules = [Interval(timedelta(seconds=interval), timezone=timezone)]
    deployments = [
        factorize.to_deployment(
            name=cfg.name,
            parameters={"config": cfg.model_dump(mode="json")},
            schedules=schedules,
            description=f"factorize job {cfg.name} (served)",
        )
        for cfg in configs
    ]
    serve(*deployments)
