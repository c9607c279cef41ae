"""Every notebook has checked exercises: a stub notebook in notebooks/exercises/ whose unfilled cells store the
expected NotImplementedError, and its twin in notebooks/solutions/ whose cells pass their checks (nbval re-runs
both; this checks their shape, and that every check is used and tested)."""
import json
import re
from pathlib import Path

import pytest
from test_notebooks import NOTEBOOKS, cells, source

from moelab import exercises

ROOT = Path(__file__).resolve().parents[1]
NAMES = [p.name for p in NOTEBOOKS]
CHECKS = [name for name in exercises.__all__ if name.startswith("check_")]


def pair(name: str) -> tuple[list[dict], list[dict]]:
    return (cells(ROOT / "notebooks" / "exercises" / name), cells(ROOT / "notebooks" / "solutions" / name))


def outputs_text(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                   + "".join(o.get("traceback", [])) for o in cell["outputs"])


def test_every_notebook_and_only_they_have_exercises_and_solutions():
    for folder in ("exercises", "solutions"):
        assert sorted(p.name for p in (ROOT / "notebooks" / folder).glob("*.ipynb")) == NAMES, folder


def is_stub(cell: dict) -> bool:
    return cell["cell_type"] == "code" and "raise NotImplementedError" in source(cell)


def is_heading(cell: dict) -> bool:
    return cell["cell_type"] == "markdown" and source(cell).startswith("## ")


def without_discussions(answers: list[dict], stubs: list[dict]) -> list[dict]:
    """The solution notebook less the markdown cell, if any, that follows an answer and discusses its prediction."""
    kept: list[dict] = []
    for cell in answers:
        follows_answer = 0 < len(kept) <= len(stubs) and is_stub(stubs[len(kept) - 1])
        if follows_answer and cell["cell_type"] == "markdown" and not is_heading(cell):
            continue
        kept.append(cell)
    return kept


@pytest.mark.parametrize("name", NAMES)
def test_nothing_between_an_exercise_and_the_next_gives_its_prediction_away(name):
    stubs, _ = pair(name)
    for i, cell in enumerate(stubs):
        if is_stub(cell):
            assert i + 1 < len(stubs) and is_heading(stubs[i + 1]), (
                f"{name}: cell {i + 1} follows an exercise; only the next '## ' heading may (answers go in the "
                "solutions)")


@pytest.mark.parametrize("name", NAMES)
def test_exercises_and_solutions_are_twins_that_differ_only_in_the_answers(name):
    stubs, answers = pair(name)
    answers = without_discussions(answers, stubs)
    assert [c["cell_type"] for c in stubs] == [c["cell_type"] for c in answers]
    assert source(stubs[0]).startswith(f"# {name[:2]} · Exercises: ")
    assert source(answers[0]).startswith(f"# {name[:2]} · Solutions: ")
    assert f"../solutions/{name}" in source(stubs[0]) and f"../exercises/{name}" in source(answers[0])
    for stub, answer in zip(stubs[1:], answers[1:]):
        if not is_stub(stub):
            assert source(stub) == source(answer)
    for nb in (stubs, answers):
        code = [c for c in nb if c["cell_type"] == "code"]
        assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "run `make execute`"


@pytest.mark.parametrize("name", NAMES)
def test_stubs_store_their_not_implemented_error_and_solutions_pass(name):
    stubs, answers = pair(name)
    answers = without_discussions(answers, stubs)
    checked = 0
    for stub, answer in zip(stubs, answers):
        if stub["cell_type"] != "code" or "raise NotImplementedError" not in source(stub):
            assert not any(o["output_type"] == "error" for o in stub.get("outputs", []))
            continue
        checked += 1
        calls = re.findall(r"exercises\.(check_\w+)\(", source(stub))
        assert len(calls) == 1 and calls[0] in CHECKS, source(stub)[:80]
        assert "raises-exception" in stub["metadata"].get("tags", [])
        errors = [o for o in stub["outputs"] if o["output_type"] == "error"]
        assert [e["ename"] for e in errors] == ["NotImplementedError"]
        assert errors[0]["evalue"].startswith(f"exercise {name[:2]}.")
        assert "raises-exception" not in answer["metadata"].get("tags", [])
        assert "raise NotImplementedError" not in source(answer)
        assert outputs_text(answer).startswith(f"✓ {calls[0]}: agrees with ")
    assert 2 <= checked <= 4, f"{checked} checked exercises"


@pytest.mark.parametrize("name", NAMES)
def test_stored_exercise_outputs_hold_no_paths_or_warnings(name):
    for nb in pair(name):
        for cell in nb:
            for out in cell.get("outputs", []):
                assert out.get("name") != "stderr", outputs_text(cell)[:120]
                text = outputs_text(cell)        # tracebacks included: they show the learner's cell only
                assert not re.search(r"(/work/|/root/|/home/|/tmp/|site-packages)", text), text[:120]


@pytest.mark.parametrize("name", NAMES)
def test_the_main_notebook_sends_its_learner_to_the_checked_exercises(name):
    nb = json.loads((ROOT / "notebooks" / name).read_text(encoding="utf-8"))
    section = next(source(c) for c in nb["cells"] if "## Exercises" in source(c))
    assert f"(exercises/{name})" in section and f"(solutions/{name})" in section


def test_every_check_is_used_in_a_notebook_and_tested():
    used = "".join(source(c) for name in NAMES for c in pair(name)[0])
    tests = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_exercises_*.py"))
    assert len(set(CHECKS)) == len(CHECKS), "two modules define the same check"
    for check in CHECKS:
        assert f"exercises.{check}(" in used, f"{check} is in no exercise notebook"
        assert f"exercises.{check}(" in tests, f"{check} has no test"
