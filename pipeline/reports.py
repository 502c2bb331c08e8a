"""Human-readable run reports (Markdown) from a job's ``metrics.json`` content.

The same text is written as ``report.md`` next to ``metrics.json`` and published as a
Prefect Markdown artifact by the flow. ``report.md`` sits next to the plots, so it links
them by relative path; the artifact is shown away from those files (the Prefect UI), so
the flow passes the plots in as ``data:`` URIs (:func:`png_data_uri`, each at most
:data:`EMBED_MAX_CHARS` characters) — the UI renders ``data:image/`` sources and draws the
``mermaid`` block of passes. Formatting only: every number comes from the report.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from pipeline.methods import METHODS
from pipeline.methods.base import PassStep
from pipeline.plots import fit_png

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


def _method_spec(config: dict[str, Any], method: str) -> dict[str, Any]:
    return next((m for m in config.get("methods", []) if m.get("method") == method), {})


def _options(config: dict[str, Any], method: str) -> str:
    spec = _method_spec(config, method)
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


# The most characters one inline image may take in a report (its whole ``data:`` URI).
EMBED_MAX_CHARS = 200_000
_PNG_URI_PREFIX = "data:image/png;base64,"


def png_data_uri(png: bytes, max_chars: int = EMBED_MAX_CHARS) -> str:
    """``png`` as a ``data:image/png;base64,…`` URI of at most ``max_chars`` characters.

    A larger plot is quantized and scaled down until it fits (:func:`pipeline.plots.fit_png`).
    """
    budget = (max_chars - len(_PNG_URI_PREFIX)) // 4 * 3  # base64: 4 characters per 3 bytes
    return _PNG_URI_PREFIX + base64.b64encode(fit_png(png, budget)).decode("ascii")


# --------------------------------------------------------------------------- passes


def _covers(steps: list[PassStep], passes: int) -> bool:
    """True when ``steps`` number the passes 1 to ``passes`` in order, without gaps."""
    expected = 1
    for step in steps:
        if step.first != expected or step.last < step.first:
            return False
        expected = step.last + 1
    return expected == passes + 1


def pass_steps(method: str, spec: dict[str, Any], res: dict[str, Any]) -> list[PassStep]:
    """The passes a method made over its input, as :class:`PassStep`s covering ``1`` to
    ``res["passes"]`` (empty when the metrics record no passes)."""
    passes = res.get("passes")
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        return []
    builder = METHODS[method].pass_steps if method in METHODS else None
    steps = builder(spec, res) if builder else []  # a mismatch gets one generic step
    return steps if _covers(steps, passes) else [PassStep(1, passes, "over the input")]


def input_residence(res: dict[str, Any]) -> str:
    """How a method read its input: once, kept in memory, or streamed on every pass."""
    passes, reads = res.get("passes"), res.get("reads_from_storage")
    if not passes or reads is None:
        return "reads from storage not recorded"
    if passes == 1:
        return "read once from storage"
    if reads == 1:
        return "read once from storage, kept in the workers' memory"
    if reads >= passes:
        return "streamed: read from storage on every pass"
    return f"{reads} reads from storage"


def _mermaid_text(text: str) -> str:
    """``text`` safe inside a quoted Mermaid label."""
    return text.replace('"', "#quot;")


def passes_mermaid(report: dict[str, Any]) -> list[str]:
    """A Mermaid flowchart of each method's passes over the input (lines of a fenced
    ``mermaid`` block; empty when no method recorded passes)."""
    inp = report.get("input", {})
    shape = "×".join(map(str, inp.get("shape", [])))
    lines = ["```mermaid", "flowchart LR", f'  src[("A: {shape} {inp.get("dtype", "")}")]']
    drawn = False
    for i, (method, res) in enumerate(report.get("methods", {}).items()):
        steps = pass_steps(method, _method_spec(report.get("config", {}), method), res)
        if not steps:
            continue
        drawn = True
        title = _mermaid_text(f"{method}: {input_residence(res)}")
        lines.append(f'  subgraph m{i}["{title}"]')
        lines += [f'    m{i}_{j}["{_mermaid_text(s.label)}"]' for j, s in enumerate(steps)]
        lines.append("  end")
        lines.append(f'  src -->|"read"| m{i}_0')
        again = "from memory" if res.get("reads_from_storage") == 1 else "read again"
        lines += [f'  m{i}_{j - 1} -->|"{again}"| m{i}_{j}' for j in range(1, len(steps))]
    return [*lines, "```"] if drawn else []


def _passes_section(report: dict[str, Any]) -> list[str]:
    """``## Passes over the input``: one line per method and the Mermaid diagram."""
    diagram = passes_mermaid(report)
    if not diagram:
        return []
    lines = ["## Passes over the input", ""]
    for method, res in report.get("methods", {}).items():
        if res.get("passes"):
            count = f"{res['passes']} pass" + "es" * (res["passes"] != 1)
            lines.append(f"- **{method}**: {count}, {input_residence(res)}")
    return [*lines, "", *diagram, ""]


