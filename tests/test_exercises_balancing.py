"""The checks of notebook 03's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import pytest
import torch
from solutions import load

from moelab import exercises

NS = load("03_load_balancing.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_switch_loss(NS["switch_loss"])
    assert exercises.check_update_bias(NS["update_bias"])
    assert exercises.check_max_over_mean(NS["max_over_mean"])


def test_a_switch_loss_returned_as_a_tensor_passes():
    assert exercises.check_switch_loss(lambda probs, indices: torch.tensor(NS["switch_loss"](probs, indices)))


def test_the_hugging_face_convention_fails_with_a_hint():
    def wrong(probs, indices):
        T, E = probs.shape
        f = torch.bincount(indices.flatten(), minlength=E).float() / T
        return E * (f * probs.mean(0)).sum()

    verdict = exercises.check_switch_loss(wrong)
    assert repr(verdict).startswith("✗ check_switch_loss: on input 1 of 9 (probs=tensor(16, 8) float32, "
                                    "indices=tensor(16, 2) int64) the result is 2.14754, expected 1.07377.")
    assert "Hugging Face's convention, k times larger" in repr(verdict)


def test_a_switch_loss_without_e_fails_with_a_hint():
    def wrong(probs, indices):
        f = torch.bincount(indices.flatten(), minlength=probs.shape[1]).float() / indices.numel()
        return (f * probs.mean(0)).sum()

    assert "multiply by E" in repr(exercises.check_switch_loss(wrong))


def test_a_bias_update_with_the_wrong_sign_fails_with_a_hint():
    def wrong(bias, counts, speed):
        return bias + speed * torch.sign(counts.float() - counts.float().mean())

    verdict = exercises.check_update_bias(wrong)
    assert repr(verdict) == ("✗ check_update_bias: on input 1 of 9 (bias=tensor(8,) float32, counts=tensor(8,) "
                             "int64, speed=0.1) the result[0] is 0.1, expected -0.1 (8 of 8 entries differ). Hint: "
                             "an overloaded expert's bias goes down (so fewer tokens choose it), not up.")


def test_a_bias_update_that_moves_experts_at_the_mean_fails_with_a_hint():
    def wrong(bias, counts, speed):
        load = counts.float()
        return bias + torch.where(load > load.mean(), -speed, speed)

    verdict = exercises.check_update_bias(wrong)
    assert "on input 2 of 9" in repr(verdict) and "keeps its bias (sign(0) = 0)" in repr(verdict)


def test_a_proportional_step_fails_with_a_hint():
    def wrong(bias, counts, speed):
        return bias + speed * (counts.float().mean() - counts.float())

    assert "the same size for every expert" in repr(exercises.check_update_bias(wrong))


def test_max_over_mean_without_idle_experts_fails_with_a_hint():
    def wrong(indices, n_experts):
        load = torch.bincount(indices.flatten()).float()
        return (load.max() / load.mean()).item()

    verdict = exercises.check_max_over_mean(wrong)
    assert repr(verdict) == ("✗ check_max_over_mean: on input 1 of 8 (indices=tensor(64, 2) int64, n_experts=8) the "
                             "result is 2.67188, expected 3.5625. Hint: idle experts count in the mean, with load 0: "
                             "bincount(..., minlength=E).")


def test_an_unfilled_stub_raises_not_implemented():
    def stub(probs, indices):
        raise NotImplementedError("exercise 03.1: write switch_loss")

    with pytest.raises(NotImplementedError, match="exercise 03.1"):
        exercises.check_switch_loss(stub)


def test_hints_match_a_float_and_a_tensor_result_alike():
    def per_token(indices, n_experts):
        return torch.bincount(indices.flatten(), minlength=n_experts).max() / indices.shape[0]

    for wrong in (per_token, lambda indices, n_experts: per_token(indices, n_experts).item()):
        assert "the mean load is T · k / E" in repr(exercises.check_max_over_mean(wrong))
