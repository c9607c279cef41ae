"""Routers: which experts each token uses, and with what weight.

A token-choice router scores every expert for every token, keeps the ``top_k`` best, and returns their gate
values. The two families the largest open models use differ in how scores are made and gated:

- :class:`SoftmaxRouter` — Mixtral and Qwen3-MoE: softmax over all experts, top-k, optionally renormalised;
- :class:`SigmoidRouter` — DeepSeek-V3: independent sigmoid affinities, a *selection-only* bias for
  auxiliary-loss-free balancing, renormalisation and a routed scaling factor.

Both can limit each token to the best ``topk_group`` of ``n_group`` expert groups (:func:`limit_to_groups`),
which is how DeepSeek-V3 keeps each token on at most 4 of its 8 nodes. :class:`ExpertChoiceRouter` turns the
choice around (experts pick tokens); it is here for analysis only. Built in notebooks/02_moe_layer.ipynb.

Shapes: ``T`` tokens, ``E`` experts, ``k`` = ``top_k`` choices per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import check_routing


@dataclass
class Routing:
    """A router's decision for ``T`` tokens.

    ``weights`` ``(T, k)``: gate values that multiply the chosen experts' outputs; ``indices`` ``(T, k)``: the
    chosen experts; ``logits`` ``(T, E)``: raw scores (the z-loss uses them); ``probs`` ``(T, E)``: each token's
    affinities normalised to sum to 1 (the balance losses use them).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor


def limit_to_groups(scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Mask (with -inf) every expert outside each token's best ``topk_group`` of ``n_group`` equal groups.

    A group's score is the sum of its two highest (biased) expert scores: DeepSeek-V3 ``inference/model.py``
    ``Gate``, the report's "sum of the highest K_r/M affinity scores" per node. (DeepSeek-V2's device-limited
    routing, without a bias, ranked groups by their single highest score instead.) ``scores``: ``(T, E)``.
    """
    T, E = scores.shape
    grouped = scores.view(T, n_group, E // n_group)
    group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)       # (T, n_group)
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(T, E)


class TopKRouter(nn.Module):
    """Shared machinery: ``logits = x @ weightᵀ`` in fp32, scores, biased selection, gather, renormalise, scale.

    ``bias`` (a buffer, zero unless aux-loss-free balancing moves it) is added to the scores *for selection
    only*; the gate values are always the unbiased scores of the chosen experts. The bias stays in float32
    when the module is cast to a lower precision (DeepSeek-V3 and Hugging Face keep it so): steps of γ = 0.001
    would vanish in bfloat16.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1):
        super().__init__()
        check_routing(type(self).__name__, n_experts, top_k, n_group, topk_group)
        self.n_experts, self.top_k, self.norm_topk_prob = n_experts, top_k, norm_topk_prob
        self.routed_scaling_factor, self.n_group, self.topk_group = routed_scaling_factor, n_group, topk_group
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default for a standalone router
        self.register_buffer("bias", torch.zeros(n_experts))

    def _apply(self, fn, recurse=True):
        bias = self.bias
        super()._apply(fn, recurse)
        self.bias = bias.to(device=self.bias.device)            # follow device moves, never dtype casts
        return self

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())                          # (T, E)
        scores = self.scores(logits)
        choice = scores + self.bias
        if self.n_group > 1:
            choice = limit_to_groups(choice, self.n_group, self.topk_group)
        indices = choice.topk(self.top_k, dim=-1).indices                          # (T, k)
        weights = scores.gather(-1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)              # as HF and torchtitan
        weights = weights * self.routed_scaling_factor
        probs = scores / scores.sum(-1, keepdim=True)
        return Routing(weights.type_as(x), indices, logits, probs)


class SoftmaxRouter(TopKRouter):
    """Softmax over all experts, then top-k (Mixtral: Jiang et al. 2024; Qwen3-MoE).

    Mixtral always renormalises the k weights to sum to 1; Qwen3 does so when ``norm_topk_prob`` is set (its
    released configs set it). Source: Hugging Face ``MixtralSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock``.
    """

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)


class SigmoidRouter(TopKRouter):
    """Sigmoid affinities ``s = σ(x·e_i)`` scored independently per expert (DeepSeek-V3, arXiv:2412.19437 §2.1).

    Selection uses ``s + b`` (the aux-loss-free bias); the gates are ``s`` of the chosen experts, renormalised
    and multiplied by ``routed_scaling_factor`` (2.5 in DeepSeek-V3). Source: DeepSeek-V3 ``inference/model.py``.
    """

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()


class ExpertChoiceRouter(nn.Module):
    """Each expert takes its ``capacity`` highest-scoring tokens (Zhou et al. 2022, "Mixture-of-Experts with
    Expert Choice Routing"); ``capacity = ceil(capacity_factor · T / E)``, ``capacity_factor`` being the
    average number of experts per token (2 in the paper).

    Perfect balance by construction, but a token may get no expert, and — the caveat for language models —
    whether a token is chosen depends on the *other* tokens of the batch, later ones included. It is not causal,
    so it cannot be used to generate text (the flaxformer implementation says so too). For analysis only.
    Returns ``(tokens (E, capacity), gates (E, capacity))``.
    """

    def __init__(self, d_model: int, n_experts: int, capacity_factor: float = 2.0):
        super().__init__()
        self.capacity_factor = capacity_factor
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x.float(), self.weight.float()).softmax(dim=-1)          # (T, E)
        capacity = min(x.shape[0], math.ceil(self.capacity_factor * x.shape[0] / self.weight.shape[0]))
        gates, tokens = probs.t().topk(capacity, dim=-1)                          # (E, capacity)
        return tokens, gates


def skewed_routing(n_tokens: int, n_experts: int, top_k: int, skew: float, seed: int = 0) -> torch.Tensor:
    """Top-k choices ``(T, k)`` of a synthetic router that prefers low-numbered experts: logits are
    ``N(0, 1) + skew · (1 − i / (E − 1))`` for expert ``i``; ``skew = 0`` is a uniform router. For exploring
    capacity and balance without training anything (notebooks/02_moe_layer.ipynb)."""
    g = torch.Generator().manual_seed(seed)
    preference = skew * (1 - torch.arange(n_experts) / max(1, n_experts - 1))
    logits = torch.randn(n_tokens, n_experts, generator=g) + preference
    return logits.topk(top_k, dim=-1).indices
