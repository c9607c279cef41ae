"""Checks for notebook 12 (serving): the experts a decode batch touches, an LRU expert cache, MLA's absorbed decode.

Three checks, each against the library's own model of serving under the memory-bandwidth limit:

- :func:`check_distinct_experts` — the expected number of distinct experts a batch of uniformly routed tokens
  touches in one MoE layer, against :func:`moelab.roofline.expected_distinct_experts`;
- :func:`check_lru_loads` — the loads of one layer's LRU expert cache over one sequence's routing trace, against
  :func:`moelab.expert_cache.lru_hit_rate`;
- :func:`check_absorbed_attention` — one MLA decode step over the cached latent alone, ``W_UK`` absorbed into the
  queries and ``W_UV`` applied after the softmax, against attention over every head's materialised keys and
  values (as :func:`moelab.decode.mla_naive_step` computes it).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..expert_cache import lru_hit_rate
from ..roofline import expected_distinct_experts
from .core import Verdict, case, run_check, seeded

__all__ = ["check_distinct_experts", "check_lru_loads", "check_absorbed_attention"]


def _distinct_reference(n_experts: int, top_k: int, batch: int) -> float:
    return expected_distinct_experts(n_experts, top_k, batch)


def _no_shared_experts(n_experts: int, top_k: int, batch: int) -> float:
    return float(min(n_experts, batch * top_k))


def _independent_choices(n_experts: int, top_k: int, batch: int) -> float:
    return n_experts * (1 - (1 - 1 / n_experts) ** (batch * top_k))


def check_distinct_experts(fn) -> Verdict:
    """Notebook 12, exercise 1: ``fn(n_experts, top_k, batch) -> float``: the expected number of distinct routed
    experts that a decode step of ``batch`` tokens touches in one MoE layer when each token picks ``top_k`` distinct
    experts uniformly at random, ``E · (1 − (1 − k/E)^B)``, as :func:`moelab.roofline.expected_distinct_experts`
    (batches of 0, 1 and thousands of tokens among the inputs)."""
    g = seeded(12)
    inputs = [(256, 8, 64), (256, 8, 0), (256, 8, 1), (384, 8, 128), (64, 6, 16), (8, 2, 4), (16, 16, 3),
              (128, 8, 4096)]
    for _ in range(6):
        n_experts = int(torch.randint(2, 513, (1,), generator=g))
        top_k = int(torch.randint(1, min(n_experts, 16) + 1, (1,), generator=g))
        inputs.append((n_experts, top_k, int(torch.randint(0, 2049, (1,), generator=g))))
    return run_check("check_distinct_experts", fn, _distinct_reference,
                     [case(n_experts=e, top_k=k, batch=b) for e, k, b in inputs],
                     against="moelab.roofline.expected_distinct_experts",
                     hints=[(_no_shared_experts, "tokens share experts: expert e is untouched only when every token "
                                                 "misses it, with probability (1 − k/E)^B; sum 1 − that over the E "
                                                 "experts."),
                            (_independent_choices, "a token's k experts are distinct, not k independent draws: it "
                                                   "picks a given expert with probability k/E, so all B tokens miss "
                                                   "it with probability (1 − k/E)^B.")])


def _lru_reference(trace: list[list[int]], capacity: int) -> int:
    ids = torch.tensor(trace, dtype=torch.long)
    n_experts = max(capacity, int(ids.max()) + 1)
    return lru_hit_rate(ids[:, None, :], capacity, n_experts).loads


def _fifo(trace: list[list[int]], capacity: int) -> int:
    cache: list[int] = []
    loads = 0
    for step in trace:
        for expert in step:
            if expert not in cache:
                if len(cache) == capacity:
                    cache.pop(0)
                cache.append(expert)
                loads += 1
    return loads


def _evictions_only(trace: list[list[int]], capacity: int) -> int:
    return _lru_reference(trace, capacity) - min(capacity, len({e for step in trace for e in step}))


def _cyclic(n_experts: int, steps: int) -> list[list[int]]:
    return [[t % n_experts] for t in range(steps)]


def _skewed_trace(g: torch.Generator, n_experts: int, top_k: int, steps: int) -> list[list[int]]:
    """A trace with locality, as a trained router's: experts drawn without replacement, a few far likelier."""
    weights = torch.rand(n_experts, generator=g) ** 4 + 0.01
    return [torch.multinomial(weights, top_k, generator=g).tolist() for _ in range(steps)]


