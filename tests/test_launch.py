"""The start-up path: app.py's flags, the page it serves, launch.sh's logic and .ci/run.

launch.sh is exercised in a copy of the script next to a stand-in `.venv/bin/python` that
records pip calls instead of installing and reports ruff and pytest calls instead of
running them, so the stamp logic and the order of the test mode's steps are checked
without building a real virtual environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
from gradio.processing_utils import move_files_to_cache
from PIL import Image

import app
import engine
from engine import config

ROOT = Path(__file__).resolve().parent.parent


def run_app(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# app.py flags
# --------------------------------------------------------------------------------------

def test_help_lists_every_flag():
    r = run_app("--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--host", "--port", "--workspace", "--auth", "--allow-dir", "--inbrowser"):
        assert flag in r.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_non_loopback_without_auth_is_refused(host):
    r = run_app("--host", host)
    assert r.returncode == 2
    assert f"refusing to listen on {host} without --auth" in r.stderr
    assert "--auth USER:PASS" in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--auth", "admin"], "--auth must be USER:PASS"),
    (["--auth", ":secret"], "--auth must be USER:PASS"),
    (["--port", "70000"], "--port 70000"),
    (["--allow-dir", "/no/such/folder/anywhere"], "--allow-dir /no/such/folder/anywhere"),
])
def test_bad_flags_exit_2_with_a_message(flags, message):
    r = run_app(*flags)
    assert r.returncode == 2
    assert message in r.stderr


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("localhost", True), ("LocalHost", True),
    ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("studio.example", False),
])
def test_is_loopback(host, loopback):
    assert app.is_loopback(host) is loopback


def test_parse_args_defaults_and_accepted_combinations(tmp_path):
    a = app.parse_args([])
    assert (a.host, a.port, a.workspace, a.auth, a.allow_dir, a.inbrowser) == (
        "127.0.0.1", 7860, Path("workspace"), None, [], False)
    a = app.parse_args(["--host", "0.0.0.0", "--auth", "ann:pa:ss", "--allow-dir", str(tmp_path),
                        "--allow-dir", str(tmp_path), "--inbrowser", "--port", "8000"])
    assert (a.host, a.auth, a.allow_dir, a.inbrowser, a.port) == (
        "0.0.0.0", "ann:pa:ss", [tmp_path, tmp_path], True, 8000)
    assert app.parse_args(["--host", "::1"]).auth is None


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------

def test_preset_rows_name_every_preset_with_its_model_size():
    from studio.views import model_size_text, preset_rows

    rows = preset_rows()
    assert [r[0] for r in rows] == config.list_presets()
    by_name = {r[0]: r for r in rows}
    tiny = config.load_preset("tiny-cpu")
    assert by_name["tiny-cpu"][1] == model_size_text(tiny.model)
    assert by_name["tiny-cpu"][2] == tiny.description
    assert model_size_text(config.ModelConfig()) == (
        "custom: width 1024, 16 patch + 4 pixel blocks, patch 16 px")
    assert by_name["home-24gb"][1].startswith("default: width 1024, 16 patch + 4 pixel")


def test_studio_serves_the_page_with_title_version_and_presets(tmp_path):
    from studio.ui import build_ui

    demo = build_ui(tmp_path)
    # an image the page shows, cached as Gradio caches a handler's output: the studio's
    # copy goes when it stops
    preview = next(b for b in demo.blocks.values()
                   if isinstance(b, gr.Image) and b.label == "Preview")
    data = preview.postprocess(Image.new("RGB", (8, 8), "red")).model_dump()
    shown = Path(move_files_to_cache(data, preview, postprocess=True)["path"])
    assert shown.is_file() and str(shown) in preview.temp_files
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(),
                            prevent_thread_lock=True, quiet=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            html = resp.read().decode("utf-8")
        with urllib.request.urlopen(url + "config", timeout=30) as resp:
            page = json.loads(resp.read().decode("utf-8"))
    finally:
        demo.close()
    assert not shown.exists(), "the studio left its cached copy of an image behind"
    assert "PixelHDM Studio" in html
    assert page["title"] == "PixelHDM Studio"
    text = json.dumps(page)
    assert f"Engine {engine.__version__}" in text
    assert str(tmp_path) in text
    for name in config.list_presets():
        assert name in text


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="SIGTERM ends a Windows process at once")
def test_sigterm_stops_the_studio_as_ctrl_c_does(tmp_path):
    """`kill` or a service manager's stop closes the server in order (which deletes the
    studio's cached copies), instead of ending the process where it stands."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--workspace", str(tmp_path / "ws"),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio")))
    try:
        end = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < end, "the studio did not start"
                time.sleep(0.5)
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "closing server" in out.lower()


# --------------------------------------------------------------------------------------
# launch.sh, launch.bat and .ci/run
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["launch.sh", ".ci/run"])
def test_shell_scripts_parse_and_are_executable(script):
    path = ROOT / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert path.stat().st_mode & stat.S_IXUSR


def test_ci_runs_the_test_suite_through_launch_sh():
    lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    assert "./launch.sh test" in commands
    assert not any("playwright install" in ln for ln in commands)


