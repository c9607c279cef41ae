"""Checks for notebook 12 (serving): where decoding turns compute-bound, EPLB's replicas, speculative tokens per pass.

Three checks, each of a piece that notebook 12 uses from the library without writing it out:

- :func:`check_roofline_batch` — the smallest decode batch at which an MoE's step is compute-bound under the
  roofline, against a scan over the batch built on :func:`moelab.roofline.expected_distinct_experts` and
  :func:`moelab.roofline.roofline_seconds`;
- :func:`check_replicate_experts` — how many replicas EPLB gives each expert of one layer, against the ``logcnt``
  of :func:`moelab.eplb.replicate_experts`;
- :func:`check_expected_tokens_per_pass` — the expected tokens one main-model pass of speculative decoding yields
  from a chain of drafts, against the closed form of Leviathan et al. (2023, eq. 1).
"""
from __future__ import annotations

import functools

import torch

from ..eplb import replicate_experts
from ..roofline import expected_distinct_experts, roofline_seconds
from .core import Verdict, case, run_check, seeded

__all__ = ["check_roofline_batch", "check_replicate_experts", "check_expected_tokens_per_pass"]

MAX_BATCH = 2 ** 16          # exercise 12.1 scans B = 1 … MAX_BATCH and answers None beyond it

# (bandwidth in B/s, dense FLOP/s) of the machines of exercise 12.1. The CPU is the chapter's committed one-thread
# run (benchmarks/results/serving.json, rounded); the GPUs' figures are NVIDIA's datasheets, SXM parts, dense
# Tensor Core rates (half the datasheets' "with sparsity" figures): H100 989 TFLOP/s BF16 and 1,979 FP8,
# H200 the same arithmetic at 4.8 TB/s, A100 312 TFLOP/s BF16 at 2.039 TB/s.
CPU = (16e9, 67e9)
H100_BF16, H100_FP8 = (3.35e12, 989e12), (3.35e12, 1979e12)
H200_BF16, A100_BF16 = (4.8e12, 989e12), (2.039e12, 312e12)


def _roofline_batch(n_params_dense: float, n_params_expert: float, n_experts: int, top_k: int,
                    bytes_per_weight: float, bandwidth: float, flop_rate: float, read: str = "touched",
                    flops_per_weight: float = 2, computed: str = "chosen") -> int | None:
    """The first ``B ≤ MAX_BATCH`` whose roofline time is the arithmetic's, or None; by default as exercise 12.1
    states it. The keywords make its common wrong variants: ``read`` ``"all"`` (every expert's weights each step)
    or ``"active"`` (``k`` experts' weights whatever the batch), one FLOP per weight, or ``computed="all"`` (every token
    multiplies by all ``E`` experts)."""
    for batch in range(1, MAX_BATCH + 1):
        if read == "touched":
            touched = expected_distinct_experts(n_experts, top_k, batch) if n_experts else 0.0
        else:
            touched = n_experts if read == "all" else top_k
        step_bytes = bytes_per_weight * (n_params_dense + touched * n_params_expert)
        used = top_k if computed == "chosen" else n_experts
        flops = flops_per_weight * batch * (n_params_dense + used * n_params_expert)
        if roofline_seconds(step_bytes, flops, bandwidth, flop_rate) == flops / flop_rate:
            return batch
    return None


def _last_memory_bound(**inputs: float) -> int | None:
    first = _roofline_batch(**inputs)
    return None if first is None else first - 1


