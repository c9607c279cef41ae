"""The checks of notebook 14's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import math

import pytest
import torch
from solutions import load

from moelab import exercises
from moelab.exercises.ranks import send_to

NS = load("14_capstone.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_copies_across(NS["copies_across"])
    assert exercises.check_row_bytes(NS["row_bytes"])


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


@pytest.mark.slow
def test_the_published_rank_code_passes():
    assert exercises.check_first_hop(NS["first_hop"])


def to_local_index_zero(x, indices, per_node, experts_per_node):
    """Every copy to the first rank of its node."""
    T, k = indices.shape
    token = torch.arange(T).repeat_interleave(k)
    pair = torch.unique(indices.flatten() // experts_per_node * T + token)
    token, peer = pair % T, pair // T * per_node
    return send_to(x[token], peer)


def per_choice(x, indices, per_node, experts_per_node):
    """The flat dispatch: one row per choice, to the expert's rank."""
    token = torch.arange(len(indices)).repeat_interleave(indices.shape[1])
    expert = indices.flatten()
    order = expert.argsort(stable=True)
    peer = expert[order] // (experts_per_node // per_node)
    return send_to(x[token[order]], peer)


@pytest.mark.slow
def test_a_first_hop_to_the_wrong_peer_or_per_choice_fails_naming_the_input_and_rank():
    verdict = repr(exercises.check_first_hop(to_local_index_zero))
    assert verdict.startswith("✗ check_first_hop: on input 2 of 5 (2 ranks, 2 per node, top-3 of 4 experts per node, "
                              "4 tokens) rank ")
    assert verdict.endswith("Hint: send each copy to the rank with your own local index on its node (rank % "
                            "per_node), so that every rank has one peer per node.")
    verdict = repr(exercises.check_first_hop(per_choice))
    assert verdict.startswith("✗ check_first_hop: on input 1 of 5 (2 ranks, 1 per node, top-2 of 4 experts per node, "
                              "6 tokens) rank ")
    assert verdict.endswith("Hint: one copy per (token, node), not one row per chosen expert: that is the flat "
                            "dispatch.")


def test_an_unfilled_stub_raises_to_the_learner():
    def stub(d, wire):
        raise NotImplementedError("exercise 13.2: write row_bytes")

    with pytest.raises(NotImplementedError, match="exercise 13.2"):
        exercises.check_row_bytes(stub)


def test_a_solution_that_crashes_is_a_verdict_not_a_crash():
    verdict = exercises.check_copies_across(lambda indices, experts_per_node, node: indices[indices.shape[0]])
    assert not verdict
    assert "on input 1 of 7 (indices=tensor(6, 2) int64, experts_per_node=4, node=0) your function raised " \
           "IndexError" in repr(verdict)
