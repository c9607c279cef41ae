"""Dispatch: run each token through its chosen experts and combine the weighted outputs.

One interface, several implementations with the same outputs and gradients. Each takes the token rows ``x``
``(T, d_model)``, the :class:`~moelab.router.Routing`, and the :class:`~moelab.ffn.Experts`, and returns
``(y, kept)``: the combined output ``(T, d_model)`` and a ``(T, k)`` mask of the assignments that were computed.

- :func:`loop_dispatch` — the readable reference: one expert at a time (DeepSeek-V3 ``inference/model.py``,
  Hugging Face's eager experts);
- :func:`sorted_dispatch` — sort the ``T·k`` assignments by expert so each expert's rows are contiguous, run
  each segment, un-permute (the original DeepSeek ``moe_infer``);
- :func:`grouped_dispatch` — the same sort, then *one* ``torch._grouped_mm`` per weight matrix for all experts
  (torchtitan, Hugging Face ``grouped_mm``); falls back to the sorted loop where the kernel cannot take the
  tensors (see :func:`grouped_mm_supported`);
- :func:`capacity_dispatch` — GShard/Switch: each expert takes at most ``ceil(capacity_factor·T·k/E)``
  assignments, first choices before second ones; the rest are dropped (the token keeps only its residual).
  Not causal: a token's second choice can lose its place to a *later* token's first choice.

A :class:`LocalDispatcher` puts one of them behind the MoE layer's dispatcher seam: :class:`moelab.moe.MoE` asks its
``dispatcher`` to move the tokens, and expert parallelism (:func:`moelab.ep.shard`) swaps in one that sends them
to other ranks. Built in notebooks/02_moe_layer.ipynb.

Shapes: ``T`` tokens (rows), ``d`` = ``d_model``, ``E`` experts, ``k`` choices per token; ``N = T·k`` assignments.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from .ffn import Experts
from .router import Routing


@functools.cache
def grouped_mm_available() -> bool:
    """Whether this torch has ``torch._grouped_mm`` with a CPU kernel (torch >= 2.9; CUDA-only before)."""
    try:
        out = torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
        return bool(out.shape == (2, 8))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def grouped_mm_supported(x: torch.Tensor, experts: Experts) -> bool:
    """Whether ``torch._grouped_mm`` takes these rows and weights: on CPU fp32/bf16/fp16, on CUDA bf16 (the
    documented case, SM >= 80), with every row 16-byte aligned (``d_model`` and ``d_expert`` times the element
    size divisible by 16). Anything else runs the sorted loop, which gives the same result — and so do experts
    without stacked float weights (:class:`moelab.qexperts.QuantizedExperts`)."""
    if not isinstance(experts, Experts):
        return False
    dtypes = {torch.float32, torch.bfloat16, torch.float16} if x.device.type == "cpu" else {torch.bfloat16}
    aligned = all(n * x.element_size() % 16 == 0 for n in (experts.d_model, experts.d_expert))
    return aligned and x.dtype in dtypes and experts.w_gate.dtype == x.dtype and grouped_mm_available()


def assignments(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``T·k`` (token, expert, weight) assignments, token-major: token 0's k choices first."""
    T, k = routing.indices.shape
    token = torch.arange(T, device=routing.indices.device).repeat_interleave(k)
    return token, routing.indices.flatten(), routing.weights.flatten()


def permute(token: torch.Tensor, expert: torch.Tensor, n_experts: int):
    """Order the assignments by expert (stable: ties keep token order). Returns the permutation, and the
    end offset of each expert's segment (``int32``, as ``_grouped_mm`` wants)."""
    order = expert.argsort(stable=True)
    offsets = torch.bincount(expert, minlength=n_experts).cumsum(0).to(torch.int32)
    return order, offsets


