"""The README keeps its promises: the code map names every module, the TensorBoard command
it gives exists, and the licences it states are there."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m[1]


def test_the_code_map_names_every_module():
    table = section("Code map")
    named = set(re.findall(r"`?([\w/]+)\.py`?", table)) | set(re.findall(r"(\w+)\.py", table))
    missing = []
    for folder in ("engine", "studio"):
        for p in sorted((ROOT / folder).glob("*.py")):
            if p.stem != "__init__" and p.stem not in named and f"{folder}/{p.stem}" not in named:
                missing.append(f"{folder}/{p.name}")
    assert not missing, f"the README's code map does not name {missing}"


def test_the_tensorboard_command_is_installed():
    text = section("Watching a run in TensorBoard")
    assert ".venv/bin/tensorboard --logdir workspace/runs" in text
    assert shutil.which("tensorboard", path=str(Path(sys.executable).parent))


def test_the_licences_are_stated():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    text = section("Licences")
    assert "Apache License 2.0" in text and "DINOv3 License" in text
