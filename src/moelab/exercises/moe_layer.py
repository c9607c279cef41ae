"""Checks for the exercises of notebooks/02_moe_layer.ipynb: the two routers and capacity dispatch.

Three checks: the softmax router with ``norm_topk_prob``, the sigmoid router with its selection-only bias, and
which assignments a capacity-limited expert keeps.

References: :class:`moelab.router.SoftmaxRouter` (Mixtral, Qwen3-MoE), :class:`moelab.router.SigmoidRouter`
(DeepSeek-V3, arXiv:2412.19437 §2.1 and §2.1.2), :func:`moelab.dispatch.expert_capacity` and
:func:`moelab.dispatch.capacity_mask` (Switch Transformer, Fedus et al. 2021 §2.2; GShard, Lepikhin et al. 2020).

Shapes: ``T`` tokens, ``E`` experts, ``k`` = ``top_k`` choices per token.
"""
from __future__ import annotations

import math

import torch

from ..dispatch import capacity_mask, expert_capacity
from ..router import SigmoidRouter, SoftmaxRouter, TopKRouter, skewed_routing
from .core import Verdict, case, run_check, seeded

__all__ = ["check_softmax_router", "check_sigmoid_router", "check_capacity_mask"]


def _route(router: TopKRouter, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``router`` applied to ``logits`` directly: its weight becomes the identity, so ``x @ weightᵀ = logits``."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(logits.shape[-1]))
    routing = router(logits)
    return routing.weights, routing.indices


def _build(cls: type[TopKRouter], n_experts: int, top_k: int, **kwargs) -> TopKRouter:
    """A router built without drawing from the caller's random state (its initial weight is overwritten)."""
    with torch.random.fork_rng(devices=[]):
        return cls(n_experts, n_experts, top_k, **kwargs)


def _softmax_router(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _route(_build(SoftmaxRouter, logits.shape[-1], top_k, norm_topk_prob=norm_topk_prob), logits)


def _always_renormalised(logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    return _softmax_router(logits, top_k, True)


def _never_renormalised(logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    return _softmax_router(logits, top_k, False)


def _softmax_over_tokens(logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    weights, indices = logits.softmax(dim=0).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if norm_topk_prob else weights), indices


def _logits(g: torch.Generator, n_tokens: int, n_experts: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(n_tokens, n_experts, generator=g)


def check_softmax_router(fn) -> Verdict:
    """Exercise 02.1: ``fn(logits, top_k, norm_topk_prob) -> (weights, indices)``, each ``(T, top_k)``: softmax of
    each token's ``(T, E)`` router logits over the experts, its ``top_k`` largest probabilities in descending
    order and their experts, the probabilities renormalised to sum to 1 when ``norm_topk_prob``. Against
    :class:`moelab.router.SoftmaxRouter` (Hugging Face ``MixtralSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock``)."""
    g = seeded(1200)
    cases = [case(logits=_logits(g, 6, 8), top_k=2, norm_topk_prob=False),
             case(logits=_logits(g, 6, 8), top_k=2, norm_topk_prob=True),
             case(logits=_logits(g, 1, 4), top_k=1, norm_topk_prob=True),
             case(logits=_logits(g, 5, 16), top_k=1, norm_topk_prob=False),
             case(logits=_logits(g, 3, 4), top_k=4, norm_topk_prob=False)]
    for i in range(5):
        E = int(torch.randint(2, 65, (1,), generator=g))
        cases.append(case(logits=_logits(g, int(torch.randint(1, 33, (1,), generator=g)), E),
                          top_k=int(torch.randint(1, min(E, 8) + 1, (1,), generator=g)), norm_topk_prob=i % 2 == 0))
    hints = [(_always_renormalised, "renormalise the k probabilities only when norm_topk_prob is True."),
             (_never_renormalised, "with norm_topk_prob, divide the k probabilities by their sum."),
             (_softmax_over_tokens, "the softmax runs over each token's experts (dim=-1), not over tokens.")]
    return run_check("check_softmax_router", fn, _softmax_router, cases, against="moelab.router.SoftmaxRouter",
                     hints=hints)


def _sigmoid_router(logits: torch.Tensor, bias: torch.Tensor, top_k: int,
                    routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    router = _build(SigmoidRouter, logits.shape[-1], top_k, routed_scaling_factor=routed_scaling_factor)
    router.bias.copy_(bias)
    return _route(router, logits)


def _gates_from_biased_scores(logits: torch.Tensor, bias: torch.Tensor, top_k: int, routed_scaling_factor: float):
    choice = logits.sigmoid() + bias
    gates, indices = choice.topk(top_k, dim=-1)
    return routed_scaling_factor * gates / gates.sum(-1, keepdim=True), indices


def _selection_without_bias(logits: torch.Tensor, bias: torch.Tensor, top_k: int, routed_scaling_factor: float):
    return _sigmoid_router(logits, torch.zeros_like(bias), top_k, routed_scaling_factor)


def _unscaled(logits: torch.Tensor, bias: torch.Tensor, top_k: int, routed_scaling_factor: float):
    return _sigmoid_router(logits, bias, top_k, 1.0)


def check_sigmoid_router(fn) -> Verdict:
    """Exercise 02.3: ``fn(logits, bias, top_k, routed_scaling_factor) -> (weights, indices)``, each
    ``(T, top_k)``: affinities ``s = σ(logits)``; the experts with the ``top_k`` largest ``s + bias`` (descending);
    their gates from the *unbiased* ``s``, renormalised to sum to 1 and multiplied by ``routed_scaling_factor``.
    Against :class:`moelab.router.SigmoidRouter` (DeepSeek-V3, arXiv:2412.19437 eq. 12–16; ``inference/model.py``
    ``Gate``)."""
    g = seeded(1201)
    cases = []
    for T, E, k, scale in [(6, 16, 2, 2.5), (4, 8, 1, 1.0), (1, 4, 2, 2.827), (8, 32, 8, 2.5), (3, 5, 5, 1.0)]:
        cases.append(case(logits=_logits(g, T, E), bias=0.3 * torch.randn(E, generator=g), top_k=k,
                          routed_scaling_factor=scale))
    for _ in range(4):
        E = int(torch.randint(2, 65, (1,), generator=g))
        cases.append(case(logits=_logits(g, int(torch.randint(1, 33, (1,), generator=g)), E),
                          bias=0.3 * torch.randn(E, generator=g),
                          top_k=int(torch.randint(1, min(E, 8) + 1, (1,), generator=g)),
                          routed_scaling_factor=float(1 + 2 * torch.rand(1, generator=g).item())))
    hints = [(_gates_from_biased_scores, "the bias only chooses: the gates come from the unbiased σ(logits)."),
             (_selection_without_bias, "choose the experts by σ(logits) + bias; the bias is what balancing moves."),
             (_unscaled, "multiply the renormalised gates by routed_scaling_factor.")]
    return run_check("check_sigmoid_router", fn, _sigmoid_router, cases, against="moelab.router.SigmoidRouter",
                     hints=hints)


def _capacity_mask(indices: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    T, k = indices.shape
    return capacity_mask(indices, n_experts, expert_capacity(T, k, n_experts, capacity_factor))


def _token_major(indices: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    T, k = indices.shape
    return capacity_mask(indices.flatten()[:, None], n_experts, expert_capacity(T, k, n_experts, capacity_factor)
                         ).view(T, k)


def _capacity_without_k(indices: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    T, _ = indices.shape
    return capacity_mask(indices, n_experts, math.ceil(capacity_factor * T / n_experts))


def _capacity_rounded_down(indices: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    T, k = indices.shape
    return capacity_mask(indices, n_experts, math.floor(capacity_factor * T * k / n_experts))


def check_capacity_mask(fn) -> Verdict:
    """Exercise 02.2: ``fn(indices, n_experts, capacity_factor) -> kept``, a ``(T, k)`` bool mask of the
    assignments that capacity dispatch computes. Each expert accepts ``ceil(capacity_factor · T · k / E)``
    assignments, filled with every token's first choice in token order, then every second choice, and so on.
    Against :func:`moelab.dispatch.expert_capacity` and :func:`moelab.dispatch.capacity_mask` (Switch
    Transformer §2.2; GShard's top-1-before-top-2 priority)."""
    settings = [(12, 4, 2, 0.0, 1.0), (12, 4, 2, 2.0, 1.0), (10, 8, 1, 2.0, 1.25), (1, 4, 2, 0.0, 1.0),
                (40, 8, 2, 1.0, 0.5), (64, 16, 4, 2.0, 1.25), (30, 6, 3, 0.5, 2.0), (50, 64, 8, 2.0, 1.0)]
    cases = [case(indices=skewed_routing(T, E, k, skew, seed=1202 + i), n_experts=E, capacity_factor=cf)
             for i, (T, E, k, skew, cf) in enumerate(settings)]
    hints = [(_token_major, "fill each expert with all first choices before any second choice (choice-major "
                            "order), not token by token."),
             (_capacity_without_k, "each token makes k assignments: capacity = ceil(capacity_factor · T · k / E)."),
             (_capacity_rounded_down, "round the capacity up (math.ceil).")]
    return run_check("check_capacity_mask", fn, _capacity_mask, cases,
                     against="moelab.dispatch.capacity_mask", hints=hints)
