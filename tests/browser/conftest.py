"""Browser fixtures: the studio served in-process on a free port with a fresh workspace,
and one headless Chromium page driven through Playwright's sync API.

The system Chromium (/usr/bin/chromium) is used; Playwright never downloads a browser.
Without it, or without playwright, the browser tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def pytest_collection_modifyitems(config, items):
    reason = None
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install -r requirements-dev.txt)"
    if reason:
        for item in items:
            if "browser" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def screenshots() -> Path:
    out = Path(os.environ.get("PIXELHDM_TEST_OUTPUT", "test-output")) / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def studio_server(tmp_path_factory):
    """(url, workspace) of a running studio; every training process it started is stopped
    on teardown."""
    from studio.runner import Runner
    from studio.ui import build_ui

    workspace = tmp_path_factory.mktemp("workspace")
    demo = build_ui(workspace)
    _, url, _ = demo.queue().launch(server_name="127.0.0.1", server_port=free_port(),
                                    prevent_thread_lock=True, quiet=True,
                                    allowed_paths=[str(workspace)])
    try:
        yield url, workspace
    finally:
        runner = Runner(workspace)
        for run in runner.runs():
            if run.alive:
                runner.force_stop(run.run_id, grace=10.0)
        demo.close()
        shutil.rmtree(workspace, ignore_errors=True)


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=CHROMIUM_ARGS)


def open_page(browser, url: str):
    """A new tab of the studio at `url`, loaded (not "network idle": the run monitor polls
    every two seconds)."""
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.set_default_timeout(30_000)
    pg.goto(url, wait_until="load")
    return pg


@pytest.fixture(scope="module")
def page(studio_server):
    from playwright.sync_api import sync_playwright

    url, _ = studio_server
    with sync_playwright() as p:
        browser = launch_chromium(p)
        pg = open_page(browser, url)
        pg.wait_for_selector("text=PixelHDM Studio")
        try:
            yield pg
        finally:
            browser.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.browser_failed = report.failed
    return report


@pytest.fixture(autouse=True)
def screenshot_on_failure(request, screenshots):
    """A failed browser test leaves a picture of the page it saw."""
    yield
    if getattr(request.node, "browser_failed", False) and "page" in request.fixturenames:
        request.getfixturevalue("page").screenshot(
            path=str(screenshots / f"failed-{request.node.name}.png"), full_page=True)
