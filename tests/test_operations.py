"""Operations against a real Prefect server and process worker on 127.0.0.1.

The module starts ``prefect server start`` on a free loopback port with its own
PREFECT_HOME, creates the ``factorize`` process work pool, deploys ``prefect.yaml`` from the
repository root and starts ``prefect worker start``; the tests submit jobs with the
``factorize`` CLI and ``prefect deployment run``, serve a job on an interval schedule, and
read flow runs and artifacts back through the REST API. Everything is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO, factorize_cmd, job_dict, write_array, write_job

BIN = Path(sys.executable).parent
POOL = "factorize"
# Credentials that only the worker's environment holds (jobs refer to them by name).
WORKER_SECRETS = {
    "ZF_SUBMIT_KEY": "AKIAZFSUBMIT00000003",
    "ZF_SUBMIT_SECRET": "zf-submit-secret-S12",
}


def _wait_until(check, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Server:
    """A running Prefect server: its environment for child processes and a REST helper."""

    def __init__(self, env: dict[str, str], url: str) -> None:
        self.env, self.url = env, url

    def post(self, path: str, body: dict | None = None) -> object:
        r = httpx.post(f"{self.url}{path}", json=body or {}, timeout=30)
        r.raise_for_status()
        return r.json()

    def get(self, path: str) -> object:
        r = httpx.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def flow_runs(self, **flow_run_filter) -> list[dict]:
        body = {"flow_runs": flow_run_filter} if flow_run_filter else {}
        return self.post("/flow_runs/filter", body)

    def artifacts(self, flow_run_id: str) -> list[dict]:
        return self.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw
        )


@pytest.fixture(scope="module")
def server(prefect_server) -> Server:
    """The session's lasting Prefect server (with its services: the scheduler serves the
    interval schedule) and the environment of this module's processes: the API configured,
    and quick worker and runner polls."""
    from pipeline.lifetime import OFFLINE_ENV

    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PREFECT_API_URL": prefect_server.api_url,
        "PREFECT_UI_URL": prefect_server.url,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    return Server(env, prefect_server.api_url)


@pytest.fixture(scope="module")
def worker(server: Server, tmp_path_factory) -> Iterator[Server]:
    """The ``factorize`` pool, ``prefect deploy --all`` from the repo, one process worker."""
    prefect = str(BIN / "prefect")
    r = server.run([prefect, "work-pool", "create", POOL, "--type", "process"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = server.run([prefect, "deploy", "--all", "--no-prompt"], cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [prefect, "worker", "start", "--pool", POOL],
        env={**server.env, **WORKER_SECRETS},  # flow runs inherit them
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield server
    finally:
        _stop(proc)
        log.close()


def _job(tmp_path: Path, name: str, data: np.ndarray, **over) -> Path:
    write_array(tmp_path / f"{name}.zarr", data, chunks=(max(1, data.shape[0] // 4), data.shape[1]))
    job = job_dict(
        tmp_path,
        str(tmp_path / f"{name}.zarr"),
        name=name,
        cluster={"n_workers": 1, "threads_per_worker": 1},
        **over,
    )
    return write_job(tmp_path, job, f"{name}.yaml")


def _submit(server: Server, *args: str) -> subprocess.CompletedProcess:
    return server.run([*factorize_cmd(), "submit", *args], timeout=400)


def _run_id(stdout: str) -> str:
    # "<file>: submitted flow run <name> (<uuid>) — <url>"
    return stdout.split("(", 1)[1].split(")", 1)[0]


def test_deploy_defines_submit_batch_and_a_cron_schedule(worker: Server):
    names = {d["name"] for d in worker.post("/deployments/filter")}
    assert {"submit", "nightly-demo", "nightly-als", "batch"} <= names
    als = next(d for d in worker.post("/deployments/filter") if d["name"] == "nightly-als")
    assert als["parameters"] == {"config": "configs/ratings-als.yaml"}
    assert [s["schedule"]["cron"] for s in als["schedules"]] == ["0 3 * * *"]
    nightly = next(d for d in worker.post("/deployments/filter") if d["name"] == "nightly-demo")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    submit = next(d for d in worker.post("/deployments/filter") if d["name"] == "submit")
    assert submit["schedules"] == []
    # the server's scheduler creates the upcoming runs (needs sqlalchemy < 2.1)
    scheduled = _wait_until(
        lambda: worker.flow_runs(
            deployment_id={"any_": [nightly["id"]]}, state={"type": {"any_": ["SCHEDULED"]}}
        ),
        90,
        "scheduled runs of nightly-demo",
    )
    assert all(
        r["expected_start_time"].endswith(("02:00:00Z", "02:00:00+00:00")) for r in scheduled
    )


def test_submit_wait_runs_the_job_on_the_worker_with_artifacts(tmp_path, worker: Server):
    a = np.random.default_rng(0).standard_normal((4000, 12))
    path = _job(
        tmp_path, "submitted", a, methods=[{"method": "tsqr"}, {"method": "rsvd", "rank": 4}]
    )
    r = _submit(worker, str(path), "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted flow run" in r.stdout and "/runs/flow-run/" in r.stdout
    assert "Completed" in r.stdout
    metrics = json.loads((tmp_path / "out" / "submitted" / "metrics.json").read_text())
    assert metrics["methods"]["tsqr"]["residual_rel"] < 1e-13
    assert (tmp_path / "out" / "submitted" / "report.md").read_text().startswith("# submitted")
    run = worker.get(f"/flow_runs/{_run_id(r.stdout)}")
    assert run["state"]["type"] == "COMPLETED" and run["name"] == "submitted"
    assert run["parameters"]["config"]["name"] == "submitted"  # the content, not a path
    arts = {a["key"]: a for a in worker.artifacts(run["id"])}
    assert arts["metrics-submitted"]["type"] == "table"
    report = arts["report-submitted"]["data"]
    assert "## Input" in report and "### rsvd" in report and "4000×12" in report
    link = arts["result-submitted"]["data"]  # Prefect stores a link as Markdown
    assert link.startswith("[") and (tmp_path / "out" / "submitted").as_uri() in link


def test_bad_file_is_refused_before_submission(tmp_path, worker: Server):
    before = len(worker.flow_runs())
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ninput: {url: /nowhere.zarr}\nmethods: [{method: lu}]\n")
    r = _submit(worker, str(bad))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "methods[0]" in r.stderr, r.stderr
    missing = _job(tmp_path, "gone", np.ones((10, 2)))
    (tmp_path / "gone.zarr").rename(tmp_path / "moved.zarr")
    r = _submit(worker, str(missing))
    assert r.returncode == 2 and "does not exist" in r.stderr
    good = _job(tmp_path, "nowhere", np.ones((10, 2)))
    r = _submit(worker, str(good), "--deployment", "no-such-deployment")
    assert r.returncode == 2 and "'factorize/no-such-deployment' does not exist" in r.stderr
    assert len(worker.flow_runs()) == before


def test_failing_job_ends_failed_with_a_readable_message(tmp_path, worker: Server):
    x = np.ones((400, 5))
    x[123, 2] = -1.0  # only the run's first pass can see this
    path = _job(tmp_path, "negative", x, methods=[{"method": "nmf", "rank": 2}])
    r = _submit(worker, str(path), "--wait")
    assert r.returncode == 1
    assert "non-negative" in r.stderr and "Failed" in r.stderr, r.stderr
    run = worker.get(f"/flow_runs/{_run_id(r.stdout)}")
    assert run["state"]["type"] == "FAILED" and "non-negative" in run["state"]["message"]
    assert not (tmp_path / "out" / "negative").exists()


def test_prefect_deployment_run_with_a_config_path(tmp_path, worker: Server):
    path = _job(tmp_path, "by_path", np.random.default_rng(1).standard_normal((2000, 6)))
    r = worker.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "factorize/submit",
            "--param",
            f"config={path}",
            "--watch",
        ],
        timeout=400,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "out" / "by_path" / "metrics.json").read_text())["name"] == (
        "by_path"
    )


def test_skip_if_complete_skips_an_unchanged_job(tmp_path, worker: Server):
    a = np.random.default_rng(2).standard_normal((3000, 8))
    path = _job(tmp_path, "nightly", a, skip_if_complete=True)
    first = _submit(worker, str(path), "--wait")
    assert first.returncode == 0, first.stdout + first.stderr
    metrics = tmp_path / "out" / "nightly" / "metrics.json"
    finished = json.loads(metrics.read_text())["finished"]
    second = _submit(worker, str(path), "--wait")
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(metrics.read_text())["finished"] == finished  # nothing recomputed
    arts = {a["key"]: a for a in worker.artifacts(_run_id(second.stdout))}
    assert "**Skipped**" in arts["report-nightly"]["data"]


def test_serve_runs_a_job_on_an_interval_schedule(tmp_path, server: Server):
    rng = np.random.default_rng(3)  # skip_if_complete: the runs after the first are no-ops
    path = _job(tmp_path, "served", rng.standard_normal((2000, 5)), skip_if_complete=True)
    log = open(tmp_path / "serve.log", "w")
    # 20 s, not less: on a loaded 2-core machine a first run (cluster start included) can
    # outlast a shorter interval, and the runs that pile up starve each other.
    proc = subprocess.Popen(
        [*factorize_cmd(), "serve", str(path), "--interval", "20"],
        env=server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def completed() -> list[dict]:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            return server.flow_runs(
                name={"any_": ["served"]}, state={"type": {"any_": ["COMPLETED"]}}
            )

        (run, *_) = _wait_until(completed, 240, "a completed run of the served job", every=2)
        assert (tmp_path / "out" / "served" / "metrics.json").exists()
        deployment = server.get(f"/deployments/{run['deployment_id']}")
        assert deployment["name"] == "served"
        assert deployment["schedules"][0]["schedule"]["interval"] == 20.0
    finally:
        _stop(proc)
        log.close()


def test_submit_sends_references_never_literal_credentials(tmp_path, worker: Server, s3):
    """A literal credential is refused before submission; ``${env:…}`` references are
    resolved by the worker, and no byte of the server's PREFECT_HOME (its database
    included) holds a secret value."""
    fs = s3.filesystem()
    write_array(tmp_path / "in.zarr", np.random.default_rng(4).standard_normal((1000, 5)))
    bucket = s3.make_bucket("zf-submit")
    fs.put(str(tmp_path / "in.zarr"), "zf-submit/in.zarr", recursive=True)

    def job(name: str, key: str, secret: str) -> Path:
        options = {"key": key, "secret": secret, "endpoint_url": s3.endpoint}
        spec = job_dict(
            tmp_path,
            f"{bucket}/in.zarr",
            name=name,
            input={"url": f"{bucket}/in.zarr", "storage_options": options},
            cluster={"n_workers": 1, "threads_per_worker": 1},
        )
        return write_job(tmp_path, spec, f"{name}.yaml")

    before = len(worker.flow_runs())
    literal = job("literal", *WORKER_SECRETS.values())
    r = _submit(worker, str(literal))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "input.storage_options.key (and 1 more): a literal credential" in r.stderr
    assert "${env:NAME}" in r.stderr and "${secret:NAME}" in r.stderr
    assert len(worker.flow_runs()) == before

    referenced = job("referenced", "${env:ZF_SUBMIT_KEY}", "${env:ZF_SUBMIT_SECRET}")
    # The submitter does not hold the variables: only the worker opens the input.
    r = _submit(worker, str(referenced), "--no-check-input", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.loads((tmp_path / "out" / "referenced" / "metrics.json").read_text())
    assert metrics["config"]["input"]["storage_options"]["secret"] == "${env:ZF_SUBMIT_SECRET}"
    run = worker.get(f"/flow_runs/{_run_id(r.stdout)}")
    assert run["parameters"]["config"]["input"]["storage_options"]["key"] == "${env:ZF_SUBMIT_KEY}"
    home = Path(worker.env["PREFECT_HOME"])
    leaks = [
        f"{path}: {value}"
        for path in [*home.rglob("*"), *(tmp_path / "out").rglob("*")]
        if path.is_file()
        for value in WORKER_SECRETS.values()
        if value.encode() in path.read_bytes()
    ]
    assert leaks == []
    assert not [v for v in WORKER_SECRETS.values() if v in r.stdout + r.stderr]
