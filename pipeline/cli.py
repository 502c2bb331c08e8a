"""The ``factorize`` command: run, validate, schema and data tools.

Exit codes: 0 success; 2 bad config or bad input (one line on stderr, no traceback);
1 a failure while computing. ``run`` imports the Prefect flow lazily, so ``validate`` and
``schema`` start fast and never touch Prefect.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from pipeline import lifetime
from pipeline.config import JobConfig, check_unique_names, json_schema, load_config
from pipeline.errors import ConfigError, FactorizeError, UserError, first_line, naming_file
from pipeline.lifetime import (
    DEFAULT_IDLE_MINUTES,
    DEFAULT_PORT,
    UNWIND_GRACE_S,
    ApiChoice,
    OwnedServer,
    Terminated,
    prefect_home,
    raise_on_signals,
    read_owned_server,
    start_api_server,
    start_owned_server,
    stop_owned_server,
    wait_api_server,
)
from pipeline.secrets import redact
from pipeline.sections import PACKAGED_KINDS, SYNTHETIC_KINDS, SyntheticSpec

if TYPE_CHECKING:
    from pipeline.io.source import InputManifest

log = logging.getLogger("pipeline")

# Where the final one-line verdict goes: stderr, or its saved copy once a run has sent
# fd 2 to stdout (see _logs_to_stdout).
_verdict: TextIO | None = None


# Loggers whose INFO records are the job's own lines; other libraries' (Prefect's run
# bookkeeping, distributed's scheduler and worker chatter) show from WARNING on, all of
# them with --log-level DEBUG.
OWN_LOGGERS = ("pipeline", "flows")


class _JobLinesOnly(logging.Filter):
    """Our own loggers' records (see :data:`OWN_LOGGERS`); the others' from WARNING on,
    except Prefect's records of a task or flow that failed on a user error: the run's
    one-line verdict says it (they still reach the flow run's log in Prefect)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OWN_LOGGERS:
            return True
        if record.name.startswith("prefect") and _about_user_error(record):
            return False
        return record.levelno >= logging.WARNING


def _about_user_error(record: logging.LogRecord) -> bool:
    """Whether ``record`` reports a :class:`UserError` (flagged by the log scrubber, or
    named in Prefect's "Finished in state Failed('… InputError: …')" text)."""
    if getattr(record, "user_error", False):
        return True
    from pipeline.worker_setup import user_error_names

    message = record.getMessage()
    return any(f"{name}:" in message or f"{name}(" in message for name in user_error_names())


class ConsoleHandler(logging.StreamHandler):
    """A stream handler that lifts the terminal progress bar off its line while it writes a
    record (see :func:`pipeline.progress.bar_paused`), so records and the bar never share
    a line. (Public name: Prefect keeps a root handler whose class name has no leading
    underscore instead of installing its own.)"""

    def emit(self, record: logging.LogRecord) -> None:
        from pipeline.progress import bar_paused

        with bar_paused():
            super().emit(record)


def _quiet_dask(level: str) -> None:
    """distributed's loggers at WARNING (INFO with --log-level DEBUG) in this process and in
    the worker processes it starts, which read the same setting from the environment;
    distributed sets its levels when first imported, so this runs before that."""
    chatty = "info" if level == "DEBUG" else "warning"
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", chatty)
    os.environ.setdefault("DASK_LOGGING__BOKEH", "error")


def _setup_logging(level: str) -> None:
    from pipeline.secrets import install_log_scrubber

    install_log_scrubber()  # before any record: secrets masked at every level
    _quiet_dask(level)
    handler = ConsoleHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    if level != "DEBUG":
        handler.addFilter(_JobLinesOnly())
    # force: in a warm run (flows.runner) Prefect's handler is on the root logger already
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    for noisy in ("bokeh", "tornado", "httpx", "httpcore", "aiobotocore.credentials"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _input_line(path: str, cfg: JobConfig, m: InputManifest | None) -> str:
    """``validate``'s one line about a job file's input."""
    if m is None:
        spec = cfg.input.create_if_missing
        size = f" {spec.shape[0]}×{spec.shape[1]}" if spec.shape else ""
        return (
            f"{path}: ok — input {redact(cfg.input.url)} does not exist yet and will be "
            f"created ({spec.kind}{size} {spec.dtype})"
        )
    methods = ", ".join(s.method for s in cfg.methods)
    if m.format == "safetensors":
        return f"{path}: ok — input {m.url}: {m.describe()}; methods: {methods}"
    arr = f" array {m.array}" if m.array else ""
    layout = (
        f"{m.format.upper()}, nnz {m.nnz} (density {m.density:.3g}), row blocks of {m.chunks[0]}"
        if m.nnz is not None
        else f"dense, chunks {m.chunks[0]}×{m.chunks[1]}"
    )
    return (
        f"{path}: ok — input {m.url}{arr}: shape {m.shape[0]}×{m.shape[1]}, {layout}, "
        f"dtype {m.dtype} (Zarr v{m.zarr_format}); "
        f"methods: {', '.join(s.method for s in cfg.methods)}"
    )


def _validate(args: argparse.Namespace) -> int:
    from pipeline.jobs import precheck

    for path in args.configs:
        cfg = load_config(path)
        with naming_file(path):
            _check_credentials(path, cfg, submit=False)
            m = precheck(cfg)
        print(_input_line(path, cfg, m))
        if args.plan:
            from pipeline.plan import format_plan, plan_job

            with naming_file(path):
                plan = plan_job(cfg)
            if plan is None:
                print("  plan: the input is created by the run; plan it once it exists")
            else:
                print("\n".join(format_plan(plan)))
    return 0


def _check_credentials(path: str, cfg: JobConfig, *, submit: bool, resolve: bool = True) -> None:
    """The credential rules of ``pipeline.secrets``, before any input is opened.

    Every command refuses a password in a URL; ``submit`` refuses any literal credential
    (the job is stored on the server). References are resolved once here (``resolve``), so
    a missing variable or Secret block is one line naming the key path; resolving a
    Secret block needs the Prefect API, so it waits for the server :func:`_run` started.
    """
    from pipeline import secrets

    secrets.register_options(cfg.input.storage_options)  # masked even before anything opens
    secrets.register_options(cfg.output.storage_options)
    if submit:
        secrets.refuse_literals(cfg, path)
    else:
        secrets.refuse_url_credentials(cfg, path)
    if resolve and secrets.has_references(cfg, "secret"):
        wait_api_server()
        import flows  # noqa: F401  (registers the Prefect Secret resolver)
    if resolve:
        secrets.check_references(cfg, path)


def _parse(paths: Sequence[str], *, together: bool = True) -> list[JobConfig]:
    """Parse job files (no input opened, nothing imported but the config models): a bad
    file is refused at once (exit 2). ``together``: the jobs run side by side, so their
    names (result folders) must differ."""
    configs = [load_config(p) for p in paths]
    if together:
        check_unique_names(configs)
    return configs


def _check(
    paths: Sequence[str], configs: Sequence[JobConfig], *, check_input: bool, submit: bool
) -> None:
    """Credentials, and with ``check_input`` the input and the output (each job opened
    once), before Prefect or a cluster starts; every refusal names its job file.

    ``submit``: the jobs are stored on a server, so no literal credential is allowed.
    """
    from pipeline.jobs import precheck

    for path, cfg in zip(paths, configs, strict=True):
        with naming_file(path):
            _check_credentials(path, cfg, submit=submit, resolve=check_input)
            if check_input:
                precheck(cfg)


@contextmanager
def _terminal_progress() -> Iterator[None]:
    """A progress bar on stdout when it is a terminal; plain log lines otherwise."""
    if not sys.stdout.isatty():
        yield
        return
    from pipeline.progress import TerminalBar, progress_sink

    with TerminalBar(sys.stdout) as bar, progress_sink(bar):
        yield


def _run(args: argparse.Namespace) -> int:
    """Run job files now: one flow run, or a batch of flow runs sharing one cluster.

    Nothing starts before every job file and input is checked (a refused one costs no
    server: concurrent first runs on a new ``PREFECT_HOME`` would also race on its
    database's migrations). Then the start-up work overlaps: a temporary API server (when
    no server is configured or running, see :func:`pipeline.lifetime.start_api_server`)
    boots, and the cluster's workers start, while Prefect is imported.
    """
    configs = _parse(args.configs)
    _check(args.configs, configs, check_input=True, submit=False)
    api = start_api_server()  # before Prefect is imported: a temporary one dies with us
    from pipeline.cluster import discard_prestarted, prestart
    from pipeline.secrets import move_to_environment

    # No literal credential goes to Prefect: each moves into a variable of this process.
    configs = [move_to_environment(c) for c in configs]
    prestart(configs[0].cluster)  # the batch shares the first job's cluster
    try:
        from flows import factorize, factorize_batch, heartbeats

        wait_api_server()
        with _terminal_progress(), heartbeats(api.lasting):
            if len(configs) == 1:
                with naming_file(args.configs[0]):
                    state = factorize(config=configs[0], return_state=True)
                    _say_where_recorded(api, state)
                    reports = {configs[0].name: state.result()}
            else:  # concurrent flow runs on one shared cluster
                state = factorize_batch(configs=configs, return_state=True)
                _say_where_recorded(api, state)
                reports = state.result()
    finally:
        discard_prestarted()
    _print_reports(reports)
    return 0


def _print_reports(reports: dict[str, Any]) -> None:
    from pipeline.reports import summary_table

    for name, report in reports.items():
        verdict = "skipped (complete, unchanged)" if report.get("skipped") else "completed"
        print(f"\n{name}: {verdict} — {report['output']}")
        print(summary_table(report))


def _say_where_recorded(api: ApiChoice, state: Any) -> None:
    """Where the flow run's record is: its page when the server outlives this command,
    else Prefect's database and how to browse it."""
    from flows.operations import flow_run_url

    run_id = state.state_details.flow_run_id
    if api.lasting:
        print(f"flow run {run_id}: {flow_run_url(run_id)}", flush=True)
        return
    print(
        f"flow run {run_id} is recorded in Prefect's database in {prefect_home()}; to "
        f"browse it: factorize server start, then open {OwnedServer(0, DEFAULT_PORT, 0, 0).url}"
        f"/runs/flow-run/{run_id} (with that server running, later runs start in seconds)",
        flush=True,
    )


def _submit(args: argparse.Namespace) -> int:
    configs = _parse(args.configs, together=False)
    # Workers resolve the references; here only when the input is opened here too.
    _check(args.configs, configs, check_input=args.check_input, submit=True)
    from flows.operations import flow_run_url, follow, submit

    runs = []
    for path, cfg in zip(args.configs, configs, strict=True):
        run = submit(cfg, args.deployment)
        runs.append(run)
        print(f"{path}: submitted flow run {run.name} ({run.id}) — {flow_run_url(run.id)}")
    if not args.wait:
        return 0
    failed = []
    for run in runs:
        final = follow(run.id, on_state=lambda s, n=run.name: print(f"{n}: {s}", flush=True))
        if not final.state.is_completed():
            failed.append(f"{final.name} {final.state.name}: {final.state.message}")
    if failed:
        _say("factorize: failed: " + "; ".join(failed))
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipeline.secrets import move_to_environment

    configs = _parse(args.configs)
    _check(args.configs, configs, check_input=True, submit=False)
    start_api_server(services=True)  # with the scheduler; a temporary one dies with us
    # The served runs are subprocesses of this one: they inherit the moved credentials.
    configs = [move_to_environment(c) for c in configs]
    from flows.operations import serve_jobs

    wait_api_server()
    serve_jobs(configs, cron=args.cron, interval=args.interval, timezone=args.timezone)
    return 0


def _server(args: argparse.Namespace) -> int:
    """``factorize server start|stop|status``: the lasting local Prefect server."""
    if args.action == "start":
        server, started = start_owned_server(args.port, args.idle_minutes)
        idle = (
            f"stops after {server.idle_timeout / 60:g} min without a run"
            if server.idle_timeout
            else "runs until stopped"
        )
        verb = "started" if started else "already running"
        print(
            f"Prefect server {verb} at {server.url} (pid {server.pid}); `factorize run` uses "
            f"it; {idle}; `factorize server stop` stops it. Database: {prefect_home()}"
        )
    elif args.action == "stop":
        server = stop_owned_server()
        print(f"stopped the server at {server.url}" if server else "no server was running")
    else:
        server = read_owned_server()
        print(f"running at {server.url} (pid {server.pid})" if server else "not running")
    return 0


def _logs_to_stdout() -> None:
    """Send every log and progress line (ours, Prefect's, workers') to stdout for good.

    stderr then carries only the final verdict, the one-line error of the contract: it is
    kept as a private copy of the original descriptor. The redirect is at the
    file-descriptor level so worker processes and Prefect's exit-time messages follow it.
    """
    global _verdict
    sys.stdout.flush()
    sys.stderr.flush()
    _verdict = os.fdopen(os.dup(2), "w")
    os.dup2(1, 2)


def _schema(args: argparse.Namespace) -> int:
    if args.metrics:
        from pipeline.config import metrics_schema

        print(metrics_schema())
    else:
        print(json_schema())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipeline.config import format_validation_error
    from pipeline.datasets import write_synthetic

    try:
        spec = SyntheticSpec(
            kind=args.kind,
            shape=tuple(args.shape) if args.shape else None,
            chunks=tuple(args.chunks) if args.chunks else None,
            dtype=args.dtype,
            seed=args.seed,
            density=args.density,
            rank=args.rank,
        )
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "generate")) from None
    write_synthetic(args.url, spec, array=args.array)
    print(f"wrote {spec.kind} {spec.dtype} matrix to {args.url}")
    return 0


