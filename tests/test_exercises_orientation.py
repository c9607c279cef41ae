"""The checks of notebook 00's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import math

import pytest
from solutions import load

from moelab import exercises, presets

NS = load("00_orientation.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_moe_params(NS["moe_params"])
    assert exercises.check_devices_for_weights(NS["devices_for_weights"])
    assert exercises.check_inter_node_bytes(NS["inter_node_bytes"])


def test_moe_params_without_the_shared_experts_in_active_fails_with_a_hint():
    def wrong(d_model, d_expert, n_routed, n_shared, top_k, n_moe_layers):
        total, _ = NS["moe_params"](d_model, d_expert, n_routed, n_shared, top_k, n_moe_layers)
        return total, n_moe_layers * (top_k * 3 * d_model * d_expert + n_routed * d_model)

    verdict = exercises.check_moe_params(wrong)
    assert not verdict
    assert repr(verdict).startswith("✗ check_moe_params: on input 1 of 8 (d_model=7168, d_expert=2048, n_routed=384")
    assert "the result[1] is 42,443,735,040, expected 45,086,146,560" in repr(verdict)
    assert "shared experts" in repr(verdict)


def test_moe_params_with_two_matrix_experts_fails_with_a_hint():
    def wrong(d_model, d_expert, n_routed, n_shared, top_k, n_moe_layers):
        expert, router = 2 * d_model * d_expert, n_routed * d_model
        return (n_moe_layers * ((n_routed + n_shared) * expert + router),
                n_moe_layers * ((top_k + n_shared) * expert + router))

    verdict = exercises.check_moe_params(wrong)
    assert "✗ check_moe_params: on input 1 of 8" in repr(verdict) and "the result[0] is" in repr(verdict)
    assert "three matrices" in repr(verdict)


def test_devices_rounded_down_or_in_gib_fail_with_their_hints():
    def floor(config, dtype, device_gb):
        return (presets.analytic_counts(config)["total"] * {"fp32": 4, "bf16": 2, "fp8": 1}[dtype]
                // int(device_gb * 1e9))

    def gib(config, dtype, device_gb):
        nbytes = presets.analytic_counts(config)["total"] * {"fp32": 4, "bf16": 2, "fp8": 1}[dtype]
        return math.ceil(nbytes / (device_gb * 2**30))

    verdict = exercises.check_devices_for_weights(floor)
    assert repr(verdict).startswith("✗ check_devices_for_weights: on input 1 of 8 (config=Kimi K2, dtype='bf16', "
                                    "device_gb=24) the result is 85, expected 86.")
    assert "round up" in repr(verdict)
    assert "not 2³⁰" in repr(exercises.check_devices_for_weights(gib))


def test_fp8_rows_without_their_scales_fail_with_a_hint():
    def wrong(d_model, top_k, node_limit, dispatch, combine):
        width = {"fp32": 4, "bf16": 2, "fp8": 1}
        return min(top_k, node_limit) * d_model * (width[dispatch] + width[combine])

    verdict = exercises.check_inter_node_bytes(wrong)
    assert repr(verdict) == ("✗ check_inter_node_bytes: on input 1 of 10 (d_model=7168, top_k=8, node_limit=4, "
                             "dispatch='fp8', combine='bf16') the result is 86,016, expected 86,912. Hint: an fp8 "
                             "row also carries its scales: 4 bytes (fp32) per 128 values.")


def test_ignoring_the_node_limit_fails_with_a_hint():
    def wrong(d_model, top_k, node_limit, dispatch, combine):
        return NS["inter_node_bytes"](d_model, top_k, top_k, dispatch, combine)

    assert "at most node_limit nodes" in repr(exercises.check_inter_node_bytes(wrong))


def test_an_unfilled_stub_raises_not_implemented():
    def stub(d_model, d_expert, n_routed, n_shared, top_k, n_moe_layers):
        raise NotImplementedError("exercise 00.1: write moe_params")

    with pytest.raises(NotImplementedError, match="exercise 00.1"):
        exercises.check_moe_params(stub)