def test_launch_bat_has_crlf_line_endings():
    data = (ROOT / "launch.bat").read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n") > 0


def write_exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def project(tmp_path):
    """A copy of launch.sh in a folder with a space, a stand-in app.py and requirements."""
    root = tmp_path / "my studio"
    root.mkdir()
    shutil.copy(ROOT / "launch.sh", root / "launch.sh")
    (root / "requirements.txt").write_text("torch==2.13.0\n")
    (root / "requirements-dev.txt").write_text("pytest==9.2.0\n")
    (root / "app.py").write_text("import sys\nprint('app args', sys.argv[1:])\n")
    return root


def fake_venv(root: Path, pip_log: Path) -> None:
    """.venv/bin/python that logs pip, ruff and pytest calls and runs everything else for
    real. FAKE_PIP_RC and FAKE_RUFF_RC set the exit codes of pip and ruff; a failing ruff
    prints a finding, as the real one does."""
    write_exe(root / ".venv/bin/python", f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "$*" >> "{pip_log}"
    exit "${{FAKE_PIP_RC:-0}}"
fi
if [ "$1" = "-m" ] && [ "$2" = "ruff" ]; then
    shift 2
    echo "ruff $* in $PWD"
    if [ "${{FAKE_RUFF_RC:-0}}" != 0 ]; then
        echo "app.py:1:8: F401 [*] 'os' imported but unused"
    fi
    exit "${{FAKE_RUFF_RC:-0}}"
fi
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
    shift 2
    echo "pytest $* HF=$HF_HUB_OFFLINE OMP=$OMP_NUM_THREADS OUT=$PIXELHDM_TEST_OUTPUT"
    exit 0
fi
exec "{sys.executable}" "$@"
""")


def launch(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # run from another folder: the script must find its own
    return subprocess.run(["bash", str(root / "launch.sh"), *args], cwd=root.parent,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_launch_sh_installs_only_when_requirements_change(project, tmp_path):
    log = tmp_path / "pip.log"
    fake_venv(project, log)
    pip_calls = lambda: log.read_text().splitlines() if log.exists() else []  # noqa: E731

    r = launch(project, "--port", "7999")
    assert r.returncode == 0, r.stderr
    assert "app args ['--port', '7999']" in r.stdout
    assert len(pip_calls()) == 1 and pip_calls()[0].endswith("-r requirements.txt")

    assert launch(project).returncode == 0
    assert len(pip_calls()) == 1  # stamp matches: no install

    (project / "requirements.txt").write_text("torch==2.13.0\ngradio==6.31.0\n")
    r = launch(project, env={"FAKE_PIP_RC": "1"})
    assert r.returncode != 0 and "pip could not install requirements.txt" in r.stderr
    assert "app args" not in r.stdout
    assert len(pip_calls()) == 2

    assert launch(project).returncode == 0  # the failed install left no stamp: retried
    assert len(pip_calls()) == 3
    assert launch(project).returncode == 0
    assert len(pip_calls()) == 3


def test_launch_sh_test_mode_installs_dev_requirements_and_sets_the_environment(project,
                                                                                  tmp_path):
    log = tmp_path / "pip.log"
    fake_venv(project, log)
    r = launch(project, "test", "-k", "two words", env={"HF_HUB_OFFLINE": "0"})
    assert r.returncode == 0, r.stderr
    assert [c.split()[-1] for c in log.read_text().splitlines()] == [
        "requirements.txt", "requirements-dev.txt"]
    out = project / "test-output"
    assert out.is_dir()
    # ruff checks the whole project first, from the project folder, then pytest runs
    steps = [ln for ln in r.stdout.splitlines() if not ln.startswith("Installing ")]
    assert steps == [f"ruff check . in {project}", f"pytest -k two words HF=1 OMP=1 OUT={out}"]


def test_launch_sh_test_mode_stops_at_a_ruff_finding_before_pytest(project, tmp_path):
    fake_venv(project, tmp_path / "pip.log")
    r = launch(project, "test", env={"FAKE_RUFF_RC": "1"})
    assert r.returncode == 1
    assert "app.py:1:8: F401" in r.stdout          # ruff's own output is shown
    assert not [ln for ln in r.stdout.splitlines() if ln.startswith("pytest ")]
    assert "ruff check found the problems above" in r.stderr
    assert "-m ruff check --fix" in r.stderr


def test_launch_bat_test_mode_runs_ruff_first_and_stops_at_a_finding():
    lines = [ln.strip() for ln in (ROOT / "launch.bat").read_text().splitlines()]
    ruff = lines.index('"%VPY%" -m ruff check .')
    pytest_run = lines.index('"%VPY%" -m pytest %PYTEST_ARGS%')
    assert lines.index(":test") < ruff < pytest_run
    assert lines[ruff + 1] == "if errorlevel 1 goto lint_failed"
    failed = lines.index(":lint_failed")
    assert "ruff check found the problems above" in lines[failed + 1]
    assert lines[failed + 2] == "exit /b 1"
    # the launchers rely on requirements-dev.txt to install ruff, pinned like the rest
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert any(re.fullmatch(r"ruff==[\w.]+", ln) for ln in dev)


def fake_pythons(bindir: Path, versions: dict[str, str], has_venv: bool = True) -> None:
    """Stand-ins for every name launch.sh looks for: a version string, or '' for a broken
    shim (like a pyenv shim for a version that is not selected)."""
    for name in ("python3.14", "python3.13", "python3.12", "python3.11", "python3", "python"):
        ver = versions.get(name, "")
        if not ver:
            write_exe(bindir / name, "#!/bin/sh\nexit 127\n")
            continue
        major, minor = map(int, ver.split("."))
        new_enough = 0 if (3, 11) <= (major, minor) <= (3, 14) else 1
        write_exe(bindir / name, f"""#!/bin/sh
case "$2" in
    *ensurepip*) exit {0 if has_venv else 1} ;;
    *print*) echo {ver} ;;
    *version_info*) exit {new_enough} ;;
    *) exit 3 ;;
