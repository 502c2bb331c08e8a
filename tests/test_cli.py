"""The factorize command as users run it: exit codes, one-line errors, nothing written."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.conftest import job_dict, one_line_exit, write_array, write_job


def assert_one_line_error(proc, *needles):
    line = one_line_exit(proc)
    for needle in needles:
        assert needle in line, line


def _bad_cases(tmp_path):
    """(name, job file or path, expected substrings) for every kind of bad input."""
    import zarr

    from tests.test_validate_hardening import alias_bomb_yaml

    good = tmp_path / "good.zarr"
    write_array(good, np.ones((50, 4)))
    write_array(tmp_path / "grp.zarr", np.ones((50, 4)), name="A")
    write_array(tmp_path / "one.zarr", np.ones(50))
    write_array(tmp_path / "three.zarr", np.ones((5, 5, 5)))
    write_array(tmp_path / "empty.zarr", np.ones((0, 4)))
    write_array(tmp_path / "wide.zarr", np.ones((4, 50)))
    zarr.create_array(store=str(tmp_path / "text.zarr"), shape=(5, 5), dtype=str)
    bad_yaml = tmp_path / "syntax.yaml"
    bad_yaml.write_text("name: demo\ninput: {url: x\n")
    (tmp_path / "afile").write_text("a file where a folder belongs")
    (tmp_path / "outf").mkdir()
    (tmp_path / "outf" / "job").write_text("a file where the result folder belongs")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb_yaml(str(good)))
    big = tmp_path / "big.yaml"  # 50 MB: took 87 s and 2.2 GB before the size bound
    big.write_text(f"name: big\ninput: {{url: {good}}}\nx:\n" + "- 1\n" * 12_500_000)

    def job(name, **over):
        return write_job(tmp_path, job_dict(tmp_path, str(good), **over), f"{name}.yaml")

    def on(name, url, **inp):
        return job(name, input={"url": str(url), **inp})

    def named(filename, value):
        return write_job(tmp_path, job_dict(tmp_path, str(good), name=value), f"{filename}.yaml")

    return [
        ("missing file", tmp_path / "nope.yaml", ["nope.yaml", "not found"]),
        ("yaml syntax", bad_yaml, ["syntax.yaml", "YAML syntax error at line"]),
        ("unknown key", job("unknown", colour="red"), ["unknown.yaml", "colour: unknown key"]),
        (
            "misspelt key",
            job("typo", methods=[{"method": "rsvd", "rnak": 2}]),
            ["methods[0].rnak: unknown key (did you mean 'rank'?)"],
        ),
        ("wrong type", job("type", methods=[{"method": "tsqr", "q": [1]}]), ["methods[0].q"]),
        (
            "out of range",
            job("range", methods=[{"method": "tsqr", "block_rows": 0}]),
            ["methods[0].block_rows: must be ≥ 1, got 0"],
        ),
        ("input missing", on("nopath", tmp_path / "absent.zarr"), ["input.url", "does not exist"]),
        (
            "array missing",
            on("noarr", tmp_path / "grp.zarr", array="B"),
            ["input.array", "'B' not found", "A"],
        ),
        ("1-D", on("oned", tmp_path / "one.zarr"), ["2-D", "1-D"]),
        ("3-D", on("threed", tmp_path / "three.zarr"), ["2-D", "3-D"]),
        ("non-numeric", on("text", tmp_path / "text.zarr"), ["non-numeric dtype"]),
        ("empty", on("empty", tmp_path / "empty.zarr"), ["is empty"]),
        ("wide", on("wide", tmp_path / "wide.zarr"), ["methods[0]", "transpose: true"]),
        ("no cuda", job("cuda", cluster={"kind": "local-cuda"}), ["local-cuda", "[gpu-cu12]"]),
        (
            "rsvd rank 0",
            job("rank0", methods=[{"method": "rsvd", "rank": 0}]),
            ["methods[0].rank: must be ≥ 1, got 0"],
        ),
        (
            "rsvd rank too big",
            job("rankbig", methods=[{"method": "rsvd", "rank": 9}]),
            ["methods[0].rank: must be between 1 and 4", "got 9"],
        ),
        (
            "rsvd bad option",
            job("iters", methods=[{"method": "rsvd", "rank": 2, "power_iters": -1}]),
            ["methods[0].power_iters: must be ≥ 0"],
        ),
        (
            "nmf bad solver",
            job("solver", methods=[{"method": "nmf", "rank": 2, "solver": "als"}]),
            ["methods[0].solver"],
        ),
        ("name ..", named("dotdot", ".."), ["dotdot.yaml: name: must be a plain folder"]),
        ("long name", named("long", "n" * 5000), ["name: must be at most 200 characters"]),
        (
            "bool as int",
            job("booly", methods=[{"method": "svd", "rank": True}]),
            ["methods[0].rank: must be an integer, not a boolean, got true"],
        ),
        (
            "infinite timeout",
            job("inf", cluster={"connect_timeout": float("inf")}),
            ["cluster.connect_timeout: input should be a finite number, got inf"],
        ),
        (
            "negative memory",
            job("mem", cluster={"memory_limit": -5}),
            ["cluster.memory_limit: must be 'auto' or at least 256 MiB", "got -5"],
        ),
        (
            "output under a file",
            job("outfile", output={"url": str(tmp_path / "afile" / "out")}),
            ["output.url: ", "afile is a file, not a folder"],
        ),
        (
            "result path is a file",
            job("resfile", output={"url": str(tmp_path / "outf"), "overwrite": True}),
            ["output: ", "outf/job exists and is not a result folder"],
        ),
        (
            "create beyond free space",
            on("huge", tmp_path / "new.zarr", create_if_missing={"shape": [10**9, 10**9]}),
            ["input.create_if_missing: a 1000000000×1000000000 float64 matrix needs 6.9 EiB"],
        ),
        ("alias bomb", bomb, ["bomb.yaml: YAML expands to more than 100000 values (aliases?)"]),
        ("50 MB file", big, ["big.yaml: larger than 1 MiB"]),
    ]


def test_every_bad_input_exits_2_with_one_line_and_writes_nothing(cli, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    cases = _bad_cases(tmp_path)
    with ThreadPoolExecutor(3) as pool:  # the CLI's start-up dominates: overlap it
        procs = list(pool.map(lambda c: cli("run", c[1], cwd=tmp_path, timeout=180), cases))
    for (name, path, needles), proc in zip(cases, procs, strict=True):
        try:  # every error names the job file (and the field or the input it is about)
            assert_one_line_error(proc, path.name, *needles)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
    assert not (tmp_path / "out").exists(), "a bad case wrote output"


def test_existing_output_is_refused_and_untouched(cli, tmp_path):
    write_array(tmp_path / "in.zarr", np.ones((50, 4)))
    done = tmp_path / "out" / "job"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text('{"status": "completed"}')
    path = write_job(tmp_path, job_dict(tmp_path, str(tmp_path / "in.zarr")))
    proc = cli("run", path)
    assert_one_line_error(proc, "already exists", "overwrite: true")
    assert (done / "metrics.json").read_text() == '{"status": "completed"}'
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["job"]


def test_validate_reports_without_computing(cli, tmp_path):
    write_array(
        tmp_path / "in.zarr",
        np.ones((300, 7), dtype=np.int32),
        chunks=(100, 7),
        zarr_format=2,
        name="M",
    )
    path = write_job(
        tmp_path, job_dict(tmp_path, "", input={"url": str(tmp_path / "in.zarr"), "array": "M"})
    )
    proc = cli("validate", path)
    assert proc.returncode == 0, proc.stderr
    assert "shape 300×7" in proc.stdout and "chunks 100×7" in proc.stdout
    assert "dtype int32" in proc.stdout and "Zarr v2" in proc.stdout
    planned = cli("validate", "--plan", path)
    assert planned.returncode == 0, planned.stderr
    input_line = proc.stdout.splitlines()[0]
    assert planned.stdout.splitlines()[0] == input_line  # --plan keeps the input line
    assert planned.stdout.splitlines()[1].startswith("plan for job: 300 × 7 float64")
    assert not (tmp_path / "out").exists()


def test_schema_and_generate(cli, tmp_path):
    import zarr

    proc = cli("schema")
    assert proc.returncode == 0 and json.loads(proc.stdout)["title"] == "zarr-factorize job"
    proc = cli(
        "generate",
        tmp_path / "g.zarr",
        "--shape",
        1000,
        12,
        "--chunks",
        300,
        12,
        "--kind",
        "vandermonde",
        "--dtype",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    arr = zarr.open_array(str(tmp_path / "g.zarr"))
    assert arr.shape == (1000, 12) and arr.chunks == (300, 12) and arr.dtype == np.float32
    proc = cli("generate", tmp_path / "h.zarr", "--shape", 0, 12)
    assert_one_line_error(proc, "generate: shape")


def test_run_end_to_end_with_embedded_cluster_and_prefect(cli, tmp_path, prefect_server):
    """The README path: job files, an embedded LocalCluster, Prefect's ephemeral API; all
    three methods on one non-negative input, and a second job in the same command (a batch:
    concurrent flow runs on one shared cluster)."""
    import httpx
    import xarray as xr
    import zarr

    job = job_dict(
        tmp_path,
        "data/in.zarr",
        name="e2e",
        input={
            "url": "data/in.zarr",
            "create_if_missing": {
                "kind": "nonnegative",
                "shape": [30000, 20],
                "chunks": [4000, 20],
            },
        },
        cluster={"kind": "local", "n_workers": 2, "threads_per_worker": 1},
        methods=[
            {"method": "tsqr"},
            {"method": "rsvd", "rank": 5, "center": True},
            {"method": "nmf", "rank": 5, "max_iter": 20},
        ],
        output={"url": "results"},
    )
    path = write_job(tmp_path, job)
    second = job_dict(
        tmp_path,
        "data/b.zarr",
        name="e2e-b",
        input={"url": "data/b.zarr", "create_if_missing": {"kind": "gaussian", "shape": [5000, 8]}},
        output={"url": "results"},
    )
    path_b = write_job(tmp_path, second, "b.yaml")
    proc = cli("run", path, path_b, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "e2e: completed" in proc.stdout and "orthogonality_u" in proc.stdout
    assert "e2e-b: completed" in proc.stdout
    # it really ran as a Prefect flow run, recorded on the lasting server, with its link
    link = re.search(rf"flow run (\S+): {prefect_server.url}/runs/flow-run/(\S+)", proc.stdout)
    assert link and link[1] == link[2], proc.stdout[-2000:]
    run = httpx.get(f"{prefect_server.api_url}/flow_runs/{link[1]}").json()
    assert run["state_type"] == "COMPLETED"
    assert_quiet(proc.stdout)
    b = json.loads((tmp_path / "results" / "e2e-b" / "metrics.json").read_text())
    assert b["methods"]["tsqr"]["residual_rel"] < 1e-14
    out = tmp_path / "results" / "e2e"
    metrics = json.loads((out / "metrics.json").read_text())
    a = zarr.open_array(str(tmp_path / "data" / "in.zarr"))[...]
    assert metrics["input"]["fro_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-12)
    dask_info = metrics["methods"]["tsqr"]["dask"]
    assert dask_info == b["methods"]["tsqr"]["dask"] and dask_info["workers"] == 2  # shared

    qr = xr.open_zarr(out / "factors.zarr", group="tsqr")
    q, r = qr["Q"].values, qr["R"].values
    assert np.linalg.norm(a - q @ r) / np.linalg.norm(a) < 1e-14
    assert metrics["methods"]["tsqr"]["orthogonality"] < 1e-13

    sv = xr.open_zarr(out / "factors.zarr", group="rsvd")
    ac = a - a.mean(axis=0)
    np.testing.assert_allclose(sv["mean"].values, a.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sv["S"].values, np.linalg.svd(ac, compute_uv=False)[:5], rtol=1e-6)
    assert len(metrics["methods"]["rsvd"]["explained_variance_ratio"]) == 5
    assert (out / "rsvd_spectrum.png").exists()

    nm = xr.open_zarr(out / "factors.zarr", group="nmf")
    w, h = nm["W"].values, nm["H"].values
    assert w.min() >= 0 and h.min() >= 0
    err = np.linalg.norm(a - w @ h) / np.linalg.norm(a)
    assert metrics["methods"]["nmf"]["residual_rel"] == pytest.approx(err, rel=1e-6)
    assert (out / "nmf_convergence.png").exists()


def assert_quiet(stdout: str) -> None:
    """The run log holds the job's own lines: no distributed or Prefect INFO chatter."""
    chatter = [
        line
        for line in stdout.splitlines()
        if re.match(r"\S+ INFO +(distributed|prefect)\.", line)
        or "Run out-of-band function" in line
        or "jupyter-server-proxy" in line
    ]
    assert not chatter, chatter[:5]


