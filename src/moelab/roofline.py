"""The decode roofline: a decode step's time is the bytes it reads divided by the memory bandwidth, until the batch
is large enough for arithmetic to take longer.

One decode step multiplies every weight it touches by one activation vector per sequence: about 2 FLOPs per
weight per sequence against 2–4 bytes read per weight. A chip does hundreds of FLOPs in the time it reads one
byte (its *ridge point*, Williams et al. 2009, "Roofline"), so at small batches the step waits on memory, and its
time is ``bytes read / bandwidth``. What a step reads:

- a dense model: all its weights (less the input embedding, of which it reads ``B`` rows), once per step however
  many sequences share it;
- an MoE: the same, except that of each MoE layer's ``E`` routed experts it reads only those the batch's tokens
  chose. With uniform routing a batch of ``B`` tokens, each choosing ``k`` of ``E``, touches
  ``E · (1 − (1 − k/E)^B)`` distinct experts on average (each expert is missed by a token with probability
  ``1 − k/E``): ``k`` at ``B = 1``, all ``E`` as ``B`` grows — which is why MoE's advantage over a dense model of
  equal total parameters shrinks with the batch;
- the KV cache: ``B · context`` positions of :meth:`moelab.config.ModelConfig.kv_cache_elements` values per layer.

:func:`stream` measures the bandwidth as STREAM does (McCalpin 1995): copy ``c = a`` and triad ``a = b + s·c`` on
arrays far larger than the caches, best of several runs, bytes counted as read plus written; and *read*, a sum,
which reads only — as a decode step's matrix-vector products do.
"""
from __future__ import annotations

import time

import torch

from .config import ModelConfig, check, check_int
from .decode import KVCache, forward_cached
from .model import Transformer


