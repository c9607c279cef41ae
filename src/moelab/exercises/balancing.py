"""Checks for the exercises of notebooks/03_load_balancing.ipynb: how evenly a router spreads its tokens.

Three checks: the Switch balancing loss, DeepSeek-V3's auxiliary-loss-free bias update, and the max/mean load
statistic.

References: :func:`moelab.balance.switch_aux_loss` (Switch Transformer, Fedus et al. 2021, eq. 4),
:func:`moelab.balance.update_bias` (DeepSeek-V3, arXiv:2412.19437 §2.1.2) and :func:`moelab.balance.load_stats`.

Shapes: ``T`` tokens, ``E`` experts, ``k`` choices per token.
"""
from __future__ import annotations

import torch

from ..balance import load_stats, switch_aux_loss, tokens_per_expert, update_bias
from ..router import skewed_routing
from .core import Verdict, case, run_check, seeded

__all__ = ["check_switch_loss", "check_update_bias", "check_max_over_mean"]


def _switch_loss(probs: torch.Tensor, indices: torch.Tensor) -> float:
    return switch_aux_loss(probs, indices).item()


# The wrong answers return 0-d tensors: a hint is matched by comparing them with the learner's result, and a
# float result compares with a tensor, while a tensor result does not compare with a float.
def _hf_convention(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return indices.shape[-1] * switch_aux_loss(probs, indices)


def _without_e(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return switch_aux_loss(probs, indices) / probs.shape[-1]


def _first_choices_only(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return switch_aux_loss(probs, indices[:, :1])


def _router_case(g: torch.Generator, n_tokens: int, n_experts: int, top_k: int, scale: float):
    probs = (scale * torch.randn(n_tokens, n_experts, generator=g)).softmax(-1)
    return case(probs=probs, indices=probs.topk(top_k, dim=-1).indices)


def check_switch_loss(fn) -> Verdict:
    """Exercise 03.1: ``fn(probs, indices) -> float``, Switch's ``E · Σ_i f_i · P_i`` for router probabilities
    ``probs`` ``(T, E)`` and choices ``indices`` ``(T, k)``: ``f_i`` the fraction of the ``T · k`` assignments
    sent to expert ``i``, ``P_i`` the mean probability of expert ``i`` over the tokens. Against
    :func:`moelab.balance.switch_aux_loss` (Fedus et al. 2021, eq. 4, with ``f`` over all k choices)."""
    g = seeded(1300)
    cases = [_router_case(g, 16, 8, 2, 1.0), _router_case(g, 32, 4, 2, 3.0), _router_case(g, 1, 8, 1, 1.0),
             case(probs=torch.full((16, 8), 1 / 8), indices=torch.arange(32).view(16, 2) % 8),
             case(probs=torch.eye(8)[torch.zeros(10, dtype=torch.long)], indices=torch.zeros(10, 1, dtype=torch.long))]
    for _ in range(4):
        E = int(torch.randint(2, 65, (1,), generator=g))
        cases.append(_router_case(g, int(torch.randint(1, 129, (1,), generator=g)), E,
                                  int(torch.randint(1, min(E, 8) + 1, (1,), generator=g)), 2.0))
    hints = [(_hf_convention, "f_i is a fraction of all T · k assignments; dividing the counts by T gives "
                              "Hugging Face's convention, k times larger."),
             (_without_e, "multiply by E, so that perfect balance gives 1."),
             (_first_choices_only, "count all k choices of each token in f_i, not only the first.")]
    return run_check("check_switch_loss", fn, _switch_loss, cases, against="moelab.balance.switch_aux_loss",
                     hints=hints)


def _update_bias(bias: torch.Tensor, counts: torch.Tensor, speed: float) -> torch.Tensor:
    updated = bias.clone()
    update_bias(updated, counts, speed)
    return updated


def _reversed_sign(bias: torch.Tensor, counts: torch.Tensor, speed: float) -> torch.Tensor:
    return _update_bias(bias, counts, -speed)


def _proportional(bias: torch.Tensor, counts: torch.Tensor, speed: float) -> torch.Tensor:
    c = counts.float()
    return bias + speed * (c.mean() - c)


def _moves_experts_at_the_mean(bias: torch.Tensor, counts: torch.Tensor, speed: float) -> torch.Tensor:
    c = counts.float()
    return bias + torch.where(c > c.mean(), -speed, speed)


def check_update_bias(fn) -> Verdict:
    """Exercise 03.2: ``fn(bias, counts, speed) -> new bias`` ``(E,)``: DeepSeek-V3's auxiliary-loss-free update,
    ``b_i − γ`` for an expert that got more than the mean load ``counts`` of the last step, ``b_i + γ`` for one
    that got less, unchanged at exactly the mean (``γ = speed``). Against :func:`moelab.balance.update_bias`
    (arXiv:2412.19437 §2.1.2), applied to a copy."""
    g = seeded(1301)
    cases = [case(bias=torch.zeros(8), counts=torch.tensor([30, 2, 2, 2, 2, 2, 2, 2]), speed=0.1),
             case(bias=torch.zeros(3), counts=torch.tensor([2, 4, 6]), speed=0.001),
             case(bias=0.1 * torch.randn(4, generator=g), counts=torch.tensor([5, 5, 5, 5]), speed=0.01),
             case(bias=torch.zeros(1), counts=torch.tensor([7]), speed=0.1)]
    for _ in range(5):
        E = int(torch.randint(2, 65, (1,), generator=g))
        cases.append(case(bias=0.1 * torch.randn(E, generator=g), counts=torch.randint(0, 50, (E,), generator=g),
                          speed=[0.001, 0.01, 0.1][int(torch.randint(0, 3, (1,), generator=g))]))
    hints = [(_reversed_sign, "an overloaded expert's bias goes down (so fewer tokens choose it), not up."),
             (_proportional, "the step is γ times the sign of (mean − load), the same size for every expert."),
             (_moves_experts_at_the_mean, "an expert at exactly the mean load keeps its bias (sign(0) = 0).")]
    return run_check("check_update_bias", fn, _update_bias, cases, against="moelab.balance.update_bias",
                     hints=hints)


def _max_over_mean(indices: torch.Tensor, n_experts: int) -> float:
    return load_stats(tokens_per_expert(indices, n_experts))["max_over_mean"]


def _idle_experts_left_out(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    counts = torch.bincount(indices.flatten()).float()                  # no minlength: trailing idle experts lost
    return counts.max() / counts.mean()


def _mean_per_token(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    return tokens_per_expert(indices, n_experts).max() / indices.shape[0]


def check_max_over_mean(fn) -> Verdict:
    """Exercise 03.3: ``fn(indices, n_experts) -> float``, the load of the busiest expert over the mean load: the
    assignments ``indices`` ``(T, k)`` counted per expert (idle experts count, with 0), max over mean; 1 is
    perfect balance. Against :func:`moelab.balance.load_stats` of :func:`moelab.balance.tokens_per_expert`."""
    settings = [(64, 8, 2, 4.0), (16, 8, 2, 0.0), (10, 16, 1, 6.0), (1, 4, 1, 0.0), (256, 32, 4, 1.0),
                (8, 64, 8, 3.0), (100, 5, 5, 2.0), (48, 6, 2, 8.0)]
    cases = [case(indices=skewed_routing(T, E, k, skew, seed=1302 + i), n_experts=E)
             for i, (T, E, k, skew) in enumerate(settings)]
    hints = [(_idle_experts_left_out, "idle experts count in the mean, with load 0: bincount(..., minlength=E)."),
             (_mean_per_token, "the mean load is T · k / E assignments per expert, not T.")]
    return run_check("check_max_over_mean", fn, _max_over_mean, cases, against="moelab.balance.load_stats",
                     hints=hints)
