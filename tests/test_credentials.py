"""Credentials by reference, and no secret in any byte a run leaves.

Unit tables for :func:`pipeline.secrets.redact` / :func:`~pipeline.secrets.scrub` and the
reference rules, then the real thing: ``factorize`` subprocesses reading S3 (moto on
127.0.0.1) with literal credentials and with ``${env:…}`` references, each with its own
``PREFECT_HOME``, and every byte of stdout, stderr, the result folder and the whole
``PREFECT_HOME`` (the SQLite database included) searched for every secret value.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import secrets
from pipeline.config import parse_config, redact
from pipeline.errors import ConfigError, InputError, NonFiniteInputError
from tests.conftest import REPO, factorize_cmd, job_dict, run_cli, write_array

# Literal credentials of the "literal" jobs: every value distinct and searchable. The S3
# input takes key/secret/token (moto accepts any); the local output's options hold the
# shapes the issue found written in plain text (fsspec's local filesystem ignores them).
S3_LITERAL = {
    "key": "AKIAZFLITERAL0000001",
    "secret": "zf-literal-secret-Qx81vB2",
    "token": "zf-literal-session-token-T7",
}
OUTPUT_LITERAL = {
    "passphrase": "zf-literal-passphrase-P3",
    "pwd": "zf-literal-pwd-W4",
    "sas": "sv=2024-01-01&sig=zfLiteralSasSig5",
    "connection_string": "AccountName=acct;AccountKey=zfLiteralAccountKey6==;",
    "headers": {"Authorization": "Bearer zfLiteralBearer7token"},
    "auth": ["zf-literal-user", "zf-literal-auth-pass-8"],
}
LITERAL = {**S3_LITERAL, **OUTPUT_LITERAL}
LITERAL_VALUES = [
    "AKIAZFLITERAL0000001",
    "zf-literal-secret-Qx81vB2",
    "zf-literal-session-token-T7",
    "zf-literal-passphrase-P3",
    "zf-literal-pwd-W4",
    "zfLiteralSasSig5",
    "zfLiteralAccountKey6",
    "zfLiteralBearer7token",
    "zf-literal-user",
    "zf-literal-auth-pass-8",
]
# The "env" job's credentials, held only by the subprocess's environment.
ENV = {
    "ZF_TEST_KEY": "AKIAZFENVIRON0000002",
    "ZF_TEST_SECRET": "zf-environ-secret-Ev9",
    "ZF_TEST_TOKEN": "zf-environ-session-token-E10",
}
BY_REFERENCE = {
    "key": "${env:ZF_TEST_KEY}",
    "secret": "${env:ZF_TEST_SECRET}",
    "token": "${env:ZF_TEST_TOKEN}",
}
ALL_SECRETS = [*LITERAL_VALUES, *ENV.values()]


# --------------------------------------------------------------------------- unit tables

REDACT_CASES = [
    (
        {"key": "AKIAX", "secret": "s", "anon": False},
        {"key": "***", "secret": "***", "anon": False},
    ),
    (
        {"passphrase": "p", "pwd": "p", "sas": "sv=1&sig=x"},
        {"passphrase": "***", "pwd": "***", "sas": "***"},
    ),
    ({"connection_string": "AccountKey=abc;"}, {"connection_string": "***"}),
    ({"headers": {"Authorization": "Bearer abc123def"}}, {"headers": {"Authorization": "***"}}),
    ({"auth": ["user", "pass"]}, {"auth": ["***", "***"]}),
    ({"auth": ("user", "${env:PW}")}, {"auth": ["***", "${env:PW}"]}),
    (
        {"client_kwargs": {"aws_session_token": "t"}},
        {"client_kwargs": {"aws_session_token": "***"}},
    ),
    ({"secret": "${env:ZF_S3_SECRET}"}, {"secret": "${env:ZF_S3_SECRET}"}),  # refs stay
    ({"secret": "${secret:s3-secret}"}, {"secret": "${secret:s3-secret}"}),
    ({"secret": "${env:ZF_CREDENTIAL_3}"}, {"secret": "***"}),  # moved literal reads as one
    ({"token": None, "password": ""}, {"token": None, "password": ""}),
    ({"password": 123456}, {"password": "***"}),
    ({"url": "s3://alice:PASS@bucket/x"}, {"url": "s3://***@bucket/x"}),
    ({"note": "AccountName=a;AccountKey=abc==;"}, {"note": "AccountName=a;AccountKey=***;"}),
    ({"note": "SharedAccessSignature=sv=1&sig=abc"}, {"note": "SharedAccessSignature=***"}),
    ({"x-header": "Bearer eyJhbGciOi.x"}, {"x-header": "Bearer ***"}),
    ({"region_name": "eu-west-1", "endpoint_url": "http://h:9000"}, None),  # unchanged
]


@pytest.mark.parametrize("value, expected", REDACT_CASES)
def test_redact_masks_by_key_and_by_value_shape(value, expected):
    assert redact(value) == (value if expected is None else expected)


SCRUB_CASES = [
    ("s3://alice:PASS@bucket/x.zarr", "s3://***@bucket/x.zarr"),
    ('Invalid bucket name "alice:PASS@bucket": must match', 'Invalid bucket name "***@bucket"'),
    ("DefaultEndpointsProtocol=https;AccountKey=abc/+==;X=1", "AccountKey=***;X=1"),
    ("https://a.blob.core/c?sv=2020&sig=abc%2Fdef&se=1", "sig=***&se=1"),
    ("SharedAccessSignature=sv=2020&sr=b", "SharedAccessSignature=***"),
    ("'Authorization': b'Bearer eyJ0eXAi.abc'", "Bearer ***"),
    ("Authorization: Basic dXNlcjpwYXNz", "Basic ***"),
    ("Credential=AKIAABCDEFGHIJKLMNOP/20261122/us-east-1", "Credential=***/20261122"),
    ("key id ASIAABCDEFGHIJKLMNOP used", "key id *** used"),
    ("X-Amz-Security-Token=FwoGZXIvYXdz&X-Amz-Date=1", "X-Amz-Security-Token=***&"),
    ("Basic usage and Basic configuration", "Basic usage and Basic configuration"),
    (
        "http://127.0.0.1:4200/api and the first pass",
        "http://127.0.0.1:4200/api and the first pass",
    ),
]


@pytest.mark.parametrize("text, expected", SCRUB_CASES)
def test_scrub_masks_credential_shapes_in_free_text(text, expected):
    assert expected in secrets.scrub(text)


def test_scrub_masks_known_values_and_their_url_encoding():
    secrets.register_secret("zf-unit-known/value+1")
    out = secrets.scrub("got zf-unit-known/value+1 and zf-unit-known%2Fvalue%2B1 back")
    assert out == "got *** and *** back"
    secrets.register_secret("pass")  # too short to scrub from free text
    assert secrets.scrub("the first pass") == "the first pass"


def _job(**input_over) -> dict:
    return {
        "name": "j",
        "input": {"url": "s3://bucket/x.zarr", **input_over},
        "methods": [{"method": "tsqr"}],
    }


def test_references_resolve_nested_and_are_remembered_as_secrets(monkeypatch):
    monkeypatch.setenv("ZF_UNIT_SECRET", "zf-unit-resolved-secret-1")
    secrets.register_resolver("unittest", lambda name: f"zf-unit-from-resolver-{name}")
    opts = {
        "secret": "${env:ZF_UNIT_SECRET}",
        "client_kwargs": {"headers": ["${unittest:abc}", "plain"]},
        "anon": False,
    }
    assert secrets.resolve(opts) == {
        "secret": "zf-unit-resolved-secret-1",
        "client_kwargs": {"headers": ["zf-unit-from-resolver-abc", "plain"]},
        "anon": False,
    }
    assert secrets.scrub("zf-unit-resolved-secret-1 zf-unit-from-resolver-abc") == "*** ***"
    from pipeline.io.stores import effective_options

    assert effective_options("memory://x", opts)["secret"] == "zf-unit-resolved-secret-1"


def test_missing_references_are_one_line_config_errors_naming_the_key(monkeypatch):
    monkeypatch.delenv("ZF_UNIT_UNSET", raising=False)
    cfg = parse_config(_job(storage_options={"client_kwargs": {"secret": "${env:ZF_UNIT_UNSET}"}}))
    with pytest.raises(ConfigError) as err:
        secrets.check_references(cfg, "job.yaml")
    assert str(err.value) == (
        "job.yaml: input.storage_options.client_kwargs.secret: environment variable "
        "ZF_UNIT_UNSET is not set"
    )
    resolvers = dict(secrets._resolvers)
    try:
        secrets._resolvers.pop("secret", None)  # library use without the flows package
        with pytest.raises(ConfigError, match=r"input.storage_options.key: cannot resolve "):
            secrets.check_references(parse_config(_job(storage_options={"key": "${secret:k}"})))
    finally:
        secrets._resolvers.clear()
        secrets._resolvers.update(resolvers)


def test_literals_move_to_the_environment_and_resolve_back(monkeypatch):
    cfg = parse_config(_job(storage_options={**LITERAL, "endpoint_url": "http://h:9000"}))
    moved = secrets.move_to_environment(cfg)
    opts = moved.input.storage_options
    assert opts["endpoint_url"] == "http://h:9000"  # not a credential: stays
    dumped = json.dumps(moved.model_dump(mode="json"))
    assert not [v for v in LITERAL_VALUES if v in dumped]
    assert opts["auth"][1].startswith("${env:ZF_CREDENTIAL_")
    for name in [v[6:-1] for v in (opts["key"], opts["auth"][1])]:
        monkeypatch.setenv(name, os.environ[name])  # undone after the test
    assert secrets.resolve(opts) == {**LITERAL, "endpoint_url": "http://h:9000"}
    assert redact(moved.model_dump(mode="json")) == redact(cfg.model_dump(mode="json"))
    assert secrets.move_to_environment(moved) is moved  # references only: nothing to move


def test_submit_rules_refuse_literals_and_url_passwords_in_one_line():
    with pytest.raises(ConfigError) as err:
        secrets.refuse_literals(parse_config(_job(storage_options=LITERAL)), "a.yaml")
    line = str(err.value)
    assert line.startswith("a.yaml: input.storage_options.key (and 9 more): a literal")
    assert "${env:NAME}" in line and "${secret:NAME}" in line and "\n" not in line
    assert not [v for v in LITERAL_VALUES if v in line]
    secrets.refuse_literals(parse_config(_job(storage_options=BY_REFERENCE)), "a.yaml")
    hostile = parse_config(_job(url="s3://alice:zf-url-pass-1@bucket/x.zarr"))
    with pytest.raises(ConfigError, match=r"^a.yaml: input.url: a password in the URL") as err:
        secrets.refuse_url_credentials(hostile, "a.yaml")
    assert "zf-url-pass-1" not in str(err.value)
    secrets.refuse_url_credentials(parse_config(_job(url="github://org:repo@main/x")), "a")


def test_log_records_are_scrubbed_and_user_errors_lose_their_traceback():
    secrets.install_log_scrubber()
    factory = logging.getLogRecordFactory()
    secrets.install_log_scrubber()  # idempotent: one wrapper
    assert logging.getLogRecordFactory() is factory
    secrets.register_secret("zf-unit-log-secret-9")
    logger = logging.getLogger("tests.credentials")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning("sending %s to %s", "zf-unit-log-secret-9", "s3://u:p4ssw0rd@b/x")
        try:
            raise NonFiniteInputError("input: NaN or Inf in row 3")
        except NonFiniteInputError:
            logger.error("Task run failed with exception", exc_info=True)
        try:
            raise OSError("cannot open with zf-unit-log-secret-9")
        except OSError:
            logger.error("failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    fmt = logging.Formatter()
    text = [fmt.format(r) for r in records]
    assert text[0] == "sending *** to s3://***@b/x"
    assert text[1] == "Task run failed with exception"  # no traceback for a user error
    assert "Traceback" in text[2] and "OSError: cannot open with ***" in text[2]
    assert "zf-unit-log-secret-9" not in "".join(text)


def test_distributed_shutdown_chatter_loses_its_traceback():
    """Seen on CI after a user error: a closing cluster logs "Batched Comm Closed" at INFO
    with a traceback, which broke the no-traceback contract on stdout."""
    secrets.install_log_scrubber()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in ("distributed.batched", "distributed.core")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        try:
            raise OSError("stream closed")
        except OSError:
            loggers[0].info("Batched Comm Closed %r", "<TCP (closed)>", exc_info=True)
            loggers[1].error("real failure", exc_info=True)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    text = [logging.Formatter().format(r) for r in records]
    assert text[0] == "Batched Comm Closed '<TCP (closed)>'"
    assert "Traceback" in text[1]  # errors keep theirs


def test_scrubbed_errors_keep_the_type_and_mask_the_message():
    secrets.register_secret("zf-unit-exc-secret-10")
    with pytest.raises(InputError) as err:
        with secrets.scrubbed_errors():
            raise InputError("input.url: cannot reach: zf-unit-exc-secret-10")
    assert str(err.value) == "input.url: cannot reach: ***" and err.value.__cause__ is None

    class TwoArgs(Exception):
        def __init__(self, code: int, text: str) -> None:
            super().__init__(f"{code}: {text}")

    with pytest.raises(RuntimeError, match=r"^TwoArgs: 7: \*\*\*$"):
        with secrets.scrubbed_errors():
            raise TwoArgs(7, "zf-unit-exc-secret-10")
    original = ValueError("nothing secret")
    with pytest.raises(ValueError) as err:
        with secrets.scrubbed_errors():
            raise original
    assert err.value is original


# --------------------------------------------------------------------------- a Prefect flow


def test_third_party_error_text_in_a_flow_run_is_scrubbed(
    tmp_path, s3, dist_client, prefect_harness, monkeypatch
):
    """botocore echoes an option's value in its error; the run's state messages and logs
    (Prefect's database) must not hold it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    from flows import factorize

    value = "zf_flow_region_secret_11"  # "_" is not valid in a region name
    monkeypatch.setenv("ZF_TEST_REGION", value)
    opts = s3.storage_options(client_kwargs={"region_name": "${env:ZF_TEST_REGION}"})
    job = job_dict(
        tmp_path,
        "s3://no-such-bucket/x.zarr",
        name="region",
        input={"url": "s3://no-such-bucket/x.zarr", "storage_options": opts},
        cluster={"kind": "address", "address": dist_client.scheduler.address},
    )
    state = factorize(config=job, return_state=True)
    assert state.is_failed()
    assert "region_name" in state.message and value not in state.message, state.message
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as c:
        logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        run = c.read_flow_run(run_id)
    stored = " ".join(
        [run.state.message or "", json.dumps(run.parameters, default=str)]
        + [log.message for log in logs]
        + [t.state.message or "" for t in tasks if t.state]
    )
    assert "region_name" in stored and "${env:ZF_TEST_REGION}" in stored
    assert value not in stored
    assert "Traceback" not in stored  # a user error (InputError): one line, no traceback


# --------------------------------------------------------------------------- subprocesses


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory) -> str:
    """A bucket with ``ok.zarr`` (finite) and ``nan.zarr`` (an Inf in row 1500)."""
    local = tmp_path_factory.mktemp("s3-inputs")
    url = s3.make_bucket("zf-credentials")
    fs = s3.filesystem()
    a = np.random.default_rng(0).standard_normal((2000, 6))
    write_array(local / "ok.zarr", a, chunks=(500, 6))
    a[1500, 3] = np.inf
    write_array(local / "nan.zarr", a, chunks=(250, 6))
    for name in ("ok.zarr", "nan.zarr"):
        fs.put(str(local / name), f"zf-credentials/{name}", recursive=True)
    return url


