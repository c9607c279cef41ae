"""Library docstrings say what the code does and why, not how it came to be: no issue numbers, no bug reports.

Every module, class and function docstring under src/moelab is read with ``ast`` (nothing is imported) and
searched for a few phrases that only a change history uses. The list is short and specific on purpose, so that
it cannot match legitimate technical text; tests and benchmarks are not checked.
"""
import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moelab"
MODULES = sorted(SRC.rglob("*.py"))
HISTORY = [re.compile(p, re.IGNORECASE) for p in (
    r"\bissues?\s*#?\d+",        # "issue 12", "issue #12"
    r"#\d{2,}\b",                # "#123": an issue or pull-request number
    r"\bfound by\b",             # "found by test_x", "found by ui-tests"
    r"\bui-tests?\b",
    r"\bsliders?\b",             # a UI widget as the reason for library behaviour
)]


def docstrings(path: Path):
    """``(qualified name, docstring)`` of the module and of every class and function in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    yield "<module>", ast.get_docstring(tree, clean=False)

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, ast.get_docstring(child, clean=False)
                yield from walk(child, f"{name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def test_the_walk_sees_every_library_module():
    assert SRC.is_dir() and len(MODULES) > 30
    names = {name for name, _ in docstrings(SRC / "moe.py")}
    assert {"<module>", "MoE", "MoE.after_step", "ffn_for_layer"} <= names  # methods named by their class


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_docstrings_hold_no_history(path):
    found = [f"{path.relative_to(SRC.parent)}: {name}: {match.group(0)!r}"
             for name, doc in docstrings(path) if doc
             for pattern in HISTORY for match in [pattern.search(doc)] if match]
    assert not found, "docstrings state the rule and its reason, not its history:\n" + "\n".join(found)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_docstring_opens_with_a_summary_line(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
    assert doc and doc.splitlines()[0].strip(), f"{path.relative_to(SRC.parent)}: the module docstring's first " \
                                                "line must be its one-sentence summary"
