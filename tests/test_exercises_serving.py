"""The checks of notebook 12's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import pytest
import torch
from solutions import load

from moelab import exercises
from moelab.eplb import rebalance_experts
from moelab.exercises.serving import CPU, H100_BF16, _roofline_batch, _roofline_inputs
from moelab.experiments.mtp import load_results
from moelab.roofline import expected_distinct_experts

NS = load("12_serving.ipynb")
V3 = (16.19e9, 2.554e9, 256, 8)          # DeepSeek-V3: weights outside the routed experts, one expert, E, k


def test_the_published_solutions_pass():
    assert exercises.check_roofline_batch(NS["roofline_batch"])
    assert exercises.check_replicate_experts(NS["replicate_experts"])
    assert exercises.check_expected_tokens_per_pass(NS["expected_tokens_per_pass"])


def test_the_predictions_are_what_the_library_says():
    # 12.1: dense float32 on this CPU, an MoE with E/k = 8, and the H100 figures the solution quotes
    assert (_roofline_batch(1e9, 0.0, 0, 0, 4, *CPU), _roofline_batch(0.0, 1e8, 64, 8, 4, *CPU)) == (9, 67)
    assert round(expected_distinct_experts(64, 8, 67), 2) == 63.99
    assert (_roofline_batch(70e9, 0.0, 0, 0, 2, *H100_BF16), _roofline_batch(*V3, 2, *H100_BF16)) == (296, 5402)
    assert _roofline_batch(*V3, 4, *CPU) == 153
    # 12.2: 120, 70, 50 and 10 tokens on 8 slots; every extra slot to the hottest expert instead
    assert NS["replicate_experts"]([120, 70, 50, 10], 8) == [3, 2, 2, 1]
    assert max(load / n for load, n in zip([120, 70, 50, 10], [3, 2, 2, 1])) == 40
    assert max(load / n for load, n in zip([120, 70, 50, 10], [5, 1, 1, 1])) == 70
    # 12.3: the chapter's acceptance rate with 1, 2 and 4 drafts, and the limit of a long chain
    tokens = NS["expected_tokens_per_pass"]
    assert [round(tokens(0.888, n), 3) for n in (1, 2, 4)] == [1.888, 2.677, 3.999]
    assert round(1 / (1 - 0.888), 2) == 8.93


def test_the_speed_up_cell_prints_the_prediction_beside_the_measurement():
    spec = load_results()["speculative"]
    assert (spec["acceptance_rate"], spec["speedup"]) == (0.8884, 1.376)
    assert round(NS["predicted"], 3) == spec["predicted_speedup"] == 1.429     # the experiment's own prediction


def test_no_input_of_the_roofline_check_sits_on_a_tie():
    """Arithmetic over reads is at least 1e-6 away from 1 at the answer and the batch before it, so that a learner's
    sums in another order cannot move the answer."""
    for dense, expert, E, k, weight_bytes, bandwidth, flop_rate in _roofline_inputs():
        def ratio(B):
            touched = expected_distinct_experts(E, k, B) if E else 0.0
            return (2 * B * (dense + k * expert) / flop_rate) / (weight_bytes * (dense + touched * expert) / bandwidth)

        first = _roofline_batch(dense, expert, E, k, weight_bytes, bandwidth, flop_rate)
        for B in ([first, first - 1] if first else [2 ** 16]):
            assert B == 0 or abs(ratio(B) - 1) > 1e-6, (dense, expert, E, k, B)


def _learner_scan(touched, flops_per_weight=2, all_experts_computed=False):
    """A learner's scan of the batch that reads ``touched(B, E, k)`` experts per step, does ``flops_per_weight``
    per weight used, and multiplies each token by all ``E`` experts if ``all_experts_computed``."""
    def roofline_batch(n_params_dense, n_params_expert, n_experts, top_k, bytes_per_weight, bandwidth, flop_rate):
        used = n_experts if all_experts_computed else top_k
        for B in range(1, 2 ** 16 + 1):
            read = bytes_per_weight * (n_params_dense + touched(B, n_experts, top_k) * n_params_expert) / bandwidth
            if flops_per_weight * B * (n_params_dense + used * n_params_expert) / flop_rate >= read:
                return B
        return None

    return roofline_batch


def _uniform(B, E, k):
    return E * (1 - (1 - k / E) ** B) if E else 0.0


_reads_k_experts = _learner_scan(lambda B, E, k: k)
_reads_all_experts = _learner_scan(lambda B, E, k: E)
_one_flop_per_weight = _learner_scan(_uniform, flops_per_weight=1)
_all_experts_computed = _learner_scan(_uniform, all_experts_computed=True)


def test_reading_k_experts_at_every_batch_fails_with_a_hint():
    verdict = repr(exercises.check_roofline_batch(_reads_k_experts))
    assert verdict == ("✗ check_roofline_batch: on input 1 of 14 (n_params_dense=0, n_params_expert=1e+08, "
                       "n_experts=64, top_k=8, bytes_per_weight=4, bandwidth=1.6e+10, flop_rate=6.7e+10) the result "
                       "is 9, expected 67. Hint: the batch's tokens choose different experts: a step reads the "
                       "E·(1 − (1 − k/E)^B) experts they touched, not k, so its bytes grow with the batch.")


@pytest.mark.parametrize("wrong, where, hint", [
    (_reads_all_experts, "on input 5 of 14", "a step reads only the experts its tokens touched"),
    (_one_flop_per_weight, "on input 1 of 14", "a multiply-add is 2 FLOPs"),
    (_all_experts_computed, "on input 1 of 14", "each token multiplies by its own k experts, not all E"),
], ids=["all-experts-read", "one-flop-per-weight", "all-experts-computed"])
def test_roofline_mistakes_fail_with_a_hint(wrong, where, hint):
    verdict = repr(exercises.check_roofline_batch(wrong))
    assert verdict.startswith(f"✗ check_roofline_batch: {where} ") and f"Hint: {hint}" in verdict


def test_the_last_memory_bound_batch_fails_with_a_hint():
    def last_memory_bound(**inputs):
        first = NS["roofline_batch"](**inputs)
        return None if first is None else first - 1

    verdict = repr(exercises.check_roofline_batch(last_memory_bound))
    assert "the result is 66, expected 67. Hint: return the first batch that is compute-bound" in verdict


def test_a_scan_without_the_cap_fails_on_the_memory_bound_model():
    def no_cap(n_params_dense, n_params_expert, n_experts, top_k, bytes_per_weight, bandwidth, flop_rate):
        B = 1                                                   # scans on until the step is compute-bound
        while 2 * B * (n_params_dense + top_k * n_params_expert) / flop_rate < \
                bytes_per_weight * (n_params_dense + _uniform(B, n_experts, top_k) * n_params_expert) / bandwidth:
            B += 1
        return B

    verdict = repr(exercises.check_roofline_batch(no_cap))
    assert verdict.startswith("✗ check_roofline_batch: on input 8 of 14 (n_params_dense=1e+09, "
                              "n_params_expert=8e+08, n_experts=2048, top_k=1, ")
    assert verdict.endswith(", expected None.")


def test_slots_by_total_load_fail_with_a_hint():
    def by_total_load(loads, num_slots):
        replicas = [1] * len(loads)
        hottest = max(range(len(loads)), key=lambda e: loads[e])      # the load never changes: always the same one
        replicas[hottest] += num_slots - len(loads)
        return replicas

    verdict = repr(exercises.check_replicate_experts(by_total_load))
    assert verdict == ("✗ check_replicate_experts: on input 1 of 12 (loads=[120, 70, 50, 10], num_slots=8) the "
                       "result[0] is 5, expected 3. Hint: divide by the replicas an expert already has: its tokens "
                       "split evenly over them, so pick the largest loads[e] / replicas[e]. By total load the "
                       "hottest expert takes every extra slot.")


def test_the_load_after_one_more_replica_fails_with_a_hint():
    def after_one_more(loads, num_slots):
        replicas = [1] * len(loads)
        for _ in range(num_slots - len(loads)):
            replicas[max(range(len(loads)), key=lambda e: loads[e] / (replicas[e] + 1))] += 1
        return replicas

    verdict = repr(exercises.check_replicate_experts(after_one_more))
    assert "on input 1 of 12 (loads=[120, 70, 50, 10], num_slots=8) the result[0] is 4, expected 3" in verdict
    assert "Hint: compare the load per replica each expert has now" in verdict


def test_ties_to_the_highest_index_fail_with_a_hint():
    def ties_to_last(loads, num_slots):
        replicas = [1] * len(loads)
        for _ in range(num_slots - len(loads)):
            per_replica = [load / n for load, n in zip(loads, replicas)]
            replicas[len(loads) - 1 - per_replica[::-1].index(max(per_replica))] += 1
        return replicas

    verdict = repr(exercises.check_replicate_experts(ties_to_last))
    assert verdict == ("✗ check_replicate_experts: on input 2 of 12 (loads=[4, 4, 2], num_slots=4) the result[0] is "
                       "1, expected 2. Hint: on a tie, the extra slot goes to the lowest index, as torch.max picks.")


@pytest.mark.parametrize("slots", [31, 32, 40, 48, 64])
def test_the_replicas_are_those_of_the_chapters_balancer(slots):
    """The global policy that section 6 calls (one group, one node) replicates the layer's row as exercise 12.2."""
    gen = torch.Generator().manual_seed(slots)
    loads = torch.stack([torch.bincount(torch.multinomial(torch.rand(31, generator=gen) ** 3 + 0.02, 3000, True,
                                                          generator=gen), minlength=31) for _ in range(4)])
    num_gpus = 4 if slots % 4 == 0 else 1
    logcnt = rebalance_experts(loads.float(), slots, num_groups=1, num_nodes=1, num_gpus=num_gpus)[2]
    assert [NS["replicate_experts"](row.tolist(), slots) for row in loads] == logcnt.tolist()


