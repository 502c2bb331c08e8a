"""The flow's report artifact in the Prefect UI, checked in a real browser.

Uses the session's lasting server (``factorize server start``: Prefect's API and UI on a
free loopback port), runs the ``factorize`` flow against it with ``factorize run`` (tsqr,
rsvd and nmf on a small Zarr store written here), then opens the report artifact's page in
Debian's Chromium driven by Playwright: the plots must have loaded whole, the metric tables
and the diagram of passes must be there. Every request that would leave 127.0.0.1 is
blocked, and none but the UI's own telemetry may be among them. A screenshot of the page is
kept under the test's ``tmp_path``.

Chromium is not downloaded by Playwright (its driver comes with the PyPI wheel): the test
launches ``/usr/bin/chromium``, which ``.ci/run`` installs with apt, and fails without it.
"""

from __future__ import annotations

import os
import time
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.conftest import factorize_cmd, job_dict, write_array, write_job
from tests.test_operations import Server

LOOPBACK = "127.0.0.1"
CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that phones home; host names other than loopback do not resolve.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {LOOPBACK}",
]
JOB = "browser-report"
PLOTS = 2  # rsvd's spectrum and nmf's convergence
WAIT_MS = 90_000  # for the UI's bundle and the diagram on a loaded 2-core machine


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium; missing, the test fails (``.ci/run`` installs it)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium "
            "(apt-get install -y chromium, as .ci/run does)"
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def ui_server(prefect_server) -> Server:
    """The session's lasting server (``factorize server start``): its UI, and its warm
    runner for the ``factorize run`` of the test."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return Server(env, prefect_server.api_url)


def _run_flow(server: Server, tmp_path: Path, scheduler: str) -> dict:
    """``factorize run`` of a tsqr + rsvd + nmf job against ``server``; its flow run."""
    rng = np.random.default_rng(7)
    a = rng.random((1200, 6)) @ rng.random((6, 24)) + 0.01 * rng.random((1200, 24))
    write_array(tmp_path / "in.zarr", a, chunks=(300, 24))
    methods = [
        {"method": "tsqr"},
        {"method": "rsvd", "rank": 4},
        {"method": "nmf", "rank": 4, "max_iter": 6},
    ]
    job = job_dict(
        tmp_path,
        str(tmp_path / "in.zarr"),
        name=JOB,
        methods=methods,
        cluster={"kind": "address", "address": scheduler},
    )
    r = server.run([*factorize_cmd(), "run", str(write_job(tmp_path, job))], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = server.flow_runs(name={"any_": [JOB]})
    assert run["state"]["type"] == "COMPLETED", run["state"]
    return run


def _outside(url: str) -> bool:
    """True for a network request to anything but loopback (``data:`` URLs are not)."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname != LOOPBACK


# ``[alt, naturalWidth, whole]`` of the report's inline PNGs once ``n`` of them finished
# loading, else null (polled until then). ``whole``: drawn on a canvas, every pixel is
# opaque — the plots are, while a truncated PNG still has a width but leaves its lower rows
# transparent.
REPORT_IMAGES = """n => {
    const images = [...document.querySelectorAll('img[src^="data:image/png;base64,"]')];
    if (images.length !== n || !images.every(i => i.complete)) return null;
    const whole = image => {
        if (!image.naturalWidth) return false;
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(image, 0, 0);
        const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
        for (let k = 3; k < rgba.length; k += 4) if (rgba[k] !== 255) return false;
        return true;
    };
    return images.map(i => [i.alt, i.naturalWidth, whole(i)]);
}"""
# Prefect 3.8.8's V2 UI starts Amplitude (which fetches its remote config from this host) at
# every page load, whatever PREFECT_SERVER_ANALYTICS_ENABLED says; the test blocks it.
UI_TELEMETRY_HOSTS = {"sr-client-cfg.amplitude.com"}


def _block(route, blocked: list[str]) -> None:
    """Abort a request that would leave loopback, and remember its URL."""
    blocked.append(route.request.url)
    route.abort()


def _check_report_page(page, url: str) -> None:
    """Open the artifact page and check its images, tables and diagram of passes."""
    page.goto(url, wait_until="networkidle", timeout=WAIT_MS)
    images = page.wait_for_function(REPORT_IMAGES, arg=PLOTS, timeout=WAIT_MS, polling=250)
    widths = images.json_value()
    assert sorted(alt for alt, _, _ in widths) == ["nmf convergence", "rsvd spectrum"], widths
    assert all(width > 0 and whole for _, width, whole in widths), widths
    tables = page.locator("table", has_text="residual_rel")
    tables.first.wait_for(timeout=WAIT_MS)
    assert tables.count() == 3  # one per method
    assert page.locator("td", has_text="reads_from_storage").count() == 3
    diagram = page.locator("svg", has_text="pass 1:")
    diagram.first.wait_for(timeout=WAIT_MS)  # mermaid drew the block
    assert page.get_by_text("Failed to render mermaid diagram").count() == 0
    for words in ("rsvd: read once from storage", "NNDSVD start"):
        assert diagram.first.get_by_text(words).count() >= 1, words


def test_report_artifact_renders_plots_tables_and_passes_in_chromium(
    chromium, ui_server: Server, dist_client, tmp_path
):
    from playwright.sync_api import sync_playwright

    from pipeline.reports import EMBED_MAX_CHARS

    started = time.monotonic()
    run = _run_flow(ui_server, tmp_path, dist_client.scheduler.address)
    flow_seconds = time.monotonic() - started
    (artifact,) = [a for a in ui_server.artifacts(run["id"]) if a["key"] == f"report-{JOB}"]
    markdown = artifact["data"]
    uris = [part.split(")", 1)[0] for part in markdown.split("](data:")[1:]]
    assert len(uris) == PLOTS and all(len("data:" + u) <= EMBED_MAX_CHARS for u in uris)
    assert "```mermaid" in markdown

    origin = ui_server.url.removesuffix("/api")
    url = f"{origin}/v2/artifacts/artifact/{artifact['id']}"
    screenshot = tmp_path / "report-artifact.png"
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route(_outside, lambda route: _block(route, outside))
            try:
                _check_report_page(page, url)
            finally:  # also of a failed check: what the page showed
                page.screenshot(path=str(screenshot), full_page=True)
                print(
                    f"Chromium {browser.version} via Playwright {version('playwright')}: "
                    f"screenshot of {url} at {screenshot}"
                )
        finally:
            browser.close()
    browser_seconds = time.monotonic() - started - flow_seconds
    print(f"flow run {flow_seconds:.1f} s, browser {browser_seconds:.1f} s")
    assert {urlsplit(u).hostname for u in outside} <= UI_TELEMETRY_HOSTS, outside
    assert screenshot.stat().st_size > 10_000