def _plot_lines(method: str, output: str, images: Mapping[str, str] | None) -> list[str]:
    """The method's plots as Markdown images: ``images[plot]`` as source, or the file name
    (relative to ``report.md``) when ``images`` is ``None``."""
    lines = []
    for plot in METHODS[method].plots:
        src = plot if images is None else images.get(plot)
        if src is None:
            lines.append(f"Plot: `{output.rstrip('/')}/{plot}` (not read)\n")
        else:
            alt = plot.removesuffix(".png").replace("_", " ")
            lines.append(f"![{alt}]({src})\n")
    return lines


def _input_table(inp: dict[str, Any]) -> list[str]:
    """The input's table: a matrix, or a model checkpoint."""
    if inp.get("format") == "safetensors":
        dtypes = ", ".join(f"{n} {code}" for code, n in sorted(inp.get("dtypes", {}).items()))
        return [
            "| url | tensors | parameters | dtypes | stored |",
            "|---|---|---|---|---|",
            f"| `{inp.get('url')}` | {inp.get('tensors')} | {inp.get('params'):,} | {dtypes} | "
            f"{inp.get('stored_bytes', 0) / 2**20:.1f} MiB |",
        ]
    shape = "×".join(map(str, inp.get("shape", [])))
    chunks = "×".join(map(str, inp.get("chunks", [])))
    return [
        "| url | array | shape | layout | chunks | dtype | ‖A‖_F |",
        "|---|---|---|---|---|---|---|",
        f"| `{inp.get('url')}` | {inp.get('array') or '—'} | {shape} | {_layout(inp)} | "
        f"{chunks} | {inp.get('dtype')} | {_fmt(inp.get('fro_norm'))} |",
    ]


def _written(report: dict[str, Any]) -> str:
    """Where the results are: ``factors.zarr``, or the files a method names."""
    output = report.get("output", "").rstrip("/")
    files = [f for res in report.get("methods", {}).values() for f in res.get("files", [])]
    if files:
        return "Files: " + ", ".join(f"`{output}/{f}`" for f in files)
    return f"Factors: `{output}/factors.zarr` (one group per method)"


def report_markdown(report: dict[str, Any], images: Mapping[str, str] | None = None) -> str:
    """A Markdown report of a completed (or skipped) job.

    Parameters
    ----------
    report : the content of ``metrics.json`` (plus ``"output"``; ``"skipped"`` when the run
        found its result complete and unchanged)
    images : ``{plot file name: image source}``, e.g. :func:`png_data_uri` of each plot for
        a report shown away from its folder; a plot missing here is named by its path.
        ``None`` (``report.md``): each plot links to its file next to the report.

    Returns
    -------
    Markdown text: input, methods with options, headline metrics, plots, a diagram of the
    passes over the input, and where the factors are.
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
    lines += ["## Input", "", *_input_table(inp), "", "## Methods", ""]
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
        lines += [f"**Warning**: {w}" for w in res.get("warnings", [])]
        lines += [""] if res.get("warnings") else []
        if METHODS[method].report is not None:
            lines += METHODS[method].report(res)
        if res.get("rank_rule_met") is False:
            lines += [
                f"**Warning**: the rank rule {res['rank_rule']} is not met with "
                f"{res['rank']} components (its max); the result has rank {res['rank']}.",
                "",
            ]
        if res.get("converged") is False and "power_iters_used" in res:
            est = res.get("error_estimate")
            lines += [
                f"**Warning**: `power_iters: auto` did not converge in "
                f"{res['power_iters_used']} iteration passes (estimated relative error of "
                f"the top singular values² {'unknown' if est is None else _fmt(est)}); the "
                "factors may be inaccurate.",
                "",
            ]
        lines += _plot_lines(method, output, images)
    lines += _passes_section(report)
    lines += [
        "## Result",
        "",
        f"{_written(report)}; metrics: `{output.rstrip('/')}/metrics.json`.",
        "",
        f"Started {report.get('started')}, finished {report.get('finished')}.",
        "",
    ]
    return "\n".join(lines)
