"""The package's shape: layers, cycles and sizes that keep it easy to change.

The layer contracts themselves live in ``setup.cfg`` (import-linter); these
tests run them inside the suite, and add two checks import-linter does not
make: no import cycle between any two modules (``TYPE_CHECKING`` imports
included), and no class so long that it holds more than one job.
"""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clearskies"

#: The longest class allowed, in source lines (docstring and blank lines
#: included).  A class past it does several jobs; split it.
MAX_CLASS_LINES = 420


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("clearskies", include_external_packages=False)


def _strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's algorithm over the module graph: the groups of mutual importers."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    counter = [0]

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                groups.append(group)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_no_module_imports_another_that_imports_it_back() -> None:
    """No import cycle anywhere in the package, TYPE_CHECKING imports included."""
    cycles = [sorted(group) for group in _strongly_connected(_graph()) if len(group) > 1]
    assert cycles == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cycle check fails on a package where two modules import each other."""
    package = tmp_path / "cyclic_example"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic_example import b\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyclic_example import a\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclic_example", include_external_packages=False)
    groups = [g for g in _strongly_connected(graph) if len(g) > 1]
    assert groups == [{"cyclic_example.a", "cyclic_example.b"}]


def test_no_class_is_longer_than_the_limit() -> None:
    """Every class in the package fits in MAX_CLASS_LINES source lines."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines})")
    assert too_long == []


def _lint(config: Path, cwd: Path = ROOT) -> int:
    """Run import-linter on ``config`` in a fresh interpreter; its exit code.

    (In a fresh process: in-process, modules other tests imported or patched
    leak into its graph.)"""
    run = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--no-cache", str(config)],
        cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)])})
    print(run.stdout, run.stderr)
    return run.returncode


def test_layer_contracts_hold() -> None:
    """import-linter's contracts in setup.cfg hold: no layer imports one above it."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    contracts = [s for s in config.sections() if s.startswith("importlinter:contract:")]
    assert len(contracts) >= 3
    assert _lint(ROOT / "setup.cfg") == 0


def test_an_upward_import_breaks_the_layer_contract(tmp_path: Path) -> None:
    """The layers contract fails when a lower layer imports a higher one."""
    package = tmp_path / "layered_example"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "high.py").write_text("from layered_example import low\n")
    (package / "low.py").write_text("def f():\n    from layered_example import high\n")
    config = tmp_path / "contracts.ini"
    config.write_text(
        "[importlinter]\nroot_package = layered_example\n\n"
        "[importlinter:contract:layers]\nname = layers\ntype = layers\n"
        "layers =\n    layered_example.high\n    layered_example.low\n")
    assert _lint(config, cwd=tmp_path) == 1
    (package / "low.py").write_text("")
    assert _lint(config, cwd=tmp_path) == 0


def test_every_module_has_a_layer() -> None:
    """Each module of the package falls in one of the contract's layers, so a new
    module cannot slip past the layer check."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    layers = config["importlinter:contract:layers"]["layers"]
    names = {part.strip() for line in layers.splitlines()
             for part in line.replace(":", "|").split("|") if part.strip()}
    outside = [module for module in sorted(_graph().modules)
               if module != "clearskies"
               and not any(module == n or module.startswith(n + ".") for n in names)]
    assert outside == []


def test_the_readme_layout_names_every_module() -> None:
    """Every module of the package is named in the README's Layout section, so a
    newcomer finds each file from there."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.find("\n## ", 1)]
    unnamed = [str(path.relative_to(ROOT)) for path in sorted(PACKAGE.rglob("*.py"))
               if path.name != "__init__.py" and "`%s`" % path.name not in layout
               and "`clearskies/%s`" % path.relative_to(PACKAGE) not in layout]
    assert unnamed == []
