"""The checks of notebook 04's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import pytest
import torch
from solutions import load

from moelab import exercises

NS = load("04_moe_vs_dense.ipynb")
FIRST = "on input 1 of 10 (config=vocab 120, block 128, 4 layers, d_model 64, heads 4/2, 31 experts of 32 top-7 "


def test_the_published_solutions_pass():
    assert exercises.check_parameter_counts(NS["count_parameters"])
    assert exercises.check_training_flops(NS["training_flops"])
    assert exercises.check_domain_information(NS["domain_information"])


def test_shared_experts_left_out_of_active_fails_with_a_hint():
    def no_shared(config):
        counts = NS["count_parameters"](config)
        moe_layers = config.n_layer - config.first_k_dense if config.n_routed_experts else 0
        shared = moe_layers * config.n_shared_experts * 3 * config.d_model * config.d_expert
        return {"total": counts["total"], "active": counts["active"] - shared}

    verdict = exercises.check_parameter_counts(no_shared)
    assert repr(verdict).startswith("✗ check_parameter_counts: " + FIRST)
    assert ("the result['active'] is 245,056, expected 269,632. Hint: a shared expert runs for every token"
            in repr(verdict))


def test_router_forgotten_fails_with_a_hint():
    def no_router(config):
        counts = NS["count_parameters"](config)
        moe_layers = config.n_layer - config.first_k_dense if config.n_routed_experts else 0
        return {side: n - moe_layers * config.n_routed_experts * config.d_model for side, n in counts.items()}

    verdict = exercises.check_parameter_counts(no_router)
    assert "the result['total'] is 851,520, expected 859,456" in repr(verdict)
    assert "router holds n_routed_experts × d_model weights" in repr(verdict)


def test_forward_only_flops_fail_with_a_hint():
    verdict = exercises.check_training_flops(lambda config: NS["training_flops"](config) // 3)
    assert repr(verdict).startswith("✗ check_training_flops: " + FIRST)
    assert "the result is 589,440, expected 1,768,320. Hint: count the backward pass too" in repr(verdict)


def test_flops_with_the_embedding_fail_with_a_hint():
    def with_embedding(config):
        return 6 * NS["count_parameters"](config)["active"] + 6 * config.n_layer * config.block_size * config.d_model

    assert "Hint: the input embedding is a table lookup" in repr(exercises.check_training_flops(with_embedding))


def test_information_in_nats_fails_with_a_hint():
    def nats(fractions):
        joint = fractions / fractions.shape[1]
        terms = joint * torch.log(joint / (joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)))
        return torch.where(joint > 0, terms, 0.0).sum((1, 2))

    verdict = exercises.check_domain_information(nats)
    assert repr(verdict).startswith("✗ check_domain_information: on input 1 of 8 (fractions=tensor(4, 5, 31) "
                                    "float64) the result[0] is 0.310423, expected 0.447846")
    assert "Hint: the information is in bits: use log2." in repr(verdict)


def test_information_without_the_equal_domain_weights_fails_with_a_hint():
    def unweighted(fractions):
        terms = fractions * torch.log2(fractions / (fractions.sum(2, keepdim=True) * fractions.sum(1, keepdim=True)))
        return torch.where(fractions > 0, terms, 0.0).sum((1, 2))

    assert "Hint: p(domain, expert) is fractions / domains" in repr(exercises.check_domain_information(unweighted))


def test_zero_times_log_zero_names_the_input_with_unused_experts():
    def nan_on_zeros(fractions):
        joint = fractions / fractions.shape[1]
        return (joint * torch.log2(joint / (joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)))).sum((1, 2))

    verdict = exercises.check_domain_information(nan_on_zeros)
    assert repr(verdict).startswith("✗ check_domain_information: on input 6 of 8 (fractions=tensor(2, 4, 12) "
                                    "float64) the result[0] is nan, expected")


def test_an_unfilled_stub_raises_not_implemented():
    def stub(config):
        raise NotImplementedError("exercise 04.1: write count_parameters")

    with pytest.raises(NotImplementedError, match="exercise 04.1"):
        exercises.check_parameter_counts(stub)
