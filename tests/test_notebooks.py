"""The stored notebooks follow the output policy in notebooks/README.md (nbval then checks their outputs)."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
OPENING = ("What you will build", "Why it matters at trillion scale", "Prerequisites", "Time to run")


def cells(path: Path, kind: str | None = None) -> list[dict]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if kind is None or c["cell_type"] == kind]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_the_course_has_its_first_notebooks():
    assert [p.name for p in NOTEBOOKS][:2] == ["00_orientation.ipynb", "01_dense_baseline.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_and_closes_as_the_guide_says(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "moelab"
    first = source(nb["cells"][0])
    assert nb["cells"][0]["cell_type"] == "markdown" and first.startswith(f"# {path.name[:2]} · ")
    for heading in OPENING:
        assert f"**{heading}" in first, f"the opening cell lacks '{heading}'"
    markdown = "\n".join(source(c) for c in cells(path, "markdown"))
    assert "## Summary" in markdown and "## Exercises" in markdown


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_was_executed_top_to_bottom_without_errors(path):
    code = [c for c in cells(path, "code") if source(c).strip()]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "run `make execute`"
    for cell in code:
        expects_error = "raises-exception" in cell["metadata"].get("tags", [])
        for out in cell["outputs"]:
            assert expects_error or out["output_type"] != "error", f"{out.get('ename')}: {out.get('evalue')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_hold_no_progress_bars_paths_or_warnings(path):
    for cell in cells(path, "code"):
        for out in cell["outputs"]:
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            assert not re.search(r"\d+it/s|it/s\]|\|\s*\d+/\d+ \[", text), f"a progress bar: {text[:80]!r}"
            assert not re.search(r"(/work/|/root/|/home/|/tmp/|[A-Z]:\\\\)", text), f"a machine path: {text[:80]!r}"
            assert out.get("name") != "stderr", f"stderr output (a warning?): {text[:120]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_ignored_output_is_followed_by_a_checked_cell(path):
    code = cells(path, "code")
    for i, cell in enumerate(code):
        if "NBVAL_IGNORE_OUTPUT" in source(cell):
            assert i + 1 < len(code) and "NBVAL_IGNORE_OUTPUT" not in source(code[i + 1]), source(cell)[:80]

