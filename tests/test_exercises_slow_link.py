"""The checks of notebook 10's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import math

import pytest
import torch
import torch.distributed as dist
from solutions import load

from moelab import exercises

NS = load("10_slow_link_training.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_data_parallel_step(NS["data_parallel_step"])
    assert exercises.check_outer_step(NS["outer_step"])
    assert exercises.check_powersgd_sizes(NS["powersgd_sizes"])


def test_data_parallel_step_with_forward_flops_only_fails_with_a_hint():
    def forward_only(params, tokens, nodes, link, flops, H):
        t = NS["data_parallel_step"](params, tokens, nodes, link, flops, H)
        return {**t, "compute": 2 * params * tokens / flops}

    verdict = repr(exercises.check_data_parallel_step(forward_only))
    assert verdict.startswith("✗ check_data_parallel_step: on input 1 of 5 (params=1e+10, tokens=262144, nodes=14, "
                              "link='25 GbE', flops=3.165e+15, H=100) the result['compute'] is 1.65662, "
                              "expected 4.96987.")
    assert "the result['compute'] is 1.65662, expected 4.96987" in verdict and "6 FLOPs per parameter" in verdict


def test_data_parallel_step_with_p_rounds_fails_with_a_hint():
    def half_ring(params, tokens, nodes, link, flops, H):
        def ring(nbytes):
            return (nodes - 1) * (link.alpha + nbytes / nodes / link.beta)
        return {"compute": 6 * params * tokens / flops, "all_reduce": ring(4 * params),
                "diloco_int8": ring(params * (1 + 4 / 128)) / H}

    verdict = repr(exercises.check_data_parallel_step(half_ring))
    assert "on input 1 of 5" in verdict and "the result['all_reduce'] is 11.886, expected 23.7721" in verdict
    assert "2(p − 1) rounds" in verdict


def test_data_parallel_step_with_diloco_every_step_fails_with_a_hint():
    def every_step(params, tokens, nodes, link, flops, H):
        return NS["data_parallel_step"](params, tokens, nodes, link, flops, 1)

    verdict = repr(exercises.check_data_parallel_step(every_step))
    assert "the result['diloco_int8'] is 6.12922, expected 0.0612922" in verdict and "divide its time by H" in verdict


@pytest.mark.slow
def test_the_published_rank_code_passes():
    assert exercises.check_int8_pseudo_gradient(NS["int8_pseudo_gradient"])


def fp32_average(delta):
    total = delta.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def int8_sum(delta):
    return NS["int8_pseudo_gradient"](delta) * dist.get_world_size()


@pytest.mark.slow
def test_a_pseudo_gradient_averaged_in_fp32_or_summed_fails_naming_the_input_and_rank():
    verdict = repr(exercises.check_int8_pseudo_gradient(fp32_average))
    assert verdict.startswith("✗ check_int8_pseudo_gradient: on input 1 of 6 (2 ranks, Δ of 256 values) rank 0: the "
                              "result[0] is ")
    assert verdict.endswith("Hint: round each rank's Δ to INT8 tiles before it travels: the average is of what "
                            "arrives.")
    verdict = repr(exercises.check_int8_pseudo_gradient(int8_sum))
    assert "on input 1 of 6 (2 ranks, Δ of 256 values) rank 0" in verdict
    assert "divide the sum by the number of ranks" in verdict


def test_outer_step_with_the_sign_flipped_fails_with_a_hint():
    def flipped(theta, workers, buffer, lr, momentum):
        delta = (workers - theta).mean(dim=0)
        b = momentum * buffer + delta
        return theta - lr * (delta + momentum * b)

    verdict = repr(exercises.check_outer_step(flipped))
    assert verdict.startswith("✗ check_outer_step: on input 1 of 6 (theta=tensor(16,) float32, workers=tensor(4, 16) "
                              "float32, buffer=tensor(16,) float32, lr=0.7, momentum=0.9) the result[0] is")
    assert "θ_global − θ_local" in verdict


def test_outer_step_with_plain_momentum_fails_with_a_hint():
    def heavy_ball(theta, workers, buffer, lr, momentum):
        return theta - lr * (momentum * buffer + (theta - workers).mean(dim=0))

    verdict = repr(exercises.check_outer_step(heavy_ball))
    assert "✗ check_outer_step: on input 1 of 6" in verdict and "Nesterov steps with Δ + μ·b" in verdict


def test_outer_step_summing_the_workers_fails_with_a_hint():
    def summed(theta, workers, buffer, lr, momentum):
        delta = (theta - workers).sum(dim=0)
        return theta - lr * (delta + momentum * (momentum * buffer + delta))

    verdict = repr(exercises.check_outer_step(summed))
    assert "✗ check_outer_step: on input 1 of 6" in verdict and "do not sum them" in verdict


def test_powersgd_sizes_that_always_compresses_fails_with_a_hint():
    def always(shapes, rank):
        plain = p_values = q_values = 0
        for shape in shapes:
            n, m = shape[0], math.prod(shape) // shape[0]
            if len(shape) == 1:
                plain += n
            else:
                p_values, q_values = p_values + n * min(n, m, rank), q_values + m * min(n, m, rank)
        return plain, p_values, q_values

    verdict = repr(exercises.check_powersgd_sizes(always))
    assert verdict == ("✗ check_powersgd_sizes: on input 2 of 7 (shapes=[torch.Size([64, 64])], rank=16) the "
                       "result[0] is 0, expected 4,096. Hint: a matrix is sent as P and Q only when that is at least "
                       "2× smaller: (n + m)·r·2 < n·m; otherwise it goes uncompressed.")


def test_powersgd_sizes_on_the_last_two_dimensions_fails_with_a_hint():
    def last_two(shapes, rank):
        return NS["powersgd_sizes"]([torch.Size((s[:-1].numel(), s[-1])) if len(s) > 1 else s for s in shapes], rank)

    verdict = repr(exercises.check_powersgd_sizes(last_two))
    assert verdict.startswith("✗ check_powersgd_sizes: on input 4 of 7 (shapes=list of 14, rank=2) the result[1] is "
                              "4,096, expected 1,072")
    assert "the product of the rest" in verdict


def test_an_unfilled_stub_raises_not_implemented_error():
    def stub(theta, workers, buffer, lr, momentum):
        raise NotImplementedError("exercise 10.3: write outer_step")

    with pytest.raises(NotImplementedError, match="exercise 10.3"):
        exercises.check_outer_step(stub)