def combine(x: torch.Tensor, token: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Un-permute: add each assignment's (already weighted) output into its token's row."""
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


def loop_dispatch(x: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.zeros_like(x)
    for e in range(experts.n_experts):
        token, slot = torch.where(routing.indices == e)                           # who chose e, as which choice
        if token.numel():
            y.index_add_(0, token, experts.expert(e, x[token]) * routing.weights[token, slot, None])
    return y, torch.ones_like(routing.indices, dtype=torch.bool)


def _sorted(x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
            experts: Experts) -> torch.Tensor:
    order, offsets = permute(token, expert, experts.n_experts)
    token, weight = token[order], weight[order]
    rows = x.index_select(0, token)                                                # (N, d), grouped by expert
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    # Only the experts that received rows run (a decode step's few tokens choose few), so a step reads only their
    # weights; with no rows at all, expert 0 runs on none, so that the weights still get their (zero) gradients.
    chosen = [(e, segment) for e, segment in enumerate(rows.split(sizes)) if segment.shape[0]] or [(0, rows)]
    out = torch.cat([experts.expert(e, segment) for e, segment in chosen])
    return combine(x, token, out * weight[:, None])


def grouped_experts(x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                    experts: Experts) -> torch.Tensor:
    """``y[t] = Σ weight · experts[expert](x[t])`` over the assignments ``(token, expert, weight)``, with one
    grouped matmul per weight matrix (or one matmul per expert where grouped matmuls are not supported).
    The expert-parallel layer calls it on the rows it received (:func:`moelab.ep.expert_parallel`)."""
    if not grouped_mm_supported(x, experts):
        return _sorted(x, token, expert, weight, experts)
    order, offsets = permute(token, expert, experts.n_experts)
    token, weight = token[order], weight[order]
    return combine(x, token, experts.grouped(x.index_select(0, token), offsets, weight))


def sorted_dispatch(x: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    return _sorted(x, *assignments(routing), experts), torch.ones_like(routing.indices, dtype=torch.bool)


def grouped_dispatch(x: torch.Tensor, routing: Routing, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
    return grouped_experts(x, *assignments(routing), experts), torch.ones_like(routing.indices, dtype=torch.bool)


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor · tokens · k / E)``: how many assignments one expert accepts. Switch Transformer's
    ``tokens / E · capacity_factor`` for top-1, generalised to top-k (GShard's top-2 capacity is ``2N / E``).

    The product is rounded to 9 decimals before the ceiling, so that a factor carrying binary rounding error
    (1.25 + 0.25 = 1.5000000000000002) gives the capacity of the factor it stands for."""
    return math.ceil(round(capacity_factor * n_tokens * top_k / n_experts, 9))


def capacity_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """``(T, k)`` mask of the assignments each expert accepts, filling its capacity with all first choices (in
    token order), then all second choices, and so on (Switch/GShard priority: top-1 before top-2)."""
    T, k = indices.shape
    by_priority = indices.t().flatten()                                           # choice-major: (k·T,)
    order = by_priority.argsort(stable=True)
    counts = torch.bincount(by_priority, minlength=n_experts)
    starts = counts.cumsum(0) - counts                                            # first slot of each expert
    position = torch.empty_like(order)                                            # place in its expert's queue
    position[order] = torch.arange(order.numel(), device=order.device) - starts[by_priority[order]]
    return (position < capacity).view(k, T).t()


def capacity_dispatch(x: torch.Tensor, routing: Routing, experts: Experts,
                      capacity_factor: float = 1.25) -> tuple[torch.Tensor, torch.Tensor]:
    T, k = routing.indices.shape
    kept = capacity_mask(routing.indices, experts.n_experts,
                         expert_capacity(T, k, experts.n_experts, capacity_factor))
    token, expert, weight = assignments(routing)
    keep = kept.flatten()
    return grouped_experts(x, token[keep], expert[keep], weight[keep], experts), kept


def capacity_report(indices: torch.Tensor, n_experts: int, capacity_factor: float) -> dict:
    """What capacity dispatch would do with these choices: per-expert ``requested`` and ``kept`` assignments,
    the ``capacity``, and the ``dropped`` fraction of all assignments."""
    T, k = indices.shape
    capacity = expert_capacity(T, k, n_experts, capacity_factor)
    kept = capacity_mask(indices, n_experts, capacity)
    return {"requested": torch.bincount(indices.flatten(), minlength=n_experts),
            "kept": torch.bincount(indices[kept], minlength=n_experts), "capacity": capacity,
            "dropped": 1.0 - kept.float().mean().item()}


DROPLESS = {"loop": loop_dispatch, "sorted": sorted_dispatch, "grouped": grouped_dispatch}


class LocalDispatcher:
    """The dispatcher of an MoE layer whose experts all live in this process: ``method`` is a key of
    :data:`DROPLESS` or ``"capacity"``, which drops assignments over ``capacity_factor`` in training only (it is
    not causal, so evaluation and generation run the dropless grouped path).

    A dispatcher is called as ``dispatcher(x, routing, experts, training) -> (y, kept)``; ``phase(name)`` times a
    part of the layer (nothing here), ``total_counts(counts)`` turns this process's expert loads into the loads
    the whole layer saw (here, the same), and ``expert_parallel`` says whether other processes hold experts."""

    expert_parallel = False

    def __init__(self, method: str = "grouped", capacity_factor: float = 1.25):
        if method not in (*DROPLESS, "capacity"):
            raise ValueError(f"method = {method!r} is not allowed; allowed: {', '.join(DROPLESS)}, capacity")
        self.method, self.capacity_factor = method, capacity_factor

    def __call__(self, x: torch.Tensor, routing: Routing, experts: Experts,
                 training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "capacity" and training:
            return capacity_dispatch(x, routing, experts, self.capacity_factor)
        return DROPLESS["grouped" if self.method == "capacity" else self.method](x, routing, experts)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def total_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return counts

    def __repr__(self) -> str:
        return f"LocalDispatcher(method={self.method!r}, capacity_factor={self.capacity_factor})"
