"""The studio killed while a run trains: the run goes on, the restarted studio re-attaches
to it, two browser tabs show the same run in the same state, and a second start of the
run is refused while it trains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, launch_chromium, open_page
from test_studio import expect, open_tab, text_of, wait_text

from engine.job import RunDir, pid_alive

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def start_studio(workspace: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--workspace", str(workspace),
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    end = time.time() + 120
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            assert proc.poll() is None, "the studio exited while starting"
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the studio did not come up")


def the_run(workspace: Path) -> RunDir:
    runs = list((workspace / "runs").iterdir())
    assert len(runs) == 1
    return RunDir(runs[0])


def step_of(page) -> int:
    return int(re.search(r"step ([\d,]+)", text_of(page, ".phdm-progress")).group(1)
               .replace(",", ""))


def test_a_run_outlives_the_studio_and_two_tabs_of_the_new_one_agree(tmp_path):
    from playwright.sync_api import sync_playwright

    from studio.runner import Runner
    workspace = tmp_path / "workspace"
    first, url = start_studio(workspace)
    second = None
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = open_page(browser, url)
            page.get_by_role("button", name="Start the demo").click()
            page.wait_for_selector(".phdm-progress.phdm-running", timeout=120_000)
            run = the_run(workspace)
            trainer = run.read_status().pid

            os.kill(first.pid, signal.SIGKILL)          # the studio dies, not the run
            first.wait(timeout=30)
            page.close()
            before = run.read_status().step
            end = time.time() + 60
            while run.read_status().step <= before and time.time() < end:
                time.sleep(0.5)
            assert run.read_status().step > before and pid_alive(trainer)

            second, url = start_studio(workspace)       # the new studio re-attaches
            tabs = [open_page(browser, url) for _ in "ab"]
            for tab in tabs:
                open_tab(tab, "Train")
                tab.wait_for_selector(".phdm-progress.phdm-running", timeout=60_000)
                assert run.run_id in tab.content()   # the run the monitor shows
                # a second start of this run is not offered while it trains
                expect(tab.get_by_role("button", name="Resume")).to_be_disabled()
            a, b = (step_of(t) for t in tabs)
            assert abs(a - b) <= 20 and max(a, b) > before   # the same run, moving on

            tabs[0].get_by_role("button", name="Stop", exact=True).click()
            for tab in tabs:                             # both see the stop
                tab.wait_for_selector(".phdm-progress.phdm-stopped", timeout=120_000)
            wait_text(tabs[1], ".phdm-log pre", r"saved step_\d{7}", timeout=30_000)
            assert step_of(tabs[0]) == step_of(tabs[1]) == run.read_status().step
            browser.close()
        end = time.time() + 60   # it reported "stopped" and is ending
        while pid_alive(trainer) and time.time() < end:
            time.sleep(0.2)
        assert not pid_alive(trainer)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        runner = Runner(workspace)
        for info in runner.runs():
            if info.alive:
                runner.force_stop(info.run_id, grace=10.0)