def stream(n_bytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in bytes/s of ``copy``, ``triad`` and ``read`` over float32 arrays of ``n_bytes`` each,
    best of ``repeats`` (with this process's torch threads)."""
    check_int("stream", "n_bytes", n_bytes, 2**20)
    check_int("stream", "repeats", repeats)
    n = n_bytes // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    kernels = {"copy": (lambda: c.copy_(a), 2), "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3),
               "read": (lambda: a.sum(), 1)}
    best = {}
    for name, (kernel, arrays) in kernels.items():
        kernel()                                                # first touch, page faults
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel()
            times.append(time.perf_counter() - start)
        best[name] = arrays * n * 4 / min(times)
    return best


def expected_distinct_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts ``tokens`` uniformly routed tokens touch in one layer: ``E · (1 − (1 − k/E)^B)``."""
    check(1 <= top_k <= n_experts, "expected_distinct_experts", "top_k", top_k, f"allowed: 1..{n_experts}")
    check_int("expected_distinct_experts", "tokens", tokens, 0)
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def _weights(model: Transformer) -> tuple[int, list[int]]:
    """Parameters outside the routed experts and the input embedding, and one routed expert's per MoE layer."""
    experts = {id(p) for moe in model.moe_layers for p in moe.experts.parameters()}
    embedding = model.tok_embeddings.weight
    dense = sum(p.numel() for p in model.parameters() if id(p) not in experts and p is not embedding)
    return dense, [sum(p[0].numel() for p in moe.experts.parameters()) for moe in model.moe_layers]


def decode_step_bytes(model: Transformer, batch: int, context: int, distinct_experts: float | None = None,
                      weight_bytes: float | None = None, cache_bytes: float | None = None) -> dict[str, float]:
    """Bytes one decode step of ``batch`` sequences with ``context`` cached positions reads, by part.

    ``distinct_experts`` per MoE layer defaults to :func:`expected_distinct_experts` (uniform routing); pass a
    measured count for a trained router. ``weight_bytes`` / ``cache_bytes`` per value default to the model's
    dtype (e.g. 1 for FP8 weights). Works on a meta-device model (sizes only).
    """
    c = model.config
    check_int("decode_step_bytes", "batch", batch)
    check_int("decode_step_bytes", "context", context, 0)
    size = next(model.parameters()).element_size()
    weight_bytes = size if weight_bytes is None else weight_bytes
    cache_bytes = size if cache_bytes is None else cache_bytes
    dense, per_expert = _weights(model)
    if c.tie_embeddings:
        dense += c.vocab_size * c.d_model                 # the head reads the whole shared table
    dense += min(batch, c.vocab_size) * c.d_model         # the embedding rows looked up
    experts = 0.0
    for moe, size_e in zip(model.moe_layers, per_expert):
        E = moe.experts.n_experts
        touched = expected_distinct_experts(E, c.top_k, batch) if distinct_experts is None else distinct_experts
        experts += touched * size_e
    kv = batch * context * c.kv_cache_elements() * c.n_layer * cache_bytes
    parts = {"weights": dense * weight_bytes, "experts": experts * weight_bytes, "kv_cache": float(kv)}
    return {**parts, "total": sum(parts.values())}


def matmul_flops(n: int = 1024, repeats: int = 3) -> float:
    """Arithmetic throughput in FLOP/s of an ``n × n × n`` float32 matmul, best of ``repeats``: the compute roof."""
    check_int("matmul_flops", "n", n)
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


def decode_step_flops(model: Transformer, batch: int, context: int) -> float:
    """FLOPs of one decode step: 2 per weight each token multiplies by (its ``k`` experts, not all ``E``), plus
    attention over ``context`` cached positions (scores and weighted values: 2 · 2 · heads · head size each)."""
    c = model.config
    dense, per_expert = _weights(model)
    if c.tie_embeddings:
        dense += c.vocab_size * c.d_model
    chosen = c.top_k * sum(per_expert)
    v_dim = c.v_head_dim if c.attention == "mla" else c.head_dim
    attention = 2 * c.n_layer * c.n_head * (c.head_dim + v_dim) * context
    return float(batch * (2 * (dense + chosen) + attention))


def roofline_seconds(bytes_read: float, flops: float, bandwidth: float, flop_rate: float) -> float:
    """The roofline's step time: whichever takes longer, reading the bytes or doing the arithmetic."""
    return max(bytes_read / bandwidth, flops / flop_rate)


def measure_decode(model: Transformer, batch: int, context: int, steps: int = 5, absorb: bool = True,
                   seed: int = 0) -> dict[str, float]:
    """Time cached decode steps of ``batch`` random sequences with ``context`` positions already cached: the fastest
    step's ``seconds`` (best of ``steps``, as :func:`stream` keeps its best run), and the mean ``distinct_experts``
    per MoE layer the steps touched (None for a dense model) — the count :func:`decode_step_bytes` takes for a
    trained router. The cache is filled with random values instead of a prefill (a step reads the same bytes
    whatever they hold, and a prefill of a large batch would take longer than the steps)."""
    check_int("measure_decode", "steps", steps)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context + steps), generator=gen)
    cache = KVCache(model, batch, context + steps, absorb)
    for buffer in (t for layer in cache.layers for t in layer):
        buffer.normal_(generator=gen)
    cache.pos = context
    times, touched = [], []
    for t in range(context, context + steps):
        start = time.perf_counter()
        forward_cached(model, ids[:, t:t + 1], cache)
        times.append(time.perf_counter() - start)
        touched += [moe.indices.unique().numel() for moe in model.moe_layers]
    return {"seconds": min(times),
            "distinct_experts": sum(touched) / len(touched) if touched else None}


def matched_decoders(d_model: int, n_layer: int, n_experts: int, top_k: int, d_expert: int,
                     **shared: object) -> dict[str, ModelConfig]:
    """An MoE and the two dense models it is compared with: one of equal *active* FFN width (``k · d_expert``,
    the same arithmetic per token) and one of equal *total* width (``E · d_expert``, the same bytes in memory).
    ``shared`` fields (vocabulary, heads, block size…) go to all three. The MoE dispatches ``"sorted"``, which runs
    only the experts that received tokens (this torch's CPU grouped matmul visits every expert, empty or not)."""
    base = dict(d_model=d_model, n_layer=n_layer, **shared)
    return {"MoE": ModelConfig(**base, n_routed_experts=n_experts, top_k=top_k, d_expert=d_expert,
                               dispatch="sorted"),
            "dense, equal active": ModelConfig(**base, d_ff=top_k * d_expert),
            "dense, equal total": ModelConfig(**base, d_ff=n_experts * d_expert)}
