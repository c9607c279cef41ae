"""The machinery of the exercise checks: how a difference is put into words, and what reaches the learner."""
import pytest
import torch

from moelab import exercises
from moelab.exercises.core import LIBRARY, case, difference, learner_facing, run_check


def test_differences_name_the_first_differing_entry_and_how_many_differ():
    assert difference(torch.ones(2, 3), torch.ones(2, 3)) is None
    got = torch.ones(2, 3)
    got[1, 2] = 5
    assert difference(torch.ones(2, 3), got) == "the result[1, 2] is 5, expected 1 (1 of 6 entries differ)"
    assert difference(torch.ones(2, 3), torch.ones(3, 2)) == "the result has shape (3, 2), expected (2, 3)"
    assert difference(torch.arange(3), torch.arange(3.0)) == "the result should hold int64 values, got torch.float32"
    assert difference((1, 2.0), (1, 2.5)) == "the result[1] is 2.5, expected 2"
    assert difference({"a": 1}, {"b": 1}) == "the result should be a dict with keys ['a'], got ['b']"
    assert difference(3, 3.000001) is None and difference(3, 3.5) == "the result is 3.5, expected 3"


def test_a_check_names_the_input_where_the_answers_part_and_gives_the_matching_hint():
    cases = [case(x=torch.tensor([1.0, 2.0])), case(x=torch.tensor([-1.0, 3.0]))]
    verdict = run_check("check_abs", lambda x: x, torch.abs, cases, "torch.abs",
                        hints=[(lambda x: x, "negative values need their sign flipped.")])
    assert not verdict
    assert repr(verdict) == ("✗ check_abs: on input 2 of 2 (x=tensor(2,) float32) the result[0] is -1, expected 1 "
                             "(1 of 2 entries differ). Hint: negative values need their sign flipped.")
    assert run_check("check_abs", torch.abs, torch.abs, cases, "torch.abs")
    with pytest.raises(TypeError, match="fn = 3 is not allowed; allowed: the function you wrote"):
        run_check("check_abs", 3, torch.abs, cases, "torch.abs")


def test_a_stub_reaches_the_learner_with_only_their_own_frames():
    def stub(x):
        raise NotImplementedError("exercise 99.1: write stub")

    check = learner_facing(lambda fn: run_check("check_abs", fn, torch.abs, [case(x=torch.ones(1))], "torch.abs"))
    with pytest.raises(NotImplementedError, match="exercise 99.1") as info:
        check(stub)
    ours = [entry for entry in info.traceback if str(entry.path).startswith(LIBRARY[0])]   # moelab's own files
    assert [entry.name for entry in ours] == ["wrapper"]             # run_check's frames are gone,
    assert ours[0].frame.f_locals["__tracebackhide__"]                 # and IPython hides this one


def test_the_notebooks_call_learner_facing_checks():
    assert exercises.check_row_bytes.__wrapped__ is not None
    assert exercises.check_row_bytes.__doc__.startswith("Exercise 13.2")


def test_a_hint_matches_whether_the_wrong_answer_is_a_tensor_or_a_number():
    cases = [case(x=torch.tensor(3.0))]
    as_number = run_check("check_square", lambda x: x * 2, lambda x: x * x, cases, "x²",
                          hints=[(lambda x: 2 * float(x), "square, not double.")])
    assert "Hint: square, not double." in repr(as_number)
    as_tensor = run_check("check_square", lambda x: 2 * float(x), lambda x: float(x * x), cases, "x²",
                          hints=[(lambda x: x * 2, "square, not double.")])
    assert "Hint: square, not double." in repr(as_tensor)


def test_a_decorated_stub_shows_no_library_frame_either():
    @torch.no_grad()
    def stub(x):
        raise NotImplementedError("exercise 99.2: write stub")

    check = learner_facing(lambda fn: run_check("check_abs", fn, torch.abs, [case(x=torch.ones(1))], "torch.abs"))
    with pytest.raises(NotImplementedError) as info:
        check(stub)
    assert not [entry for entry in info.traceback if "torch" in str(entry.path)]