@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.888, 1.0])
@pytest.mark.parametrize("n_draft", [1, 2, 4])
def test_tokens_per_pass_are_what_a_simulated_chain_yields(acceptance, n_draft):
    """Each pass: n drafts, each accepted with probability a; the accepted prefix and one token of the main model's."""
    passes = 20000
    gen = torch.Generator().manual_seed(round(1000 * acceptance) + n_draft)
    accepted = torch.rand(passes, n_draft, generator=gen) < acceptance
    tokens = (accepted.int().cumprod(1).sum(1) + 1).double()       # drafts up to the first rejection, plus one
    error = 4 * tokens.std().item() / passes ** 0.5 + 1e-9          # 4 standard errors
    assert abs(tokens.mean().item() - NS["expected_tokens_per_pass"](acceptance, n_draft)) <= error


def test_each_draft_accepted_on_its_own_fails_with_a_hint():
    def independent(acceptance, n_draft):
        return 1 + n_draft * acceptance

    verdict = repr(exercises.check_expected_tokens_per_pass(independent))
    assert verdict == ("✗ check_expected_tokens_per_pass: on input 1 of 16 (acceptance=0.888, n_draft=4) the result "
                       "is 4.552, expected 3.99857. Hint: a draft is kept only if every draft before it was: the "
                       "i-th with probability a^i, not a.")