def _roofline_inputs() -> list[tuple[float, float, int, int, float, float, float]]:
    """The inputs of :func:`check_roofline_batch`, ``(n_params_dense, n_params_expert, n_experts, top_k,
    bytes_per_weight, bandwidth, flop_rate)``: this CPU and datasheet GPUs, dense models (``n_experts = 0``),
    DeepSeek-V3's and Kimi K2's shapes (their weights outside the routed experts, less the input embedding, and one
    routed expert's summed over the MoE layers, as :mod:`moelab.presets` gives them), an MoE whose step is still
    memory-bound at ``MAX_BATCH`` (2,048 experts, top-1), then random ones."""
    inputs = [(0.0, 1e8, 64, 8, 4, *CPU),                         # every weight in 64 experts, top-8: E/k = 8
              (1e9, 0.0, 0, 0, 4, *CPU),                          # a dense model in float32
              (16.19e9, 2.554e9, 256, 8, 2, *H100_BF16),          # DeepSeek-V3's shape, BF16
              (70e9, 0.0, 0, 0, 2, *H100_BF16),                   # a dense 70 B model
              (16.19e9, 2.554e9, 256, 8, 4, *CPU),
              (0.0, 1e8, 256, 8, 1, *CPU),                        # one byte a weight: the bend before all E are read
              (10.55e9, 2.642e9, 384, 8, 1, *H100_FP8),           # Kimi K2's shape, FP8
              (1e9, 0.8e9, 2048, 1, 2, *H100_BF16)]               # memory-bound at every batch up to MAX_BATCH
    g = seeded(12)
    machines = [CPU, H100_BF16, H100_FP8, H200_BF16, A100_BF16]
    for _ in range(6):
        n_experts = int(torch.randint(8, 513, (1,), generator=g))
        top_k = int(torch.randint(1, min(n_experts, 16) + 1, (1,), generator=g))
        dense = int(torch.randint(0, 2001, (1,), generator=g)) * 1e7
        expert = int(torch.randint(1, 501, (1,), generator=g)) * 1e7
        weight_bytes = [1, 2, 4][int(torch.randint(0, 3, (1,), generator=g))]
        inputs.append((dense, expert, n_experts, top_k, weight_bytes,
                       *machines[int(torch.randint(0, len(machines), (1,), generator=g))]))
    return inputs


def check_roofline_batch(fn) -> Verdict:
    """Notebook 12, exercise 1: ``fn(n_params_dense, n_params_expert, n_experts, top_k, bytes_per_weight, bandwidth,
    flop_rate) -> int | None``: the smallest batch ``B ≥ 1`` at which a decode step of a stack of layers is
    compute-bound under the roofline (Williams et al. 2009), its FLOPs taking at least as long as its reads:
    ``2·B·(dense + k·expert) / flop_rate ≥ bytes_per_weight·(dense + E·(1 − (1 − k/E)^B)·expert) / bandwidth``
    (the experts a batch of uniformly routed tokens touches; ``E = 0`` is a dense model, which touches none), or
    None if the step is still memory-bound at ``B = 65,536``. Against a scan of ``B = 1, 2, …`` with
    :func:`moelab.roofline.expected_distinct_experts` and :func:`moelab.roofline.roofline_seconds`."""
    names = ("n_params_dense", "n_params_expert", "n_experts", "top_k", "bytes_per_weight", "bandwidth",
             "flop_rate")
    return run_check("check_roofline_batch", fn, _roofline_batch,
                     [case(**dict(zip(names, values))) for values in _roofline_inputs()],
                     against="a scan of moelab.roofline.roofline_seconds over the batch",
                     hints=[(functools.partial(_roofline_batch, read="active"),
                             "the batch's tokens choose different experts: a step reads the E·(1 − (1 − k/E)^B) "
                             "experts they touched, not k, so its bytes grow with the batch."),
                            (functools.partial(_roofline_batch, read="all"),
                             "a step reads only the experts its tokens touched, E·(1 − (1 − k/E)^B) of them: all E "
                             "only once the batch is large."),
                            (functools.partial(_roofline_batch, flops_per_weight=1),
                             "a multiply-add is 2 FLOPs: each token does 2 per weight it uses."),
                            (functools.partial(_roofline_batch, computed="all"),
                             "each token multiplies by its own k experts, not all E: 2·B·(dense + k·expert) FLOPs."),
                            (_last_memory_bound,
                             "return the first batch that is compute-bound, not the last one that is memory-bound.")])


def _replicas(loads: list[float], num_slots: int) -> list[int]:
    return replicate_experts(torch.tensor([loads], dtype=torch.float64), num_slots)[2][0].tolist()


def _greedy(loads: list[float], num_slots: int, score, last_on_tie: bool = False) -> list[int]:
    """One replica each, then every extra slot to the expert of the largest ``score(load, replicas)``."""
    replicas = [1] * len(loads)
    order = range(len(loads) - 1, -1, -1) if last_on_tie else range(len(loads))
    for _ in range(num_slots - len(loads)):
        hottest = max(order, key=lambda e: score(loads[e], replicas[e]))   # max keeps the first of equals
        replicas[hottest] += 1
    return replicas


_by_total_load = functools.partial(_greedy, score=lambda load, n: load)
_after_one_more = functools.partial(_greedy, score=lambda load, n: load / (n + 1))
_ties_to_last = functools.partial(_greedy, score=lambda load, n: load / n, last_on_tie=True)


def _skewed_loads(g: torch.Generator, n_experts: int, tokens: int) -> list[int]:
    """Tokens per expert from a router with favourites, as the trained router's loads of section 6."""
    weights = torch.rand(n_experts, generator=g) ** 3 + 0.02
    return torch.bincount(torch.multinomial(weights, tokens, replacement=True, generator=g),
                          minlength=n_experts).tolist()


