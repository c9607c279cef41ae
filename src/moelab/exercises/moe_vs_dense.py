"""Checks for notebooks/exercises/04_moe_vs_dense.ipynb: counting an MoE, and measuring its experts' specialisation.

- :func:`check_parameter_counts` — total and active parameters of a model from its :class:`ModelConfig`, against
  :func:`moelab.model.parameter_counts` of the model itself (built on the meta device);
- :func:`check_training_flops` — training FLOPs per token (Kaplan et al. 2020, §2.1), against
  :func:`moelab.model.flops_per_token`;
- :func:`check_domain_information` — the mutual information between a token's domain and its expert, against
  :func:`moelab.analysis.domain_expert_information`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..analysis import domain_expert_information
from ..config import ModelConfig
from ..model import flops_per_token, parameter_counts
from ..presets import analytic_counts, meta_model
from .core import Case, Verdict, case, run_check, seeded

__all__ = ["check_parameter_counts", "check_training_flops", "check_domain_information"]


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (), generator=g))


def _config_cases(seed: int) -> list[Case]:
    """Small grouped-query-attention models: dense ones, coarse and fine-grained MoEs, shared experts, leading
    dense layers, tied embeddings, top-1 and top-E, and the course's own fine-grained MoE of notebook 04."""
    g = seeded(seed)
    configs = [ModelConfig(vocab_size=120, block_size=128, n_layer=4, n_head=4, n_kv_head=2, d_model=64, d_ff=256,
                           n_routed_experts=31, n_shared_experts=1, top_k=7, d_expert=32),
               ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=48)]
    for i in range(8):
        n_head = [1, 2, 4, 8][_randint(g, 0, 3)]
        E = [4, 8, 16, 31, 64][_randint(g, 0, 4)]
        n_layer = _randint(g, 1, 4)
        top_k = 1 if i == 0 else E if i == 1 else _randint(g, 1, min(E, 8))
        configs.append(ModelConfig(
            vocab_size=_randint(g, 20, 300), block_size=[16, 64, 128][_randint(g, 0, 2)], n_layer=n_layer,
            n_head=n_head, n_kv_head=max(1, n_head // 2 ** _randint(g, 0, 1)),
            d_model=8 * n_head * _randint(g, 1, 4), d_ff=16 * _randint(g, 1, 8), tie_embeddings=i % 3 == 2,
            n_routed_experts=E, n_shared_experts=_randint(g, 0, 2), top_k=top_k, d_expert=8 * _randint(g, 1, 8),
            first_k_dense=_randint(g, 0, n_layer - 1)))
    return [Case({"config": c}, f"config={_describe(c)}") for c in configs]


def _describe(c: ModelConfig) -> str:
    """A config in a few words: the fields the counts depend on."""
    ffn = (f"{c.n_routed_experts} experts of {c.d_expert} top-{c.top_k} +{c.n_shared_experts} shared, "
           f"first_k_dense {c.first_k_dense}, d_ff {c.d_ff}" if c.n_routed_experts else f"dense d_ff {c.d_ff}")
    return (f"vocab {c.vocab_size}, block {c.block_size}, {c.n_layer} layers, d_model {c.d_model}, "
            f"heads {c.n_head}/{c.n_kv_head}, {ffn}" + (", tied" if c.tie_embeddings else ""))


def _counts(config: ModelConfig) -> dict[str, int]:
    """``total`` and ``active`` of moelab's model built from ``config``."""
    counts = parameter_counts(meta_model(config))
    return {"total": counts["total"], "active": counts["active"]}


def _without(part: str, total: bool = True, active: bool = True) -> Callable[[ModelConfig], dict[str, int]]:
    """A wrong count: moelab's, with one part of the model (from :func:`analytic_counts`) left out."""
    def wrong(config: ModelConfig) -> dict[str, int]:
        counts, missing = _counts(config), analytic_counts(config)[part]
        return {"total": counts["total"] - missing * total, "active": counts["active"] - missing * active}
    return wrong


def check_parameter_counts(fn: Callable[[ModelConfig], dict[str, int]]) -> Verdict:
    """Exercise 04.1: ``fn(config) -> {"total": int, "active": int}`` for a grouped-query-attention model.

    ``active`` is what one token uses: everything but the ``n_routed_experts − top_k`` routed experts it skips
    in each MoE layer, the input embedding and the output head included (the convention of notebook 00 and of
    Qwen's and Mistral's published counts; DeepSeekMoE, Dai et al. 2024, §3, for shared and fine-grained
    experts). Compared with :func:`moelab.model.parameter_counts` of the model built from ``config``."""
    hints = [(_without("shared_experts", total=False), "a shared expert runs for every token: it is active."),
             (_without("routers"), "each MoE layer's router holds n_routed_experts × d_model weights."),
             (_without("embedding", total=False), "moelab counts the input embedding as active (a lookup, but "
                                                   "stored and used by every token)."),
             (_without("norms"), "every layer has two RMSNorm weight vectors of d_model, and one more before the "
                                 "head."),
             (_without("head"), "the output head is a second vocab_size × d_model matrix unless tie_embeddings."),
             (_without("dense_ffn"), "the first first_k_dense layers have a dense SwiGLU of width d_ff.")]
    return run_check("check_parameter_counts", fn, _counts, _config_cases(40), "moelab.model.parameter_counts",
                     hints=hints)


def _flops(config: ModelConfig) -> int:
    return flops_per_token(meta_model(config))


def check_training_flops(fn: Callable[[ModelConfig], int]) -> Verdict:
    """Exercise 04.2: ``fn(config) -> int``, training FLOPs per token: ``6·N + 6·n_layer·block_size·d_model``,
    where ``N`` is the active parameters that multiply — all active ones but the input embedding, unless it is
    tied to the head (Kaplan et al. 2020, §2.1: forward ``2N + 2·n_layer·n_ctx·d``, backward twice forward).
    Compared with :func:`moelab.model.flops_per_token`."""
    def attention_term(c: ModelConfig) -> int:
        return 6 * c.n_layer * c.block_size * c.d_model

    def embedding(c: ModelConfig) -> int:
        return 0 if c.tie_embeddings else c.vocab_size * c.d_model

    hints = [(lambda config: _flops(config) // 3, "count the backward pass too: it costs twice the forward."),
             (lambda config: _flops(config) - attention_term(config),
              "add the attention scores, 6·n_layer·block_size·d_model per token."),
             (lambda config: _flops(config) + 6 * embedding(config),
              "the input embedding is a table lookup: leave it out of N (unless it is tied to the head)."),
             (lambda config: _flops(config) + 6 * (_counts(config)["total"] - _counts(config)["active"]),
              "N counts the active parameters, not the total: a token skips n_routed_experts − top_k experts.")]
    return run_check("check_training_flops", fn, _flops, _config_cases(41), "moelab.model.flops_per_token",
                     hints=hints)


def _fraction_cases(seed: int) -> list[Case]:
    """``(layers, domains, experts)`` routing fractions, rows summing to 1: Dirichlet draws, domains that never
    use some experts, every domain alike (0 bits) and one expert set per domain (log2 domains bits)."""
    g = seeded(seed)
    cases = []
    for layers, domains, experts in [(4, 5, 31), (1, 2, 4), (2, 3, 8), (3, 5, 16), (1, 5, 8)]:
        x = -torch.rand(layers, domains, experts, generator=g, dtype=torch.float64).log()
        cases.append(x / x.sum(-1, keepdim=True))
    sparse = torch.rand(2, 4, 12, generator=g, dtype=torch.float64) * (torch.rand(2, 4, 12, generator=g) < 0.5)
    sparse[..., 0] += 0.1
    cases.append(sparse / sparse.sum(-1, keepdim=True))
    cases.append(torch.full((1, 5, 10), 0.1, dtype=torch.float64))
    cases.append(torch.eye(4, dtype=torch.float64).repeat_interleave(2, dim=1)[None] / 2)
    return [case(fractions=f) for f in cases]


def _information(fractions: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(domain_expert_information(fractions.numpy()))


def check_domain_information(fn: Callable[[torch.Tensor], torch.Tensor]) -> Verdict:
    """Exercise 04.3: ``fn(fractions) -> (layers,)`` float tensor, the mutual information in bits between a
    token's domain and its expert, ``I = Σ p(d, e) · log2(p(d, e) / (p(d)·p(e)))`` (Cover & Thomas 2006, §2.3),
    from ``fractions`` ``(layers, domains, experts)`` whose rows sum to 1, the domains weighted equally
    (``p(d, e) = fractions / domains``; a zero ``p(d, e)`` adds nothing). Compared with
    :func:`moelab.analysis.domain_expert_information`."""
    hints = [(lambda fractions: _information(fractions) * math.log(2), "the information is in bits: use log2."),
             (lambda fractions: fractions.shape[1] * (_information(fractions) - math.log2(fractions.shape[1])),
              "p(domain, expert) is fractions / domains: each row sums to 1, the joint must sum to 1.")]
    return run_check("check_domain_information", fn, _information, _fraction_cases(42),
                     "moelab.analysis.domain_expert_information", hints=hints)
