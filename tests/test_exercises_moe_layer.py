"""The checks of notebook 02's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import math

import pytest
import torch
from solutions import load

from moelab import exercises

NS = load("02_moe_layer.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_softmax_router(NS["softmax_router"])
    assert exercises.check_capacity_mask(NS["capacity_mask"])
    assert exercises.check_sigmoid_router(NS["sigmoid_router"])


def test_a_router_that_always_renormalises_fails_with_a_hint():
    def wrong(logits, top_k, norm_topk_prob):
        weights, indices = logits.softmax(-1).topk(top_k, -1)
        return weights / weights.sum(-1, keepdim=True), indices

    verdict = exercises.check_softmax_router(wrong)
    assert repr(verdict).startswith("✗ check_softmax_router: on input 1 of 10 (logits=tensor(6, 8) float32, top_k=2, "
                                    "norm_topk_prob=False) the result[0][0, 0] is 0.729798, expected 0.67905")
    assert "only when norm_topk_prob is True" in repr(verdict)


def test_a_softmax_over_tokens_fails_with_a_hint():
    def wrong(logits, top_k, norm_topk_prob):
        weights, indices = logits.softmax(0).topk(top_k, -1)
        return (weights / weights.sum(-1, keepdim=True) if norm_topk_prob else weights), indices

    assert "not over tokens" in repr(exercises.check_softmax_router(wrong))


def test_capacity_filled_token_by_token_fails_with_a_hint():
    def wrong(indices, n_experts, capacity_factor):
        T, k = indices.shape
        capacity, used = math.ceil(capacity_factor * T * k / n_experts), [0] * n_experts
        kept = torch.zeros(T, k, dtype=torch.bool)
        for t in range(T):
            for j in range(k):
                e = int(indices[t, j])
                kept[t, j], used[e] = used[e] < capacity, used[e] + (used[e] < capacity)
        return kept

    verdict = exercises.check_capacity_mask(wrong)
    assert repr(verdict) == ("✗ check_capacity_mask: on input 1 of 8 (indices=tensor(12, 2) int64, n_experts=4, "
                             "capacity_factor=1) the result[10, 1] is True, expected False (2 of 24 entries differ). "
                             "Hint: fill each expert with all first choices before any second choice (choice-major "
                             "order), not token by token.")


def test_capacity_without_k_fails_with_a_hint():
    def wrong(indices, n_experts, capacity_factor):
        T, k = indices.shape
        return NS["capacity_mask"](indices, n_experts, capacity_factor / k)

    assert "capacity = ceil(capacity_factor · T · k / E)" in repr(exercises.check_capacity_mask(wrong))


def test_a_float_mask_is_named():
    def wrong(indices, n_experts, capacity_factor):
        return NS["capacity_mask"](indices, n_experts, capacity_factor).float()

    assert "should hold bool values, got torch.float32" in repr(exercises.check_capacity_mask(wrong))


def test_gates_from_the_biased_scores_fail_with_a_hint():
    def wrong(logits, bias, top_k, routed_scaling_factor):
        gates, indices = (logits.sigmoid() + bias).topk(top_k, -1)
        return routed_scaling_factor * gates / gates.sum(-1, keepdim=True), indices

    verdict = exercises.check_sigmoid_router(wrong)
    assert repr(verdict).startswith("✗ check_sigmoid_router: on input 1 of 9 (logits=tensor(6, 16) float32, "
                                    "bias=tensor(16,) float32, top_k=2, routed_scaling_factor=2.5) the result[0]")
    assert "the gates come from the unbiased σ(logits)" in repr(verdict)


def test_a_selection_that_ignores_the_bias_fails_with_a_hint():
    def wrong(logits, bias, top_k, routed_scaling_factor):
        return NS["sigmoid_router"](logits, torch.zeros_like(bias), top_k, routed_scaling_factor)

    assert "choose the experts by σ(logits) + bias" in repr(exercises.check_sigmoid_router(wrong))


def test_an_unfilled_stub_raises_not_implemented():
    def stub(logits, top_k, norm_topk_prob):
        raise NotImplementedError("exercise 02.1: write softmax_router")

    with pytest.raises(NotImplementedError, match="exercise 02.1"):
        exercises.check_softmax_router(stub)
