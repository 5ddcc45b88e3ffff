"""The boundaries between the rooms of the code, checked by reading import statements
(ast), so that nothing heavy is imported to check them:

* engine/ never imports gradio or studio, not even inside a function, and every engine
  module imports in a Python where gradio (and studio) cannot be imported;
* the network and the math - model.py with attention.py, flow.py and sampling.py - import
  only torch, engine.config and the standard library without its file, process and
  network modules, plus the neighbours the design gives them: model uses attention,
  sampling uses flow's time convention, and attention uses flash-attn where it is
  installed. Imports inside functions count too;
* no modules of engine/ and studio/ import each other in a circle, directly or through
  others. Module-level imports make the edges, those under `if TYPE_CHECKING:` included
  (a module does not import one above it, not even for type hints). An import inside a
  function is a deliberate lazy import that runs only when the function is called (a
  command line reaching the code it fronts, an optional heavy dependency), so it is no
  edge. KNOWN_CYCLES lists the circles that exist and are still to be ended.

Each rule is a function that returns the problems it finds; the last tests run them on a
small module tree in tmp_path to show that each one catches what it is meant to.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "studio")

# module -> what it may import besides torch, engine.config and the standard library
# (less STDLIB_IO): an engine module or a third-party package, with its submodules
PURE = {
    "engine.model": {"engine.attention"},
    "engine.attention": {"flash_attn"},   # the optional GPU extra (requirements-gpu.txt)
    "engine.flow": set(),
    "engine.sampling": {"engine.flow"},
}
PURE_ALWAYS = {"torch", "engine.config"}
# standard-library modules that reach files, processes or the network: I/O lives at the
# edges (train.py, generate.py, job.py, the studio), never in the network or the math
STDLIB_IO = frozenset({
    "csv", "ftplib", "glob", "gzip", "http", "io", "json", "multiprocessing", "os",
    "pathlib", "pickle", "shelve", "shutil", "socket", "sqlite3", "subprocess", "tarfile",
    "tempfile", "urllib", "zipfile"})

# The circles of module-level imports that exist today. Each is tolerated only as it is:
# a circle that grows, shrinks or appears elsewhere fails the test, and one that is gone
# must be taken out of this list so that it cannot come back.
KNOWN_CYCLES: set[frozenset[str]] = set()   # none left: a new circle fails at once


# --------------------------------------------------------------------------------------
# Reading the imports
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    source: str   # the importing module, e.g. "engine.model"
    target: str   # the module it imports, e.g. "engine.config", "torch.nn", "gradio"
    line: int
    lazy: bool    # inside a function: runs when the function is called

    def __str__(self) -> str:
        where = " (inside a function)" if self.lazy else ""
        return f"{self.source} line {self.line} imports {self.target}{where}"


def top(name: str) -> str:
    return name.partition(".")[0]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_files(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> its file, for every .py file of the packages."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: Collection[str]) -> list[Import]:
    """Every import statement of one module. `from pkg import x` names pkg.x when that is
    a module of the tree, else pkg; relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(name, a.name, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[:len(parts) - child.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append(Import(name, sub if sub in modules else base, child.lineno,
                                        lazy))
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def scan(root: Path, packages: Iterable[str] = PACKAGES) -> tuple[list[Import], set[str]]:
    """(every import of the packages' modules, the set of those modules)."""
    files = module_files(root, packages)
    imports = [i for name, path in files.items() for i in imports_of(name, path, files)]
    return imports, set(files)


# --------------------------------------------------------------------------------------
# The rules: each returns the problems it finds, one line each
# --------------------------------------------------------------------------------------

def ui_imports_in_engine(imports: Iterable[Import]) -> list[str]:
    return [f"{i}: the engine never imports the UI" for i in imports
            if within(i.source, "engine") and top(i.target) in ("gradio", "studio")]


def impure_imports(imports: Iterable[Import], pure: dict[str, set[str]] = PURE) -> list[str]:
    problems = []
    for i in imports:
        if i.source not in pure:
            continue
        allowed = PURE_ALWAYS | pure[i.source]
        if any(within(i.target, a) for a in allowed):
            continue
        if top(i.target) in sys.stdlib_module_names and top(i.target) not in STDLIB_IO:
            continue
        problems.append(f"{i}: {i.source} imports only torch, engine.config, the standard "
                        f"library without I/O" + "".join(f", {a}" for a in sorted(pure[i.source])))
    return problems


def import_cycles(imports: Iterable[Import], modules: Collection[str]) -> dict[frozenset, str]:
    """Each circle of module-level imports (a strongly connected component of two or more
    modules) -> one loop through it, with the line of every import on the way."""
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for i in imports:
        if not i.lazy and i.target in edges and i.target != i.source:
            edges[i.source].setdefault(i.target, i.line)

    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return {c: loop_through(c, edges) for c in components}


def loop_through(component: frozenset, edges: dict[str, dict[str, int]]) -> str:
    """The shortest way from the component's first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v]):
            if w == start:
                hops = paths[v] + [start]
                return " -> ".join(f"{a} (line {edges[a][b]})"
                                   for a, b in zip(hops, hops[1:])) + f" -> {start}"
            if w in component and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"{sorted(component)} is not a circle")


def cycle_problems(imports: Iterable[Import], modules: Collection[str],
                   known: set[frozenset] = KNOWN_CYCLES) -> list[str]:
    found = import_cycles(imports, modules)
    problems = [f"modules import each other in a circle: {loop}"
                for c, loop in sorted(found.items(), key=lambda kv: sorted(kv[0]))
                if c not in known]
    problems += [f"{sorted(c)} is no longer a circle as listed: take it out of KNOWN_CYCLES"
                 for c in sorted(known - set(found), key=sorted)]
    return problems


GRADIO_ABSENT = """
import importlib, sys
from importlib.abc import MetaPathFinder

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("gradio", "studio"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
for name in sys.argv[1:]:
    importlib.import_module(name)
"""


def import_without_gradio(root: Path, modules: Iterable[str]) -> subprocess.CompletedProcess:
    """Import the modules in a fresh Python (from root) in which importing gradio or
    studio fails as if they were not installed."""
    return subprocess.run([sys.executable, "-c", GRADIO_ABSENT, *modules], cwd=root,
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------------------
# The project
# --------------------------------------------------------------------------------------

def test_engine_never_imports_gradio_or_studio():
    imports, _ = scan(ROOT)
    assert ui_imports_in_engine(imports) == []


def test_every_engine_module_imports_with_gradio_absent():
    engine_modules = sorted(module_files(ROOT, ["engine"]))
    assert {"engine", "engine.model", "engine.train", "engine.generate"} <= set(engine_modules)
    done = import_without_gradio(ROOT, engine_modules)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_network_and_the_math_import_only_torch_and_the_config():
    imports, modules = scan(ROOT)
    assert set(PURE) <= modules
    assert impure_imports(imports) == []


def test_no_import_circle_beyond_the_known_ones():
    imports, modules = scan(ROOT)
    assert cycle_problems(imports, modules) == []


# --------------------------------------------------------------------------------------
# Each rule catches what it is meant to
# --------------------------------------------------------------------------------------

def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_rules_catch_violations_in_a_small_tree(tmp_path):
    write_tree(tmp_path, {
        "engine/__init__.py": "",
        "engine/config.py": "import os\n",
        "engine/attention.py": "import math\ntry:\n    import flash_attn\nexcept ImportError:\n"
                               "    flash_attn = None\n",
        "engine/model.py": """\
            from __future__ import annotations
            import dataclasses
            import torch.nn.functional as F
            from engine.config import ModelConfig
            from . import attention
            from PIL import Image
            import os
            """,
        "engine/flow.py": "from engine import config\n\ndef f():\n    import numpy\n",
        "engine/sampling.py": "from engine.flow import f\nfrom engine import model\n",
        "engine/data.py": "from .buckets import plan\n",
        "engine/buckets.py": "from engine import data\n",
        "engine/report.py": "def main():\n    import studio.views\n",
        "studio/__init__.py": "",
        "studio/ui.py": "import gradio\nfrom studio import tab_train\n",
        "studio/tab_train.py": """\
            from typing import TYPE_CHECKING
            from studio import runner
            if TYPE_CHECKING:
                from studio.ui import Studio
            """,
        "studio/runner.py": "from engine import model\n\ndef start():\n"
                            "    from studio.ui import Studio\n",
    })
    imports, modules = scan(tmp_path)
    assert "engine" in modules and "studio.tab_train" in modules

    # the UI, reached lazily from engine/ (studio/ may import gradio)
    assert ui_imports_in_engine(imports) == [
        "engine.report line 2 imports studio.views (inside a function): the engine never "
        "imports the UI"]

    # the network and the math: PIL and os, a lazy numpy, and sampling reaching the model
    bad = impure_imports(imports)
    assert [p.partition(":")[0] for p in bad] == [
        "engine.flow line 4 imports numpy (inside a function)",
        "engine.model line 6 imports PIL", "engine.model line 7 imports os",
        "engine.sampling line 2 imports engine.model"]
    assert bad[1].endswith("the standard library without I/O, engine.attention")

    # circles: relative and TYPE_CHECKING imports count, the lazy runner -> ui does not
    cycles = import_cycles(imports, modules)
    assert set(cycles) == {frozenset({"engine.buckets", "engine.data"}),
                           frozenset({"studio.ui", "studio.tab_train"})}
    assert cycles[frozenset({"studio.ui", "studio.tab_train"})] == (
        "studio.tab_train (line 4) -> studio.ui (line 2) -> studio.tab_train")
    known = {frozenset({"engine.buckets", "engine.data"}), frozenset({"studio.a", "studio.b"})}
    assert cycle_problems(imports, modules, known) == [
        "modules import each other in a circle: studio.tab_train (line 4) -> studio.ui "
        "(line 2) -> studio.tab_train",
        "['studio.a', 'studio.b'] is no longer a circle as listed: take it out of "
        "KNOWN_CYCLES"]
    # a known circle that grows is a new one
    write_tree(tmp_path, {"engine/config.py": "from engine import buckets\n",
                          "engine/buckets.py": "from engine import config, data\n"})
    imports, modules = scan(tmp_path)
    assert set(import_cycles(imports, modules)) == {
        frozenset({"engine.buckets", "engine.data", "engine.config"}),
        frozenset({"studio.ui", "studio.tab_train"})}

    # the clean parts of the tree pass
    clean = [i for i in imports if i.source in ("engine.attention", "engine.config")]
    assert impure_imports(clean) == [] and ui_imports_in_engine(clean) == []


def test_a_module_that_needs_gradio_fails_to_import_without_it(tmp_path):
    write_tree(tmp_path, {
        "engine/__init__.py": "",
        "engine/plain.py": "import json\n",
        "engine/lazy.py": "def show():\n    import gradio\n",
        "engine/needs_ui.py": "import gradio\n",
    })
    assert import_without_gradio(tmp_path, ["engine.plain", "engine.lazy"]).returncode == 0
    done = import_without_gradio(tmp_path, ["engine.plain", "engine.needs_ui"])
    assert done.returncode != 0
    assert "No module named 'gradio'" in done.stderr and "engine/needs_ui.py" in done.stderr
