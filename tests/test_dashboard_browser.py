"""The dashboard in headless Chromium (Debian's, via playwright): every page, one control each, a screenshot.
Slow (a server and a browser), so one module-wide server and browser serve all pages."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ROOT, sample_rows
from tests.test_dashboard_home import dash_home, training_available  # noqa: F401

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
# the README's screenshots are refreshed on request; a plain test run must not rewrite tracked files
SHOTS = ROOT / ("docs/screenshots" if os.environ.get("LANGPWT_UPDATE_SCREENSHOTS") else "tests/artifacts/screenshots")
WAIT_MS = 60_000  # two busy cores: a first page view imports pandas, altair and friends


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(dash_home, prefect_api):
    port = free_port()
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_UI_URL=prefect_api.removesuffix("/api"))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(dash_home.root), "dashboard",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"`langpwt dashboard` did not come up:\n{proc.stdout.read()}")
        time.sleep(0.2)
    yield url
    proc.terminate()  # the CLI passes SIGTERM on to streamlit
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def settle(pg) -> None:
    """Wait until the script run is over and no element is still loading."""
    pg.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=WAIT_MS)
    pg.wait_for_load_state("networkidle", timeout=WAIT_MS)


def shoot(pg, name: str) -> None:
    """A PNG of the page, palette-reduced so the committed file stays small (~50-150 KB)."""
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    pg.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)


def open_page(browser, url: str, path: str, title: str):
    pg = browser.new_page(viewport={"width": 1400, "height": 1300})
    pg.goto(f"{url}/{path}", timeout=WAIT_MS)
    pg.get_by_role("heading", name=title).wait_for(timeout=WAIT_MS)
    settle(pg)
    assert pg.locator("[data-testid='stException']").count() == 0, pg.inner_text("body")[:2000]
    assert not pg.get_by_text("Page not found").count()
    return pg


def test_pipeline(server, browser, dash_home):
    pg = open_page(browser, server, "", "Pipeline")  # the default page lives at the root URL
    pg.locator("[data-testid='stMetric']").first.wait_for()
    # tables render after the metrics (their data arrives as Arrow, then the grid draws): wait for the third, as
    # the other pages wait for their charts; counting at once failed in CI on a loaded machine
    pg.locator("[data-testid='stDataFrame']").nth(2).wait_for(timeout=WAIT_MS)
    assert pg.locator("[data-testid='stDataFrame']").count() >= 3
    assert pg.get_by_text("002_00000.parquet").count()  # the failed shard names its file
    shoot(pg, "pipeline")


def test_token_stats_runs_sql(server, browser):
    pg = open_page(browser, server, "tokens", "Token stats")
    pg.locator("[data-testid='stVegaLiteChart']").nth(2).wait_for(timeout=WAIT_MS)
    shoot(pg, "token_stats")
    box = pg.locator("textarea")
    box.fill("SELECT int_score, count(*) AS documents FROM documents GROUP BY 1 ORDER BY 1")
    pg.get_by_role("button", name="Run query").click()
    pg.locator("[data-testid='stDownloadButton']").wait_for(timeout=WAIT_MS)
    settle(pg)
    assert pg.locator("[data-testid='stVegaLiteChart']").count() == 4  # the result is charted
    n_scores = pl.DataFrame(sample_rows())["int_score"].n_unique()
    assert pg.get_by_text(f"{n_scores} rows × 2 columns").count() == 1
    assert pg.locator("[data-testid='stException']").count() == 0
    pg.locator("[data-testid='stDownloadButton']").scroll_into_view_if_needed()
    shoot(pg, "token_stats_sql")


@pytest.mark.skipif(not training_available(), reason="training code not in this checkout")
def test_training(server, browser):
    pg = open_page(browser, server, "training", "Training")
    pg.locator("[data-testid='stVegaLiteChart']").nth(6).wait_for(timeout=WAIT_MS)
    assert pg.get_by_role("heading", name="tiny-fixture-b").count() == 1
    shoot(pg, "training")


@pytest.mark.skipif(not training_available(), reason="training code not in this checkout")
def test_checkpoints(server, browser):
    pg = open_page(browser, server, "checkpoints", "Checkpoints")
    pg.get_by_text("Artifacts of that run").wait_for(timeout=WAIT_MS)
    assert pg.locator("a[href*='/runs/flow-run/']").count() >= 1  # into the Prefect UI
    shoot(pg, "checkpoints")


@pytest.mark.skipif(not training_available(), reason="training code not in this checkout")
def test_playground_generates(server, browser):
    pg = open_page(browser, server, "playground", "Playground")
    pg.locator("textarea").fill("The history of")
    pg.get_by_label("Length (tokens)").fill("40")  # enough to see it stream, cheap on two cores
    pg.get_by_role("button", name="Generate").click()
    pg.get_by_text("parameters ·").wait_for(timeout=WAIT_MS)  # the model card shown once it loaded
    settle(pg)
    out = pg.locator(".st-key-pg_output [data-testid='stMarkdownContainer']")
    assert out.count() >= 2 and len(out.nth(1).inner_text().strip()) > 0
    assert pg.locator("[data-testid='stException']").count() == 0
    shoot(pg, "playground")
