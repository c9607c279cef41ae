"""The checks of notebook 11's exercises: the published solutions pass, plausible wrong answers fail with a hint."""
import math

import pytest
import torch
from solutions import load

from moelab import exercises
from moelab.exercises.fragmented import _no_gather
from moelab.uneven import split_by_speed, straggler_slowdown

NS = load("11_fragmented_clusters.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_shares_by_speed(NS["shares_by_speed"])
    assert exercises.check_ddp_slowdown(NS["ddp_slowdown"])


def test_the_predictions_are_what_the_library_says():
    assert split_by_speed(100, [3, 2, 2, 1]) == [38, 25, 25, 12]
    assert (round(straggler_slowdown(0.1, 4.0, 4), 2), round(straggler_slowdown(0.1, 4.0, 8), 2)) == (2.03, 2.71)


def test_rounding_down_only_fails_with_a_hint():
    def floors(total, speeds):
        return [math.floor(total * s / sum(speeds)) for s in speeds]

    verdict = exercises.check_shares_by_speed(floors)
    assert not verdict and "Hint: rounding every share down leaves sequences over" in repr(verdict)


def test_one_slow_rank_fails_with_a_hint():
    def one_rank(probability, factor, ranks):
        return 1 + (factor - 1) * probability

    verdict = exercises.check_ddp_slowdown(one_rank)
    assert not verdict and "Hint: the step waits for the slowest of all the ranks" in repr(verdict)


@pytest.mark.slow
def test_zero1_rank_code_passes_and_a_missing_all_gather_is_named():
    assert exercises.check_zero1_step(NS["zero1_step"])
    verdict = exercises.check_zero1_step(_no_gather)            # each rank steps its own shard and stops there
    assert not verdict and "Hint: each rank stepped only its own shard: all-gather" in repr(verdict)


def test_an_unfilled_stub_reaches_the_learner():
    def stub(total, speeds):
        raise NotImplementedError("exercise 11.1: write shares_by_speed")

    with pytest.raises(NotImplementedError, match="exercise 11.1"):
        exercises.check_shares_by_speed(stub)
    assert torch.get_num_threads() >= 1