def check_lru_loads(fn) -> Verdict:
    """Notebook 12, exercise 2: ``fn(trace, capacity) -> int``: the loads of one MoE layer's LRU cache of
    ``capacity`` experts over one sequence's routing trace, a list over decode steps of the ids of the experts
    each step used, in the order listed (``capacity`` at least the experts per step). A use of a resident expert
    is a hit and makes it the most recently used; any other use loads it, evicting the least recently used when
    the cache is full; the cache starts empty (Eliseev & Mazur 2023, arXiv:2312.17238, §3.1). As the ``loads``
    of :func:`moelab.expert_cache.lru_hit_rate`."""
    g = seeded(12)
    traces = [([[0], [1], [0], [2], [0]], 2), (_cyclic(5, 20), 4), (_cyclic(5, 20), 5), ([[3]] * 10, 1),
              ([[0, 1], [2, 0], [1, 3], [0, 2], [3, 1]], 3)]
    for n_experts, top_k, capacity, steps in [(8, 2, 4, 30), (16, 2, 6, 50), (32, 4, 12, 40), (64, 6, 20, 60),
                                              (8, 1, 3, 25), (60, 4, 4, 30)]:
        traces.append((_skewed_trace(g, n_experts, top_k, steps), capacity))
    return run_check("check_lru_loads", fn, _lru_reference, [case(trace=t, capacity=c) for t, c in traces],
                     against="moelab.expert_cache.lru_hit_rate(...).loads",
                     hints=[(_fifo, "on a hit, LRU makes the expert the most recently used again; evicting in the "
                                    "order of loading (FIFO) throws out experts that are still in use."),
                            (_evictions_only, "every load counts, the first ones into the empty cache too, not "
                                              "only those that evict.")])


def _naive_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                     w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """Every head's key ``[W_UK·c_kv ; k_pe]`` and value ``W_UV·c_kv`` materialised, then attention:
    ``(B, 1, H, v)``."""
    B, H, _, _ = q_nope.shape
    S, rope = k_pe.shape[1:]
    k = torch.cat([torch.einsum("hnr,bsr->bhsn", w_uk, c_kv), k_pe[:, None].expand(B, H, S, rope)], -1)
    v = torch.einsum("hvr,bsr->bhsv", w_uv, c_kv)
    return F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], -1), k, v, scale=scale).transpose(1, 2)


def _absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, w_uk: torch.Tensor,
              w_uv: torch.Tensor, scale: float, rope: bool = True, scaled: bool = True,
              softmax_dim: int = -1) -> torch.Tensor:
    """The absorbed step, or one of its common wrong variants: without the RoPE scores, without ``scale``, or with
    the softmax over another axis of the ``(B, H, 1, S)`` scores."""
    scores = torch.einsum("bhtr,bsr->bhts", torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), c_kv)
    if rope:
        scores = scores + torch.einsum("bhtp,bsp->bhts", q_pe, k_pe)
    weights = (scores * scale if scaled else scores).softmax(softmax_dim)
    return torch.einsum("bhtr,hvr->bthv", torch.einsum("bhts,bsr->bhtr", weights, c_kv), w_uv)


def _mla_inputs(g: torch.Generator, B: int, H: int, nope: int, rope: int, v: int, r: int, S: int,
                scale: float | None = None) -> dict:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {"q_nope": randn(B, H, 1, nope), "q_pe": randn(B, H, 1, rope), "c_kv": randn(B, S, r),
            "k_pe": randn(B, S, rope), "w_uk": randn(H, nope, r) / r ** 0.5, "w_uv": randn(H, v, r) / r ** 0.5,
            "scale": (nope + rope) ** -0.5 if scale is None else scale}


def check_absorbed_attention(fn) -> Verdict:
    """Notebook 12, exercise 3: ``fn(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale) -> tensor (B, 1, H, v)``: one
    MLA decode step over the cache of the latent ``c_kv`` ``(B, S, r)`` and the shared RoPE key ``k_pe``
    ``(B, S, rope)`` alone, with the weights absorbed (DeepSeek-V2, arXiv:2405.04434, §2.1.2): head ``h``'s
    scores ``scale · ((q_nope · W_UK[h]) · c_kv + q_pe · k_pe)``, a softmax over the ``S`` cached positions,
    and ``W_UV[h]`` applied to the weighted sum of the latents. Queries ``(B, H, 1, nope)`` and
    ``(B, H, 1, rope)``, ``w_uk`` ``(H, nope, r)`` and ``w_uv`` ``(H, v, r)`` (the two halves of
    ``wkv_b.weight.view(H, nope + v, r)``). Compared in float64, to 1e-5 relative, with attention over every
    head's materialised key ``[W_UK·c_kv ; k_pe]`` and value ``W_UV·c_kv``, as
    :func:`moelab.decode.mla_naive_step` computes it."""
    g = seeded(12)
    shapes = [(2, 4, 16, 8, 16, 32, 10), (1, 1, 8, 4, 8, 16, 1), (3, 8, 32, 16, 24, 64, 37),
              (1, 4, 128, 64, 128, 512, 6), (2, 2, 4, 2, 6, 3, 50)]
    cases = [case(**_mla_inputs(g, *shape)) for shape in shapes]
    cases.append(case(**_mla_inputs(g, 2, 4, 16, 8, 16, 32, 12, scale=0.5)))
    return run_check("check_absorbed_attention", fn, _naive_attention, cases,
                     against="naive MLA attention (every head's keys and values materialised)",
                     hints=[(functools.partial(_absorbed, rope=False), "add the position part q_pe · k_pe to every "
                                                                       "score: the RoPE key, shared by the heads, is "
                                                                       "cached beside the latent."),
                            (functools.partial(_absorbed, scaled=False), "multiply the scores by scale before the "
                                                                         "softmax."),
                            (functools.partial(_absorbed, softmax_dim=1), "the softmax runs over the S cached "
                                                                          "positions, for each head on its own.")])
