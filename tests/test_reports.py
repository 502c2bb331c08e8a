"""The Markdown report: plots linked (report.md) or inline within a size bound (the Prefect
artifact), and the diagram of each method's passes over the input."""

from __future__ import annotations

import base64
import io
import itertools
import re

import numpy as np
import pytest
from PIL import Image

from tests.conftest import job_dict, write_array

DATA_URI = re.compile(r"!\[([^\]]*)\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)")


def _png(uri: str) -> Image.Image:
    png = base64.b64decode(uri.split(",", 1)[1], validate=True)
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every row: a truncated PNG raises
    return image


def _noise_png(height: int = 600, width: int = 900) -> bytes:
    """A PNG that does not compress: far larger than any plot."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- size bound


def _largest_plots() -> dict[str, bytes]:
    """The busiest plots the methods make: svd's spectrum of every singular value of a
    2,000-column input (a noisy spectrum over 12 decades) and NMF's error over 5,000
    iterations (a noisy history)."""
    from pipeline.plots import convergence_png, spectrum_png

    rng = np.random.default_rng(1)
    sv = np.sort(np.abs(rng.standard_normal(2000)) * np.logspace(0, -12, 2000))[::-1]
    history = list(np.abs(rng.standard_normal(5000)) * 0.1 + np.linspace(1, 0.01, 5000))
    return {
        "spectrum": spectrum_png(sv, float(np.sum(sv**2)) * 1.5, True),
        "convergence": convergence_png(history, "hals"),
    }


@pytest.mark.parametrize("kind", ["spectrum", "convergence"])
def test_the_largest_plots_embed_unchanged_within_the_bound(kind):
    from pipeline.reports import EMBED_MAX_CHARS, png_data_uri

    png = _largest_plots()[kind]
    uri = png_data_uri(png)
    assert len(uri) <= EMBED_MAX_CHARS, len(uri)
    assert base64.b64decode(uri.split(",", 1)[1]) == png  # small enough: not re-encoded
    print(f"{kind}: {len(png)} bytes of PNG, {len(uri)} characters inline")


def test_an_oversized_png_is_shrunk_under_the_bound_and_stays_a_whole_png():
    from pipeline.reports import EMBED_MAX_CHARS, png_data_uri

    png = _noise_png()
    assert len(png) > 5 * EMBED_MAX_CHARS
    uri = png_data_uri(png)
    assert len(uri) <= EMBED_MAX_CHARS
    image = _png(uri)
    assert image.mode == "P" and 100 < image.width < 900 and 60 < image.height < 600


def test_quantizing_alone_fits_a_plot_into_a_tighter_budget_at_full_size():
    from pipeline.plots import fit_png

    png = _largest_plots()["spectrum"]
    original = Image.open(io.BytesIO(png)).size
    budget = len(png) // 2
    smaller = fit_png(png, budget)
    assert len(smaller) <= budget
    assert Image.open(io.BytesIO(smaller)).size == original  # fewer colours, same pixels


def test_fit_png_refuses_a_budget_no_plot_fits():
    from pipeline.plots import fit_png

    with pytest.raises(ValueError, match="at least 1024"):
        fit_png(_noise_png(50, 50), 1000)


# --------------------------------------------------------------------------- real runs

# Two jobs between them run every method with both layouts of its passes.
JOBS = {
    "full": [
        {"method": "tsqr"},
        {"method": "svd", "center": True},
        {"method": "rsvd", "rank": 4, "power_iters": 2, "measure_residual": True},
        {"method": "nmf", "rank": 4, "max_iter": 5},
    ],
    "lean": [
        {"method": "tsqr", "q": False},
        {"method": "svd", "u": False},
        {"method": "rsvd", "rank": 4, "power_iters": 0},
        {"method": "nmf", "rank": 4, "max_iter": 4, "init": "random"},
    ],
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory, client):
    """``{job: (its metrics.json content, its result folder)}`` of the JOBS, run for real."""
    from pipeline.jobs import run_job

    base = tmp_path_factory.mktemp("reports")
    rng = np.random.default_rng(3)
    a = np.abs(rng.standard_normal((1600, 20)))  # full rank: every rsvd sketch is graded
    write_array(base / "in.zarr", a, chunks=(400, 20))
    done = {}
    for name, methods in JOBS.items():
        job = job_dict(base, str(base / "in.zarr"), name=name, methods=methods)
        done[name] = (run_job(job, client=client), base / "out" / name)
    return done


@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_method_s_passes_are_described_pass_by_pass(reports, job):
    from pipeline.reports import pass_steps

    report, _ = reports[job]
    for spec in JOBS[job]:
        method = spec["method"]
        res = report["methods"][method]
        steps = pass_steps(method, spec, res)
        assert steps[0].first == 1 and steps[-1].last == res["passes"], (method, steps)
        assert all(b.first == a.last + 1 for a, b in itertools.pairwise(steps))
        assert "over the input" not in [s.what for s in steps], (method, res["passes"])


def test_report_md_links_its_plots_next_to_it(reports):
    from pipeline.methods import METHODS

    report, folder = reports["full"]
    text = (folder / "report.md").read_text()
    assert "data:" not in text
    for method in report["methods"]:
        for plot in METHODS[method].plots:
            alt = plot.removesuffix(".png").replace("_", " ")
            assert f"![{alt}]({plot})" in text
            assert (folder / plot).read_bytes()[:4] == b"\x89PNG"
    assert "## Passes over the input" in text and "```mermaid" in text


def test_inline_report_carries_each_plot_whole_and_names_a_missing_one(reports):
    from pipeline.reports import png_data_uri, report_markdown

    report, folder = reports["full"]
    images = {"rsvd_spectrum.png": png_data_uri((folder / "rsvd_spectrum.png").read_bytes())}
    text = report_markdown(report, images=images)
    ((alt, uri),) = DATA_URI.findall(text)
    assert alt == "rsvd spectrum" and _png(uri).size[0] > 0
    assert f"Plot: `{report['output']}/nmf_convergence.png` (not read)" in text
    assert "| residual_rel |" in text  # the metrics stay Markdown tables


def test_the_diagram_has_a_node_per_pass_group_and_says_where_the_input_lives(reports):
    from pipeline.reports import input_residence, pass_steps, passes_mermaid

    report, _ = reports["full"]
    diagram = "\n".join(passes_mermaid(report))
    assert diagram.startswith("```mermaid\nflowchart LR") and diagram.endswith("```")
    shape = "×".join(map(str, report["input"]["shape"]))
    assert f'src[("A: {shape} float64")]' in diagram
    for i, (method, res) in enumerate(report["methods"].items()):
        spec = next(s for s in JOBS["full"] if s["method"] == method)
        nodes = re.findall(rf'^    m{i}_\d+\["(pass[^"]*)"\]$', diagram, re.M)
        assert nodes == [s.label for s in pass_steps(method, spec, res)]
        assert f'subgraph m{i}["{method}: {input_residence(res)}"]' in diagram
    assert '"' not in "".join(re.findall(r'\["([^\]]*)"\]', diagram)).replace("#quot;", "")


# --------------------------------------------------------------------------- metrics alone


def test_input_residence_follows_passes_and_reads():
    from pipeline.reports import input_residence

    assert input_residence({"passes": 1, "reads_from_storage": 1}) == "read once from storage"
    kept = input_residence({"passes": 3, "reads_from_storage": 1})
    assert kept == "read once from storage, kept in the workers' memory"
    streamed = input_residence({"passes": 3, "reads_from_storage": 3})
    assert streamed == "streamed: read from storage on every pass"
    assert input_residence({"passes": 3}) == "reads from storage not recorded"


@pytest.mark.parametrize(
    ("spec", "res", "labels"),
    [
        (
            {"single_pass": True, "power_iters": 2},
            {"passes": 1},
            ["pass 1: sketches AΩ and ΨA, column sums, ‖A‖²: U, S, Vt"],
        ),
        (  # a sketch orthonormalised by TSQR takes one more pass for B = QᵀA
            {"power_iters": 1},
            {"passes": 3},
            [
                "pass 1: column sums, ‖A‖², W = AᵀAΩ",
                "pass 2: sketch Y = AZ kept; AᵀY, YᵀY: U, S, Vt",
                "pass 3: B = QᵀA (Q of the sketch by TSQR)",
            ],
        ),
        (  # metrics the description cannot account for: one generic step
            {"power_iters": 1},
            {"passes": 7},
            ["passes 1–7: over the input"],
        ),
    ],
)
def test_rsvd_pass_steps_from_metrics(spec, res, labels):
    from pipeline.reports import pass_steps

    assert [s.label for s in pass_steps("rsvd", spec, res)] == labels


def test_resumed_nmf_counts_only_this_run_s_iterations():
    from pipeline.reports import pass_steps

    res = {"passes": 5, "iterations": 12, "resumed_from": 8}
    labels = [s.label for s in pass_steps("nmf", {}, res)]
    assert labels == [
        "pass 1: ‖A‖², smallest and mean entry",
        "passes 2–5: iterations 9–12: W from AHᵀ, H from WᵀA",
    ]


def test_no_recorded_passes_no_diagram():
    from pipeline.reports import pass_steps, passes_mermaid

    report = {"input": {"shape": [4, 2]}, "methods": {"tsqr": {"fro_norm": 1.0}}}
    assert pass_steps("tsqr", {}, report["methods"]["tsqr"]) == []
    assert passes_mermaid(report) == []


# --------------------------------------------------------------------------- the flow's


def test_flow_inlines_the_published_plots_and_names_one_it_cannot_read(
    reports, tmp_path, prefect_harness
):
    import shutil

    from prefect import flow

    from flows.factorize import _report_with_plots
    from pipeline.config import OutputSpec

    report, folder = reports["full"]
    copy = shutil.copytree(folder, tmp_path / report["name"])
    (copy / "nmf_convergence.png").unlink()

    @flow
    def render() -> str:
        return _report_with_plots(report, OutputSpec(url=str(tmp_path)))

    text = render()
    inline = dict(DATA_URI.findall(text))
    assert sorted(inline) == ["rsvd spectrum", "svd spectrum"]
    for alt, uri in inline.items():
        png = (copy / f"{alt.replace(' ', '_')}.png").read_bytes()
        assert base64.b64decode(uri.split(",", 1)[1]) == png
    assert "nmf_convergence.png` (not read)" in text
