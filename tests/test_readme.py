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


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside its fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The link targets a Markdown file offers, as GitHub makes them: each heading
    lower-cased, stripped of punctuation but hyphens, spaces turned into hyphens (a
    repeated one numbered), and every <a id="...">."""
    found, seen = set(), {}
    for line in _prose(path):
        found.update(re.findall(r'<a id="([^"]+)"', line))
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_github_anchors_are_made_as_github_makes_them():
    assert anchors(ROOT / "README.md") >= {
        "image-quality-python--m-enginebench-quality", "code-map", "first-run"}


def test_every_link_between_the_documents_leads_somewhere():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(_prose(doc))):
            if re.match(r"[a-z]+:", target):
                continue                       # a web address
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_sections_the_code_cites_exist():
    """Comments cite measurements as (README, "Title") or (docs/x.md, "Title")."""
    files = [*ROOT.glob("engine/*.py"), *ROOT.glob("studio/*.py"), ROOT / "app.py",
             *ROOT.glob("presets/*.yaml")]
    cited = []
    for f in files:
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", f.read_text(encoding="utf-8"))
        cited += [(f.name, doc, title) for doc, title in
                  re.findall(r'(README|docs/[\w-]+\.md), "([^"]+)"', text)]
    assert len(cited) >= 8
    missing = []
    for name, doc, title in cited:
        path = ROOT / ("README.md" if doc == "README" else doc)
        body = " ".join(path.read_text(encoding="utf-8").split()) if path.exists() else ""
        if title not in body:
            missing.append(f"{name}: {doc}, {title!r}")
    assert not missing, missing