def _write(tmp_path: Path, filename: str, job: dict) -> Path:
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _s3_job(tmp_path, s3, bucket, name, array, options, dist_client) -> dict:
    """A job reading ``bucket/array`` with ``options``; literal jobs get OUTPUT_LITERAL."""
    literal = options is LITERAL
    return job_dict(
        tmp_path,
        f"{bucket}/{array}",
        name=name,
        input={
            "url": f"{bucket}/{array}",
            "storage_options": {
                **(S3_LITERAL if literal else options),
                "endpoint_url": s3.endpoint,
            },
        },
        output={
            "url": str(tmp_path / "out"),
            "storage_options": OUTPUT_LITERAL if literal else {},
        },
        cluster={"kind": "address", "address": dist_client.scheduler.address},
    )


def _cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``factorize`` in a subprocess with its own PREFECT_HOME (``tmp_path/home``)."""
    return run_cli(*args, env=env or {}, home=tmp_path / "home", timeout=400)


def _leaks(proc: subprocess.CompletedProcess, *folders: Path) -> list[str]:
    """Every ``where: secret`` found in stdout, stderr or any byte of any file under folders."""
    found = [
        f"{name}: {s}"
        for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr))
        for s in ALL_SECRETS
        if s in text
    ]
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found += [f"{path}: {s}" for s in ALL_SECRETS if s.encode() in data]
    return found


def test_debug_batch_with_literal_and_referenced_credentials_leaves_no_secret(
    tmp_path, s3, bucket, dist_client
):
    """One ``factorize --log-level DEBUG run a.yaml b.yaml``: a literal job and a job by
    reference, both reading S3; nothing a run leaves holds a secret."""
    lit = _write(
        tmp_path, "lit.yaml", _s3_job(tmp_path, s3, bucket, "lit", "ok.zarr", LITERAL, dist_client)
    )
    ref = _write(
        tmp_path,
        "ref.yaml",
        _s3_job(tmp_path, s3, bucket, "ref", "ok.zarr", BY_REFERENCE, dist_client),
    )
    proc = _cli(tmp_path, "--log-level", "DEBUG", "run", str(lit), str(ref), env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "lit: completed" in proc.stdout and "ref: completed" in proc.stdout
    assert "botocore" in proc.stdout  # DEBUG really logged the S3 requests
    home, out = tmp_path / "home", tmp_path / "out"
    assert _leaks(proc, home, out) == []
    database = b"".join(p.read_bytes() for p in home.rglob("*.db*"))
    assert b"${env:ZF_CREDENTIAL_" in database  # the moved literals, by reference
    assert b"${env:ZF_TEST_SECRET}" in database
    lit_cfg = json.loads((out / "lit" / "metrics.json").read_text())["config"]
    assert lit_cfg["input"]["storage_options"]["secret"] == "***"
    assert lit_cfg["output"]["storage_options"]["headers"] == {"Authorization": "***"}
    assert lit_cfg["output"]["storage_options"]["auth"] == ["***", "***"]
    ref_opts = json.loads((out / "ref" / "metrics.json").read_text())["config"]["input"]
    assert ref_opts["storage_options"]["secret"] == "${env:ZF_TEST_SECRET}"


def test_a_warm_run_on_the_lasting_server_leaves_no_secret(
    tmp_path, s3, bucket, dist_client, prefect_server
):
    """Literal and referenced credentials through the lasting server's warm runner (the
    command hands it its environment over a socket only its owner can open): no secret in
    the output, the result, or anything the server keeps (database, log, records)."""
    lit = _write(
        tmp_path, "lit.yaml", _s3_job(tmp_path, s3, bucket, "wlit", "ok.zarr", LITERAL, dist_client)
    )
    ref = _write(
        tmp_path,
        "ref.yaml",
        _s3_job(tmp_path, s3, bucket, "wref", "ok.zarr", BY_REFERENCE, dist_client),
    )
    proc = subprocess.run(
        [*factorize_cmd(), "--log-level", "DEBUG", "run", str(lit), str(ref)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **ENV},
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "warm run: this process was forked by the warm runner" in proc.stdout
    home = Path(os.environ["PREFECT_HOME"])
    assert _leaks(proc, home, tmp_path / "out") == []


def test_user_error_in_a_task_prints_no_traceback_and_no_secret(tmp_path, s3, bucket, dist_client):
    """An Inf found by the first pass (inside a Prefect task): exit 2, one line, no
    traceback anywhere, no secret anywhere (the job had literal credentials)."""
    job = _write(
        tmp_path, "nan.yaml", _s3_job(tmp_path, s3, bucket, "nan", "nan.zarr", LITERAL, dist_client)
    )
    proc = _cli(tmp_path, "run", str(job))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "NaN or Inf" in proc.stderr
    assert "is recorded in Prefect's database" in proc.stdout  # it ran as a flow run
    with sqlite3.connect(tmp_path / "home" / "prefect.db") as db:  # which failed
        states = db.execute("select state_type from flow_run where name = 'nan'").fetchall()
    assert states == [("FAILED",)]
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout[-4000:]
    assert _leaks(proc, tmp_path / "home", tmp_path / "out") == []


def test_validate_masks_secrets_and_names_what_is_missing(tmp_path, s3, bucket, dist_client):
    lit = _write(
        tmp_path, "lit.yaml", _s3_job(tmp_path, s3, bucket, "lit", "ok.zarr", LITERAL, dist_client)
    )
    ref = _write(
        tmp_path,
        "ref.yaml",
        _s3_job(tmp_path, s3, bucket, "ref", "ok.zarr", BY_REFERENCE, dist_client),
    )
    unset = {**BY_REFERENCE, "secret": "${env:ZF_TEST_UNSET}"}
    missing = _write(
        tmp_path,
        "unset.yaml",
        _s3_job(tmp_path, s3, bucket, "unset", "ok.zarr", unset, dist_client),
    )
    proc = _cli(
        tmp_path, "--log-level", "DEBUG", "validate", str(lit), str(ref), str(missing), env=ENV
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok — input s3://zf-credentials/ok.zarr") == 2, proc.stdout
    assert "botocore" in proc.stdout  # DEBUG logs of the S3 requests, on stdout
    (line,) = proc.stderr.splitlines()
    assert line.endswith(
        "unset.yaml: input.storage_options.secret: environment variable ZF_TEST_UNSET is not set"
    )
    assert _leaks(proc, tmp_path / "home") == []

    hostile = _s3_job(tmp_path, s3, bucket, "url", "ok.zarr", {}, dist_client)
    hostile["input"]["url"] = "s3://alice:zf-literal-secret-Qx81vB2@zf-credentials/ok.zarr"
    proc = _cli(tmp_path, "validate", str(_write(tmp_path, "url.yaml", hostile)))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "input.url: a password in the URL" in proc.stderr
    assert _leaks(proc, tmp_path / "home") == []
