"""The ``factorize`` command: run, validate, schema and data tools.

Exit codes: 0 success; 2 bad config or bad input (one line on stderr, no traceback);
1 a failure while computing. ``run`` imports the Prefect flow lazily, so ``validate`` and
``schema`` start fast and never touch Prefect.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from pipeline.config import (
    PACKAGED_KINDS,
    SYNTHETIC_KINDS,
    JobConfig,
    SyntheticSpec,
    check_unique_names,
    json_schema,
    load_config,
    redact,
)
from pipeline.errors import ConfigError, FactorizeError, UserError, first_line
from pipeline.lifetime import Terminated, raise_on_sigterm, start_api_server, wait_api_server

log = logging.getLogger("pipeline")

# Where the final one-line verdict goes: stderr, or its saved copy once a run has sent
# fd 2 to stdout (see _logs_to_stdout).
_verdict: TextIO | None = None


def _setup_logging(level: str) -> None:
    from pipeline.secrets import install_log_scrubber

    install_log_scrubber()  # before any record: secrets masked at every level
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Worker lifecycle chatter is noise for users of the CLI.
    for noisy in ("distributed", "bokeh", "tornado", "httpx", "aiobotocore.credentials"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _validate(args: argparse.Namespace) -> int:
    from pipeline.jobs import precheck

    for path in args.configs:
        cfg = load_config(path)
        _check_credentials(path, cfg, submit=False)
        m = precheck(cfg)
        if args.plan:
            from pipeline.plan import format_plan, plan_job

            plan = plan_job(cfg)
            print(f"{path}: ok")
            if plan is None:
                print("  plan: the sparse input is created by the run; plan it once it exists")
            else:
                print("\n".join(format_plan(plan)))
            continue
        if m is None:
            spec = cfg.input.create_if_missing
            size = f" {spec.shape[0]}×{spec.shape[1]}" if spec.shape else ""
            print(
                f"{path}: ok — input {redact(cfg.input.url)} does not exist yet and will be "
                "created "
                f"({spec.kind}{size} {spec.dtype})"
            )
            continue
        arr = f" array {m.array}" if m.array else ""
        layout = (
            f"{m.format.upper()}, nnz {m.nnz} (density {m.density:.3g}), "
            f"row blocks of {m.chunks[0]}"
            if m.nnz is not None
            else f"dense, chunks {m.chunks[0]}×{m.chunks[1]}"
        )
        print(
            f"{path}: ok — input {m.url}{arr}: shape {m.shape[0]}×{m.shape[1]}, {layout}, "
            f"dtype {m.dtype} (Zarr v{m.zarr_format}); "
            f"methods: {', '.join(s.method for s in cfg.methods)}"
        )
    return 0


def _check_credentials(path: str, cfg: JobConfig, *, submit: bool, resolve: bool = True) -> None:
    """The credential rules of ``pipeline.secrets``, before any input is opened.

    Every command refuses a password in a URL; ``submit`` refuses any literal credential
    (the job is stored on the server). References are resolved once here (``resolve``), so
    a missing variable or Secret block is one line naming the key path.
    """
    from pipeline import secrets

    secrets.register_options(cfg.input.storage_options)  # masked even before anything opens
    secrets.register_options(cfg.output.storage_options)
    if submit:
        secrets.refuse_literals(cfg, path)
    else:
        secrets.refuse_url_credentials(cfg, path)
    if secrets.has_references(cfg, "secret"):
        import flows  # noqa: F401  (registers the Prefect Secret resolver)
    if resolve:
        secrets.check_references(cfg, path)


def _load(
    paths: Sequence[str], *, together: bool = True, check_input: bool = True, submit: bool = False
) -> list[JobConfig]:
    """Parse job files once and refuse bad ones before Prefect or a cluster starts (exit 2).

    ``together``: the jobs run side by side, so their names (result folders) must differ.
    ``check_input``: open each input here (and resolve credential references for it).
    ``submit``: the jobs are stored on a server, so no literal credential is allowed.
    """
    from pipeline.jobs import precheck

    configs = [load_config(p) for p in paths]
    for path, cfg in zip(paths, configs, strict=True):
        _check_credentials(path, cfg, submit=submit, resolve=check_input)
    if together:
        check_unique_names(configs)
    if check_input:
        for cfg in configs:
            precheck(cfg)
    return configs


@contextmanager
def _terminal_progress() -> Iterator[None]:
    """A progress bar on stdout when it is a terminal; plain log lines otherwise."""
    if not sys.stdout.isatty():
        yield
        return
    from pipeline.progress import TerminalBar, progress_sink

    with progress_sink(TerminalBar(sys.stdout)):
        yield


def _run(args: argparse.Namespace) -> int:
    from pipeline.reports import summary_table
    from pipeline.secrets import move_to_environment

    # No literal credential goes to Prefect: each moves into a variable of this process.
    configs = [move_to_environment(c) for c in _load(args.configs)]
    start_api_server()  # before Prefect is imported: a temporary server that dies with us
    from flows import factorize, factorize_batch

    wait_api_server()
    with _terminal_progress():
        if len(configs) == 1:
            reports = {configs[0].name: factorize(config=configs[0])}
        else:  # concurrent flow runs on one shared cluster
            reports = factorize_batch(configs=configs)
    for name, report in reports.items():
        verdict = "skipped (complete, unchanged)" if report.get("skipped") else "completed"
        print(f"\n{name}: {verdict} — {report['output']}")
        print(summary_table(report))
    return 0


def _submit(args: argparse.Namespace) -> int:
    # Workers resolve the references; here only when the input is opened here too.
    configs = _load(args.configs, together=False, check_input=args.check_input, submit=True)
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

    # The served runs are subprocesses of this one: they inherit the moved credentials.
    configs = [move_to_environment(c) for c in _load(args.configs)]
    start_api_server(services=True)  # with the scheduler; a server that dies with us
    from flows.operations import serve_jobs

    wait_api_server()
    serve_jobs(configs, cron=args.cron, interval=args.interval, timezone=args.timezone)
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
        )
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "generate")) from None
    write_synthetic(args.url, spec, array=args.array)
    print(f"wrote {spec.kind} {spec.dtype} matrix to {args.url}")
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

    p = sub.add_parser("schema", help="print the job file's JSON Schema")
    p.set_defaults(func=_schema)

    p = sub.add_parser("generate", help="write a synthetic matrix to a Zarr store")
    p.add_argument("url", help="target store (path or fsspec URL); replaced if it exists")
    p.add_argument("--shape", nargs=2, type=int, metavar=("ROWS", "COLS"))
    p.add_argument("--chunks", nargs=2, type=int, metavar=("ROWS", "COLS"))
    p.add_argument("--kind", default="gaussian", choices=[*SYNTHETIC_KINDS, *PACKAGED_KINDS])
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--density", type=float, default=0.05, help="sparse kinds: share of non-zero entries"
    )
    p.add_argument(
        "--array",
        help="write into a group under this array name (sparse kinds: an AnnData store, "
        "the matrix at this name, e.g. X)",
    )
    p.set_defaults(func=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``factorize`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    _logs_to_stdout()
    raise_on_sigterm()
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


def _say(line: str) -> None:
    """The final verdict: one line, secrets masked (third-party messages can hold them)."""
    from pipeline.secrets import scrub

    lines = scrub(line).strip().splitlines()
    stream = _verdict or sys.stderr
    print(lines[0] if lines else "factorize: failed", file=stream, flush=True)


if __name__ == "__main__":
    sys.exit(main())
