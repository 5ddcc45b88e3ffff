"""The pinned requirements install on every Python version the launchers accept: pip
resolves requirements.txt and requirements-dev.txt (with constraints.txt) against the
package index for each of them, without installing anything, and every package it would
install is pinned in one of the three files.

To regenerate constraints.txt after changing a pin, run this module's `resolve` for each
version and write the union of the `name==version` pairs it returns that are not direct
requirements (the file's header says the same)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = ("Could not fetch URL", "NewConnectionError", "Max retries exceeded",
           "Temporary failure in name resolution", "Network is unreachable")


def accepted_versions() -> list[str]:
    sh = (ROOT / "launch.sh").read_text()
    lo = int(re.search(r"^PY_MIN=(\d+)$", sh, re.M)[1])
    hi = int(re.search(r"^PY_MAX=(\d+)$", sh, re.M)[1])
    return [f"3.{m}" for m in range(lo, hi + 1)]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    out = {}
    for f in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        for line in (ROOT / f).read_text().splitlines():
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;#]+)\s*", line)
            if m:
                out[norm(m[1])] = m[2]
    return out


def resolve(version: str) -> tuple[int, str, list[tuple[str, str]]]:
    """(pip's exit code, its error output, the (name, version) pairs it would install)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
             "--disable-pip-version-check", "--target", str(Path(tmp) / "t"),
             "--python-version", version, "--only-binary=:all:", "--report", str(report),
             "-r", "requirements.txt", "-r", "requirements-dev.txt"],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        found = []
        if proc.returncode == 0:
            found = [(i["metadata"]["name"], i["metadata"]["version"])
                     for i in json.loads(report.read_text())["install"]]
        return proc.returncode, proc.stderr, found


@pytest.mark.slow
def test_every_accepted_python_resolves_the_pinned_requirements():
    versions = accepted_versions()
    assert versions == ["3.11", "3.12", "3.13", "3.14"]
    with ThreadPoolExecutor(len(versions)) as pool:
        results = dict(zip(versions, pool.map(resolve, versions)))
    errors = {v: err for v, (code, err, _) in results.items() if code}
    if errors and all(any(w in err for w in OFFLINE) for err in errors.values()):
        pytest.skip("the package index cannot be reached from here")
    assert not errors, {v: err[-1500:] for v, err in errors.items()}
    pins = pinned()
    for version, (_, _, found) in results.items():
        loose = [f"{n}=={v}" for n, v in found
                 if norm(n) not in pins or pins[norm(n)] != v.split("+")[0]]
        assert not loose, f"Python {version} would install packages no file pins: {loose}"


def test_the_pins_name_pandas_and_use_the_constraints():
    req = (ROOT / "requirements.txt").read_text().splitlines()
    assert "-c constraints.txt" in req and any(r.startswith("pandas==") for r in req)
    assert "-c constraints.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