def test_task_side_user_error_on_an_embedded_cluster_prints_no_traceback(
    cli, tmp_path, prefect_server
):
    """NaN found by a worker of the run's own LocalCluster: exit 2, one line naming the job
    file, and neither stdout nor stderr holds distributed's "Compute Failed" block or any
    traceback (the workers' log lines are the run's stdout)."""
    a = np.ones((4000, 5))
    a[3500, 2] = np.nan
    write_array(tmp_path / "nan.zarr", a, chunks=(500, 5))
    job = job_dict(tmp_path, str(tmp_path / "nan.zarr"), name="nanjob")
    job["cluster"] = {"kind": "local", "n_workers": 2, "memory_limit": "1GiB"}
    path = write_job(tmp_path, job, "nanjob.yaml")
    proc = cli("run", path)
    line = one_line_exit(proc)
    assert line.startswith(f"factorize: error: {path}: ") and "row 3500" in line, line
    assert "Compute Failed" not in proc.stdout and "Traceback" not in proc.stdout
    assert "NaN" not in proc.stdout.replace(str(tmp_path), "")  # said once, on stderr
    assert_quiet(proc.stdout)
    assert list((tmp_path / "out").iterdir()) == []


def test_nan_in_input_exits_2_after_first_pass_and_leaves_nothing(cli, tmp_path, dist_client):
    a = np.ones((2000, 5))
    a[1500, 3] = np.inf
    write_array(tmp_path / "nan.zarr", a, chunks=(250, 5))
    job = job_dict(
        tmp_path,
        str(tmp_path / "nan.zarr"),
        cluster={"kind": "address", "address": dist_client.scheduler.address},
    )
    proc = cli("run", write_job(tmp_path, job))
    assert_one_line_error(proc, "NaN or Inf", "row 1500")
    assert list((tmp_path / "out").iterdir()) == []


def test_negative_input_to_nmf_exits_2_and_leaves_nothing(cli, tmp_path, dist_client):
    a = np.ones((2000, 5))
    a[10, 1] = -3.0
    write_array(tmp_path / "neg.zarr", a, chunks=(250, 5))
    job = job_dict(
        tmp_path,
        str(tmp_path / "neg.zarr"),
        methods=[{"method": "nmf", "rank": 2}],
        cluster={"kind": "address", "address": dist_client.scheduler.address},
    )
    proc = cli("run", write_job(tmp_path, job))
    assert_one_line_error(proc, "non-negative", "-3")
    assert list((tmp_path / "out").iterdir()) == []


def test_submit_without_a_reachable_server_exits_2(cli, tmp_path, monkeypatch):
    write_array(tmp_path / "in.zarr", np.ones((20, 3)))
    path = write_job(tmp_path, job_dict(tmp_path, str(tmp_path / "in.zarr")))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert_one_line_error(cli("submit", path), "set PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there
    assert_one_line_error(cli("submit", path), "cannot reach the Prefect API")
