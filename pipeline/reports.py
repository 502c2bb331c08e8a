"""Human-readable run reports (Markdown) from a job's ``metrics.json`` content.

The same text is written as ``report.md`` next to ``metrics.json`` and published as a
Prefect Markdown artifact by the flow. Formatting only: every number comes from the report.
"""

from __future__ import annotations

from typing import Any

from pipeline.methods import METHODS

# The Markdown report adds these to each method's headline metrics.
REPORT_EXTRA_KEYS = ("residual_method", "reads_from_storage", "rank", "rank_rule_met")


def headline(report: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(method, metric, value)`` for every headline metric a report has (the CLI table
    and the Prefect table artifact); each method declares its own keys."""
    return [
        (method, key, res[key])
        for method, res in report["methods"].items()
        for key in METHODS[method].headline
        if res.get(key) is not None
    ]


def summary_table(report: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics of a report."""
    rows = [("method", "metric", "value")]
    for method, key, v in headline(report):
        rows.append((method, key, f"{v:.3e}" if isinstance(v, float) else str(v)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "—"
    if isinstance(value, float):
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _options(config: dict[str, Any], method: str) -> str:
    spec = next((m for m in config.get("methods", []) if m.get("method") == method), {})
    opts = [f"`{k}: {_fmt(v)}`" for k, v in spec.items() if k != "method" and v is not None]
    return ", ".join(opts) or "defaults"


def _layout(inp: dict[str, Any]) -> str:
    """``dense``, or ``CSR, nnz 123 (density 0.05)`` for sparse input."""
    if inp.get("nnz") is None:
        return inp.get("format", "dense")
    return f"{inp['format'].upper()}, nnz {inp['nnz']} (density {inp['density']:.3g})"


def _peak_memory(memory: dict[str, Any] | None) -> str | None:
    """``predicted 310 MiB, measured 295 MiB`` per worker (``None`` when neither is known)."""
    if not memory or (memory.get("predicted_peak") is None and memory.get("measured_peak") is None):
        return None
    mib = [
        "—" if memory.get(key) is None else f"{memory[key] / 2**20:.0f} MiB"
        for key in ("predicted_peak", "measured_peak")
    ]
    return f"predicted {mib[0]}, measured {mib[1]}"


def report_markdown(report: dict[str, Any]) -> str:
    """A Markdown report of a completed (or skipped) job.

    Parameters
    ----------
    report : the content of ``metrics.json`` (plus ``"output"``; ``"skipped"`` when the run
        found its result complete and unchanged)

    Returns
    -------
    Markdown text: input, methods with options, headline metrics, passes, timings, plots
    and where the factors are.
    """
    inp = report.get("input", {})
    config = report.get("config", {})
    output = report.get("output", "")
    lines = [f"# {report.get('name', 'job')}: {report.get('status', 'unknown')}", ""]
    if report.get("skipped"):
        lines += [
            "**Skipped**: the published result below is complete and neither the config nor "
            "the input changed since it was computed.",
            "",
        ]
    shape = "×".join(map(str, inp.get("shape", [])))
    chunks = "×".join(map(str, inp.get("chunks", [])))
    lines += [
        "## Input",
        "",
        "| url | array | shape | layout | chunks | dtype | ‖A‖_F |",
        "|---|---|---|---|---|---|---|",
        f"| `{inp.get('url')}` | {inp.get('array') or '—'} | {shape} | {_layout(inp)} | "
        f"{chunks} | {inp.get('dtype')} | {_fmt(inp.get('fro_norm'))} |",
        "",
        "## Methods",
        "",
    ]
    for method, res in report.get("methods", {}).items():
        lines += [f"### {method}", "", f"Options: {_options(config, method)}", ""]
        lines += ["| metric | value |", "|---|---|"]
        keys = (*METHODS[method].headline, *REPORT_EXTRA_KEYS)
        lines += [f"| {k} | {_fmt(res[k])} |" for k in keys if k in res]
        if res.get("singular_values"):
            top = ", ".join(_fmt(float(s)) for s in res["singular_values"][:10])
            more = " …" if len(res["singular_values"]) > 10 else ""
            lines.append(f"| singular values | {top}{more} |")
        if res.get("explained_variance_ratio"):
            total = sum(res["explained_variance_ratio"])
            lines.append(f"| explained variance (sum of ratios) | {_fmt(float(total))} |")
        if peak := _peak_memory(res.get("memory")):
            lines.append(f"| peak memory per worker | {peak} |")
        lines.append("")
        if res.get("rank_rule_met") is False:
            lines += [
                f"**Warning**: the rank rule {res['rank_rule']} is not met with "
                f"{res['rank']} components (its max); the result has rank {res['rank']}.",
                "",
            ]
        lines += [f"Plot: `{output.rstrip('/')}/{plot}`\n" for plot in METHODS[method].plots]
    lines += [
        "## Result",
        "",
        f"Factors: `{output.rstrip('/')}/factors.zarr` (one group per method); metrics: "
        f"`{output.rstrip('/')}/metrics.json`.",
        "",
        f"Started {report.get('started')}, finished {report.get('finished')}.",
        "",
    ]
    return "\n".join(lines)
