"""The checks of notebook 05's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import pytest
import torch
from solutions import load

from moelab import exercises
from moelab.exercises.ranks import exchange

NS = load("05_expert_parallelism.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_dispatch_plan(NS["dispatch_plan"])
    assert exercises.check_expert_rows(NS["expert_rows"])
    assert exercises.check_payload_bytes(NS["payload_bytes"])


@pytest.mark.slow
def test_the_published_rank_code_passes():
    assert exercises.check_all_to_all_backward(NS["all_to_all_backward"])


def no_reverse_exchange(grad, send_splits, recv_splits):
    return grad


def forward_splits(grad, send_splits, recv_splits):
    return exchange(grad, send_splits, recv_splits)


@pytest.mark.slow
def test_a_backward_without_the_reverse_exchange_or_with_the_forward_splits_fails_naming_the_input_and_rank():
    verdict = repr(exercises.check_all_to_all_backward(no_reverse_exchange))
    assert verdict == ("✗ check_all_to_all_backward: on input 1 of 6 (2 ranks, splits random, rows of 3) rank 0: the "
                       "result has shape (1, 3), expected (4, 3). Hint: the gradient of a received row belongs on the "
                       "rank that sent the row: send the gradients back, one all-to-all the reverse way.")
    verdict = repr(exercises.check_all_to_all_backward(forward_splits))
    assert verdict.startswith("✗ check_all_to_all_backward: on input 1 of 6 (2 ranks, splits random, rows of 3) rank ")
    assert "your function raised RuntimeError: Split sizes doesn't match" in verdict


def test_the_toy_with_every_token_of_rank_1_on_expert_0():
    tokens, splits = NS["dispatch_plan"](torch.zeros(4, 1, dtype=torch.long), 4, 2)
    assert (tokens.tolist(), splits) == ([0, 1, 2, 3], [4, 0])


def test_rows_sorted_by_rank_only_fail_with_a_hint():
    def by_rank(indices, n_experts, world):
        token = torch.arange(indices.shape[0]).repeat_interleave(indices.shape[1])
        rank = indices.flatten() // (n_experts // world)
        return token[rank.argsort(stable=True)], torch.bincount(rank, minlength=world).tolist()

    verdict = exercises.check_dispatch_plan(by_rank)
    assert repr(verdict).startswith("✗ check_dispatch_plan: on input 1 of 10 (indices=tensor(4, 1) int64, "
                                    "n_experts=4, world=2) the result[0][0] is 1, expected 3")
    assert "Hint: sort by expert, not only by rank" in repr(verdict)


def test_experts_dealt_round_robin_fail_with_a_hint():
    def round_robin(indices, n_experts, world):
        tokens, _ = NS["dispatch_plan"](indices, n_experts, world)
        return tokens, torch.bincount(indices.flatten() % world, minlength=world).tolist()

    verdict = exercises.check_dispatch_plan(round_robin)
    assert repr(verdict).startswith("✗ check_dispatch_plan: on input 2 of 10 (indices=tensor(12, 2) int64, "
                                    "n_experts=4, world=2) the result[1][0] is 15, expected 12.")
    assert "expert e is on rank e // (n_experts / world), not e % world" in repr(verdict)


def test_counting_tokens_instead_of_rows_fails_with_a_hint():
    def tokens_per_rank(indices, n_experts):
        world = indices.shape[0]
        owner = indices // (n_experts // world)
        return [int((owner == r).any(-1).sum()) for r in range(world)]

    verdict = exercises.check_expert_rows(tokens_per_rank)
    assert repr(verdict).startswith("✗ check_expert_rows: on input 2 of 10 (indices=tensor(2, 12, 2) int64, "
                                    "n_experts=4) the result[0] is 22, expected 28.")
    assert "Hint: count rows, not tokens" in repr(verdict)


def test_fp8_rows_without_scales_fail_with_a_hint():
    def no_scales(tokens, top_k, d_model, dispatch, combine):
        size = {"fp32": 4, "bf16": 2, "fp8": 1}
        return {"dispatch": tokens * top_k * d_model * size[dispatch],
                "combine": tokens * top_k * d_model * size[combine]}

    verdict = exercises.check_payload_bytes(no_scales)
    assert repr(verdict) == ("✗ check_payload_bytes: on input 3 of 12 (tokens=4096, top_k=8, d_model=7168, "
                             "dispatch='fp8', combine='bf16') the result['dispatch'] is 234,881,024, expected "
                             "242,221,056. Hint: an fp8 row also carries its scales: 4 bytes per 128 values.")


def test_one_row_per_token_fails_with_a_hint():
    verdict = exercises.check_payload_bytes(
        lambda tokens, top_k, d_model, dispatch, combine: NS["payload_bytes"](tokens, 1, d_model, dispatch, combine))
    assert "Hint: every token sends top_k rows, one per chosen expert." in repr(verdict)


def test_an_unfilled_stub_raises_not_implemented():
    def stub(indices, n_experts, world):
        raise NotImplementedError("exercise 05.1: write dispatch_plan")

    with pytest.raises(NotImplementedError, match="exercise 05.1"):
        exercises.check_dispatch_plan(stub)
