"""Balancing losses against their formulas, and the aux-loss-free bias update against a skewed router."""
import math

import pytest
import torch

from moelab.balance import load_stats, router_z_loss, sequence_aux_loss, switch_aux_loss, tokens_per_expert, update_bias
from moelab.router import SigmoidRouter


def uniform(T=8, E=4, k=2):
    probs = torch.full((T, E), 1 / E)
    indices = torch.stack([torch.arange(T * k) % E]).view(T, k)  # every expert gets T·k/E assignments
    return probs, indices


def test_switch_loss_is_one_for_a_perfectly_uniform_router_and_grows_with_collapse():
    probs, indices = uniform()
    assert switch_aux_loss(probs, indices).item() == 1.0
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1
    assert switch_aux_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == 4.0  # = E


def test_hugging_face_variant_is_k_times_larger():
    torch.manual_seed(0)
    probs = torch.rand(16, 8).softmax(-1)
    indices = probs.topk(3, -1).indices
    hf = 8 * ((tokens_per_expert(indices, 8).float() / 16) * probs.mean(0)).sum()  # counts / T, as in HF
    torch.testing.assert_close(hf, 3 * switch_aux_loss(probs, indices))


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert abs(router_z_loss(logits).item() - expected) < 1e-6


def test_sequence_loss_is_one_per_balanced_sequence_and_averages_over_sequences():
    probs, indices = uniform(T=8, E=4, k=2)
    balanced = sequence_aux_loss(probs.view(1, 8, 4), indices.view(1, 8, 2))
    assert abs(balanced.item() - 1.0) < 1e-6
    skewed_probs = torch.zeros(1, 8, 4)
    skewed_probs[..., :2] = 0.5
    skewed = sequence_aux_loss(skewed_probs, torch.tensor([[0, 1]] * 8).view(1, 8, 2))
    both = sequence_aux_loss(torch.cat([probs.view(1, 8, 4), skewed_probs]),
                             torch.cat([indices.view(1, 8, 2), torch.tensor([[0, 1]] * 8).view(1, 8, 2)]))
    assert skewed.item() == 2.0 and abs(both.item() - 1.5) < 1e-6


def test_bias_update_moves_against_the_load():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10, 2, 4, 4]), speed=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_bias_update_reduces_the_imbalance_of_a_skewed_router():
    torch.manual_seed(0)
    router = SigmoidRouter(16, 8, 2)
    with torch.no_grad():
        router.weight[0] += 2.0  # expert 0 wins about half of all tokens: nearly twice its share
    x = torch.randn(512, 16)
    start = load_stats(tokens_per_expert(router(x).indices, 8))["max_over_mean"]
    for _ in range(300):
        update_bias(router.bias, tokens_per_expert(router(x).indices, 8), speed=0.01)
    end = load_stats(tokens_per_expert(router(x).indices, 8))["max_over_mean"]
    assert start > 1.5 and end < 1.1


def test_load_stats():
    stats = load_stats(torch.tensor([4, 4, 0, 8]))
    assert stats == {"max_over_mean": 2.0, "cv": pytest.approx(math.sqrt(8) / 4), "idle_experts": 1}