esac
""")


def launch_with_path(root: Path, bindir: Path) -> subprocess.CompletedProcess:
    return launch(root, env={"PATH": f"{bindir}:{os.environ['PATH']}"})


def test_launch_sh_names_a_python_out_of_range_and_what_to_install(project, tmp_path):
    fake_pythons(tmp_path / "bin", {"python3": "3.10", "python": "3.9", "python3.14": "3.15"})
    r = launch_with_path(project, tmp_path / "bin")
    assert r.returncode != 0
    assert ("needs Python 3.11 to 3.14; found only: python3.14 (3.15) python3 (3.10) "
            "python (3.9)") in r.stderr
    assert "Ubuntu 22.04 (ships 3.10): sudo apt install python3.11 python3.11-venv" in r.stderr
    assert not (project / ".venv").exists()


def test_launch_sh_takes_the_first_python_in_range(project, tmp_path):
    fake_pythons(tmp_path / "bin", {"python3": "3.10", "python3.11": "3.11"}, has_venv=False)
    r = launch_with_path(project, tmp_path / "bin")
    assert "python3.11 has no 'venv'/'ensurepip' module" in r.stderr   # 3.11 was chosen


def test_a_venv_of_a_python_out_of_range_is_made_again(project, tmp_path):
    write_exe(project / ".venv/bin/python", f"""#!/bin/sh
case "$2" in
    *print*) echo 3.10 ;;
    *version_info*) exit 1 ;;
    *) exec "{sys.executable}" "$@" ;;
esac
""")
    fake_pythons(tmp_path / "bin", {})
    r = launch_with_path(project, tmp_path / "bin")
    assert ".venv was made with Python 3.10; PixelHDM Studio needs 3.11 to 3.14" in r.stdout
    assert "no Python found" in r.stderr and not (project / ".venv").exists()


def test_the_launchers_and_the_readme_name_the_same_python_versions():
    sh = (ROOT / "launch.sh").read_text()
    bat = (ROOT / "launch.bat").read_text()
    lo, hi = int(re.search(r"^PY_MIN=(\d+)$", sh, re.M)[1]), int(re.search(r"^PY_MAX=(\d+)$",
                                                                            sh, re.M)[1])
    assert f"sys.exit(not (3, {lo}) <= sys.version_info[:2] <= (3, {hi}))" in bat
    assert f"Python 3.{lo} to 3.{hi}" in (ROOT / "README.md").read_text()
    from engine.doctor import PY_RANGE
    assert PY_RANGE == ((3, lo), (3, hi))
    assert 'if /i "%~1"=="doctor" goto doctor' in bat and "engine\\doctor.py" in bat
    assert (lo, hi) == (11, 14)


def test_launch_sh_says_when_no_python_is_found(project, tmp_path):
    fake_pythons(tmp_path / "bin", {})
    r = launch_with_path(project, tmp_path / "bin")
    assert r.returncode != 0
    assert "no Python found" in r.stderr and "Install Python 3.12" in r.stderr


def test_launch_sh_names_the_missing_venv_package(project, tmp_path):
    fake_pythons(tmp_path / "bin", {"python3.12": "3.12"}, has_venv=False)
    r = launch_with_path(project, tmp_path / "bin")
    assert r.returncode != 0
    assert "python3.12 has no 'venv'/'ensurepip' module" in r.stderr
    assert "python3.12-venv" in r.stderr


def test_launch_sh_doctor_reports_the_machine():
    r = subprocess.run(["bash", str(ROOT / "launch.sh"), "doctor"], cwd="/", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for label in ("Python", "torch", "CPU bf16", "flash_attn", "bitsandbytes", "C compiler",
                  "DDP backend", "disk", "port 7860"):
        assert label in r.stdout


def test_launch_sh_installs_again_when_the_constraints_change(project, tmp_path):
    log = tmp_path / "pip.log"
    fake_venv(project, log)
    (project / "constraints.txt").write_text("numpy==2.4.6\n")
    assert launch(project).returncode == 0
    assert launch(project).returncode == 0
    assert len(log.read_text().splitlines()) == 1
    (project / "constraints.txt").write_text("numpy==2.4.7\n")
    assert launch(project).returncode == 0
    assert len(log.read_text().splitlines()) == 2