@pytest.mark.parametrize("wrong, hint", [
    (lambda acceptance, n_draft: sum(acceptance ** i for i in range(1, n_draft + 1)),
     "count the main model's own token too"),
    (lambda acceptance, n_draft: sum(acceptance ** i for i in range(n_draft)), "n drafts give up to n + 1 tokens"),
    (lambda acceptance, n_draft: 1 / (1 - acceptance), "the chain stops after n drafts"),
], ids=["drafts-only", "one-term-short", "no-cap"])
def test_tokens_per_pass_mistakes_fail_with_a_hint(wrong, hint):
    verdict = repr(exercises.check_expected_tokens_per_pass(wrong))
    assert verdict.startswith("✗ check_expected_tokens_per_pass: on input 1 of 16 (acceptance=0.888, n_draft=4) ")
    assert f"Hint: {hint}" in verdict


def test_a_division_by_zero_at_full_acceptance_is_named():
    def closed_form_only(acceptance, n_draft):
        return (1 - acceptance ** (n_draft + 1)) / (1 - acceptance)

    verdict = repr(exercises.check_expected_tokens_per_pass(closed_form_only))
    assert verdict == ("✗ check_expected_tokens_per_pass: on input 10 of 16 (acceptance=1, n_draft=4) your "
                       "function raised ZeroDivisionError: float division by zero")


def test_an_unfilled_stub_reaches_the_learner():
    def stub(loads, num_slots):
        raise NotImplementedError("exercise 12.2: write replicate_experts")

    with pytest.raises(NotImplementedError, match="exercise 12.2"):
        exercises.check_replicate_experts(stub)