def check_replicate_experts(fn) -> Verdict:
    """Notebook 12, exercise 2: ``fn(loads, num_slots) -> list[int]``: EPLB's replica step for one layer
    (DeepSeek-V3 §3.4, github.com/deepseek-ai/EPLB): each of the ``len(loads)`` experts gets one of the
    ``num_slots`` slots, then every extra slot in turn goes to the expert with the largest load per replica,
    ``loads[e] / replicas[e]`` (the lowest index on a tie, as ``torch.max`` picks); the replicas per expert. As
    the ``logcnt`` of :func:`moelab.eplb.replicate_experts`, in float64."""
    g = seeded(12)
    inputs = [([120, 70, 50, 10], 8), ([4, 4, 2], 4), ([5, 5, 5, 5], 6), ([10, 5, 3, 2], 4), ([0, 0, 9], 5),
              ([1000, 1], 10)]
    for n_experts, num_slots, tokens in [(31, 40, 8192), (31, 64, 8192), (8, 12, 512), (16, 20, 2048),
                                         (64, 80, 4096), (256, 288, 65536)]:
        inputs.append((_skewed_loads(g, n_experts, tokens), num_slots))
    return run_check("check_replicate_experts", fn, _replicas,
                     [case(loads=loads, num_slots=slots) for loads, slots in inputs],
                     against="moelab.eplb.replicate_experts (its logcnt)",
                     hints=[(_by_total_load, "divide by the replicas an expert already has: its tokens split "
                                             "evenly over them, so pick the largest loads[e] / replicas[e]. By total "
                                             "load the hottest expert takes every extra slot."),
                            (_after_one_more, "compare the load per replica each expert has now, "
                                              "loads[e] / replicas[e], not what it would have with one more."),
                            (_ties_to_last, "on a tie, the extra slot goes to the lowest index, as torch.max "
                                            "picks.")])


def _tokens_per_pass(acceptance: float, n_draft: int) -> float:
    if acceptance == 1:
        return float(n_draft + 1)
    return (1 - acceptance ** (n_draft + 1)) / (1 - acceptance)


def _each_draft_on_its_own(acceptance: float, n_draft: int) -> float:
    return 1 + n_draft * acceptance


def _drafts_only(acceptance: float, n_draft: int) -> float:
    return _tokens_per_pass(acceptance, n_draft) - 1


def _one_term_short(acceptance: float, n_draft: int) -> float:
    return _tokens_per_pass(acceptance, n_draft - 1)


def _no_cap(acceptance: float, n_draft: int) -> float:
    return float("inf") if acceptance == 1 else 1 / (1 - acceptance)


def check_expected_tokens_per_pass(fn) -> Verdict:
    """Notebook 12, exercise 3: ``fn(acceptance, n_draft) -> float``: the expected tokens one main-model pass of
    speculative decoding yields from a chain of ``n_draft`` drafts, each accepted with probability ``a``
    independently given that all before it were: ``1 + a + … + a^n = (1 − a^(n+1)) / (1 − a)``, and ``n + 1`` at
    ``a = 1`` (Leviathan, Kalman & Matias 2023, arXiv:2211.17192, eq. 1). Against that closed form, for
    ``a`` in {0.888, 0.5, 0, 1} and ``n`` in {4, 2, 1}, then random ones."""
    g = seeded(12)
    inputs = [(a, n) for a in (0.888, 0.5, 0.0, 1.0) for n in (4, 2, 1)]
    for _ in range(4):
        inputs.append((round(float(0.05 + 0.94 * torch.rand(1, generator=g)), 3),
                       int(torch.randint(1, 9, (1,), generator=g))))
    return run_check("check_expected_tokens_per_pass", fn, _tokens_per_pass,
                     [case(acceptance=a, n_draft=n) for a, n in inputs],
                     against="the closed form (1 − a^(n+1)) / (1 − a)",
                     hints=[(_each_draft_on_its_own, "a draft is kept only if every draft before it was: the i-th "
                                                     "with probability a^i, not a."),
                            (_drafts_only, "count the main model's own token too: every pass yields one more than "
                                           "the drafts it kept (its correction, or the token after the last draft)."),
                            (_one_term_short, "n drafts give up to n + 1 tokens: the sum is 1 + a + … + a^n, the "
                                              "last draft's term a^n included."),
                            (_no_cap, "the chain stops after n drafts: at most n + 1 tokens per pass, so the "
                                      "geometric sum stops at a^n.")])