def _import_ratings(args: argparse.Namespace) -> int:
    from pipeline.ratings_import import import_ratings

    summary = import_ratings(
        args.source,
        args.out,
        user=args.user,
        item=args.item,
        rating=args.rating,
        no_rating=args.no_rating,
        duplicates=args.duplicates,
        dtype=args.dtype,
        overwrite=args.overwrite,
        fmt=args.format,
        sep=args.sep,
    )
    print(summary.line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the CLI reference)."""
    parser = argparse.ArgumentParser(
        prog="factorize",
        description="Factorize chunked Zarr matrices (QR, SVD/PCA, NMF) on Dask, via Prefect.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", help="run job files now (Prefect flow; several files: concurrently, one cluster)"
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml")
    p.set_defaults(func=_run)

    p = sub.add_parser("validate", help="check job files and open their input; compute nothing")
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml")
    p.add_argument(
        "--plan",
        action="store_true",
        help="also print each method's passes, bytes read, blocks, tasks and predicted "
        "peak memory per worker",
    )
    p.set_defaults(func=_validate)

    p = sub.add_parser(
        "submit", help="create flow runs of a deployment on a Prefect server (PREFECT_API_URL)"
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml")
    p.add_argument(
        "--deployment",
        default="factorize/submit",
        help="deployment to run, FLOW/NAME or NAME of the factorize flow (default: %(default)s)",
    )
    p.add_argument("--wait", action="store_true", help="follow the runs; exit 1 if one fails")
    p.add_argument(
        "--no-check-input",
        dest="check_input",
        action="store_false",
        help="validate the file only; do not open the input here (workers see other paths)",
    )
    p.set_defaults(func=_submit)

    p = sub.add_parser("serve", help="serve the jobs as scheduled deployments (no work pool)")
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron schedule, e.g. '0 2 * * *'")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS")
    p.add_argument("--timezone", default="UTC", help="of the schedule (default: %(default)s)")
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "server",
        help="a lasting local Prefect server (API and UI) that runs use: they start in "
        "seconds and their links keep working",
    )
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    p.add_argument(
        "--idle-minutes",
        type=float,
        default=DEFAULT_IDLE_MINUTES,
        help="stop after this long without a run (0: never; default: %(default)g)",
    )
    p.set_defaults(func=_server)

    p = sub.add_parser("schema", help="print the job file's JSON Schema")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="print the JSON Schema of metrics.json's per-method entries instead",
    )
    p.set_defaults(func=_schema)

    p = sub.add_parser("generate", help="write a synthetic matrix to a Zarr store")
    p.add_argument("url", help="target store (path or fsspec URL); replaced if it exists")
    p.add_argument("--shape", nargs=2, type=int, metavar=("ROWS", "COLS"))
    p.add_argument("--chunks", nargs=2, type=int, metavar=("ROWS", "COLS"))
    p.add_argument("--kind", default="gaussian", choices=[*SYNTHETIC_KINDS, *PACKAGED_KINDS])
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--density",
        type=float,
        default=0.05,
        help="sparse kinds: share of non-zero entries (ratings, clicks: of observed ones)",
    )
    p.add_argument(
        "--array",
        help="write into a group under this array name (sparse kinds: an AnnData store, "
        "the matrix at this name, e.g. X; ratings and clicks: always an AnnData store, "
        "default X)",
    )
    p.add_argument(
        "--rank", type=int, help="ratings, clicks: rank of the true factors (default 10)"
    )
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "import-ratings",
        help="convert a ratings log (CSV or Parquet: user, item[, rating]) to an "
        "AnnData-layout CSR Zarr store (users × items; the stored entries are the ratings)",
    )
    p.add_argument("source", metavar="LOG", help="CSV (also .gz, .bz2, .xz) or Parquet file")
    p.add_argument("--out", required=True, metavar="STORE", help="the Zarr store to write")
    p.add_argument("--user", default="userId", help="user id column (default: %(default)s)")
    p.add_argument("--item", default="movieId", help="item id column (default: %(default)s)")
    rating = p.add_mutually_exclusive_group()
    rating.add_argument(
        "--rating",
        help="rating column (default: rating, when the log has one; without a rating "
        "column each line counts 1)",
    )
    rating.add_argument(
        "--no-rating", action="store_true", help="ignore any rating column: each line counts 1"
    )
    p.add_argument(
        "--duplicates",
        choices=["last", "sum", "mean"],
        help="one user and item on several lines: last in file order (default with "
        "ratings), sum (default without), mean",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="of the stored values (default: %(default)s; sums and means are computed in float64)",
    )
    p.add_argument(
        "--format", choices=["csv", "parquet"], help="default: from the name (.parquet, .pq)"
    )
    p.add_argument("--sep", help="CSV separator (default: ',', tab for .tsv)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Zarr store")
    p.set_defaults(func=_import_ratings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``factorize`` command in this process (the console script,
    :func:`pipeline.launcher.entry`, may hand ``run`` to a warm runner instead)."""
    global _said
    _said = threading.Lock()  # a verdict per command (tests call main more than once)
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    _logs_to_stdout()
    raise_on_signals(_end_overdue, UNWIND_GRACE_S)
    if lifetime.warm_run_of is not None:
        log.debug("warm run: this process was forked by the warm runner %d", lifetime.warm_run_of)
    try:
        return args.func(args)
    except UserError as exc:
        _say(f"factorize: error: {exc}")
        return exc.exit_code
    except Terminated:
        _say("factorize: terminated")
        return 143
    except KeyboardInterrupt:
        _say("factorize: interrupted")
        return 130
    except (FactorizeError, Exception) as exc:
        log.debug("compute failure", exc_info=True)
        _say(
            f"factorize: failed: {first_line(exc)} (the run log above has "
            "details; --log-level DEBUG adds the traceback)"
        )
        return 1


def _end_overdue(signum: int) -> None:
    """End a run still unwinding long after its signal (see :func:`raise_on_signals`)."""
    terminated = signum == signal.SIGTERM
    log.warning(
        "the run did not end within %g s of the signal (Prefect's report of the crash did "
        "not return): exiting without it; Prefect may show the flow run as still running",
        UNWIND_GRACE_S,
    )
    _say("factorize: terminated" if terminated else "factorize: interrupted")
    logging.shutdown()
    os._exit(143 if terminated else 130)


_said = threading.Lock()  # held once the verdict is out: one line, whichever thread says it


def _say(line: str) -> None:
    """The final verdict: one line, secrets masked (third-party messages can hold them)."""
    from pipeline.secrets import scrub

    if not _said.acquire(blocking=False):
        return
    lines = scrub(line).strip().splitlines()
    stream = _verdict or sys.stderr
    print(lines[0] if lines else "factorize: failed", file=stream, flush=True)


if __name__ == "__main__":
    sys.exit(main())
