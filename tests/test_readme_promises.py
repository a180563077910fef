"""The README's promises name the tests that check them: every name must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test_")}


def test_every_test_the_readme_names_exists():
    """Each `file.py`: `test_…` and `file.py::test_…` in the promises table is a real test."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What ClearSkies promises"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "test_" in line]
    assert len(rows) >= 8
    checked = 0
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        for part in cell.split(";"):
            files = re.findall(r"`([\w/]+\.py)", part)
            names = re.findall(r"(?:::|`)(test_\w+)`", part)
            assert files, part
            known = _test_names(ROOT / "tests" / files[0])
            for name in names:
                assert name in known, "%s names %s, which %s does not define" % (
                    "README.md", name, files[0])
                checked += 1
    assert checked >= 20
