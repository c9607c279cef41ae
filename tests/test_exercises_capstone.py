"""The checks of notebook 10's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import math

import pytest
from solutions import load

from moelab import exercises

NS = load("10_capstone.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_copies_across(NS["copies_across"])
    assert exercises.check_row_bytes(NS["row_bytes"])
    assert exercises.check_ring_bytes_across(NS["ring_bytes_across"])


def test_counting_choices_instead_of_copies_fails_on_the_notebook_example():
    verdict = exercises.check_copies_across(lambda indices, experts_per_node, node:
                                            int((indices // experts_per_node != node).sum()))
    assert repr(verdict).startswith("✗ check_copies_across: on input 1 of 7 (indices=tensor(6, 2) int64, "
                                    "experts_per_node=4, node=0) the result is 6, expected 4.")
    assert "once per node" in repr(verdict)


def test_counting_tokens_instead_of_copies_fails_where_a_token_needs_two_other_nodes():
    verdict = exercises.check_copies_across(lambda indices, experts_per_node, node:
                                            int((indices // experts_per_node != node).any(1).sum()))
    assert "✗ check_copies_across: on input 4 of 7" in repr(verdict) and "copied to each of them" in repr(verdict)


def test_fp8_rows_without_scales_or_entirely_in_fp8_fail_with_their_hints():
    no_scales = exercises.check_row_bytes(lambda d, wire: 16 * d if wire == "fp32" else 7 * d)
    assert repr(no_scales).startswith("✗ check_row_bytes: on input 2 of 20 (d=64, wire='fp8') the result is 448, "
                                      "expected 452.")
    assert "one fp32 scale" in repr(no_scales)
    all_fp8 = exercises.check_row_bytes(lambda d, wire: 16 * d if wire == "fp32" else 4 * (d + 4 * math.ceil(d / 128)))
    assert "only the forward dispatch is FP8" in repr(all_fp8)


def test_ring_bytes_counting_every_rank_or_one_phase_fail_with_their_hints():
    def every_rank(n, nodes, per_node):
        p = nodes * per_node
        return p * 2 * (p - 1) * 4 * n // p if n % p == 0 else 0

    assert "only the ranks whose right neighbour" in repr(exercises.check_ring_bytes_across(every_rank))
    half = exercises.check_ring_bytes_across(
        lambda n, nodes, per_node: NS["ring_bytes_across"](n, nodes, per_node) // 2)
    assert repr(half).startswith("✗ check_ring_bytes_across: on input 1 of 10 (n=1000, nodes=2, per_node=2) the "
                                 "result is 6,000, expected 12,000.")
    assert "2(p−1) rounds" in repr(half)


def test_an_unfilled_stub_raises_to_the_learner():
    def stub(d, wire):
        raise NotImplementedError("exercise 10.2: write row_bytes")

    with pytest.raises(NotImplementedError, match="exercise 10.2"):
        exercises.check_row_bytes(stub)


def test_a_solution_that_crashes_is_a_verdict_not_a_crash():
    verdict = exercises.check_copies_across(lambda indices, experts_per_node, node: indices[indices.shape[0]])
    assert not verdict
    assert "on input 1 of 7 (indices=tensor(6, 2) int64, experts_per_node=4, node=0) your function raised " \
           "IndexError" in repr(verdict)
