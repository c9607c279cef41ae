"""Checks for notebooks/exercises/06_collectives.ipynb: what collectives cost, and what goes on the wire.

- :func:`check_all_reduce_times` — the α-β time of the ring and the halving-doubling all-reduce, against
  :func:`moelab.network.cost`;
- :func:`check_ring_reduce_scatter` — rank code, on real gloo ranks: the ring reduce-scatter with uneven chunks,
  against :func:`moelab.collectives.ring_reduce_scatter`;
- :func:`check_hierarchical_time` — the α-β time of the two-level all-reduce on fast and slow links, against
  :func:`moelab.network.cost`;
- :func:`check_wire_ratio` — the bytes of an FP8 row with its scales over its fp32 bytes, against
  :func:`moelab.quant.wire_ratio`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.distributed as dist

from ..collectives import ring_reduce_scatter
from ..network import FAST, SLOW, Link, Topology, cost
from ..quant import wire_ratio
from .core import Verdict, case, run_check, seeded
from .ranks import RankCase, run_rank_check

__all__ = ["check_all_reduce_times", "check_ring_reduce_scatter", "check_hierarchical_time", "check_wire_ratio"]


def _link(g: torch.Generator) -> Link:
    """A link with a latency from 1 µs to 10 ms and a bandwidth from 1 MB/s to 100 GB/s."""
    alpha = 10 ** float(torch.empty(()).uniform_(-6, -2, generator=g))
    beta = 10 ** float(torch.empty(()).uniform_(6, 11, generator=g))
    return Link("random", float(f"{alpha:.2g}"), float(f"{beta:.2g}"))


def _nbytes(g: torch.Generator) -> int:
    """A buffer of 100 B to 1 GB."""
    return round(10 ** float(torch.empty(()).uniform_(2, 9, generator=g)))


def _times(nbytes: float, p: int, link: Link) -> tuple[float, float]:
    return cost("ring_all_reduce", nbytes, p, link), cost("halving_doubling_all_reduce", nbytes, p, link)


def _no_fold(nbytes: float, p: int, link: Link) -> tuple[float, float]:
    """Halving-doubling priced as if ``p`` were a power of two (``lg p`` rounded up, no fold)."""
    steps = math.ceil(math.log2(p))
    return _times(nbytes, p, link)[0], 2 * steps * link.alpha + 2 * (p - 1) / p * nbytes / link.beta


def check_all_reduce_times(fn: Callable[[float, int, Link], tuple[float, float]]) -> Verdict:
    """Exercise 06.1: ``fn(nbytes, p, link) -> (ring, halving_doubling)``, the predicted seconds of an all-reduce of
    ``nbytes`` per rank on ``p`` ranks, every message over ``link`` (``link.alpha`` s, ``link.beta`` B/s).

    Ring: ``2(p−1)`` rounds of ``n/p`` bytes. Recursive halving-doubling (Rabenseifner 2004; Thakur, Rabenseifner &
    Gropp 2005): ``2·lg p'`` rounds moving ``2n(p'−1)/p'`` bytes for ``p'``, the largest power of two ≤ ``p``; when
    ``p' < p``, two more whole-buffer messages fold the extra ranks in and out. Checked against
    :func:`moelab.network.cost`."""
    g = seeded(60)
    cases = [case(nbytes=10**6, p=24, link=SLOW), case(nbytes=10**6, p=24, link=FAST),
             case(nbytes=10**6, p=32, link=FAST),
             case(nbytes=1000, p=2, link=SLOW), case(nbytes=2**20, p=4, link=FAST)]
    for p in (3, 5, 8, 12, 64, 100):
        cases.append(case(nbytes=_nbytes(g), p=p, link=_link(g)))
    hints = [(_no_fold, "when p is not a power of two, halving-doubling first folds the extra ranks into their "
                        "neighbours and unfolds them at the end: two more messages of the whole buffer."),
             (lambda nbytes, p, link: (cost("ring_reduce_scatter", nbytes, p, link),
                                       cost("halving_doubling_all_reduce", nbytes, p, link)),
              "the ring all-reduce is a reduce-scatter and then an all-gather: 2(p−1) rounds."),
             (lambda nbytes, p, link: (2 * (p - 1) * link.time(nbytes), _times(nbytes, p, link)[1]),
              "each ring round sends one chunk, nbytes / p, not the whole buffer.")]
    return run_check("check_all_reduce_times", fn, _times, cases, "moelab.network.cost", rtol=1e-9, atol=0.0,
                     hints=hints)


def _hierarchical(nbytes: float, topology: Topology, intra: Link, inter: Link) -> float:
    return cost("hierarchical_all_reduce", nbytes, topology.world, intra, topology, inter)


def _whole_buffer_across(nbytes: float, topology: Topology, intra: Link, inter: Link) -> float:
    """The hierarchical all-reduce with the whole buffer, not a 1/G shard, in the ring across the nodes."""
    G, N = topology.per_node, topology.nodes
    extra = 2 * (N - 1) * (nbytes / N - nbytes / G / N) / inter.beta
    return _hierarchical(nbytes, topology, intra, inter) + extra


def check_hierarchical_time(fn: Callable[[float, Topology, Link, Link], float]) -> Verdict:
    """Exercise 06.3: ``fn(nbytes, topology, intra, inter) -> float``, the predicted seconds of the hierarchical
    all-reduce (Horovod's; Sergeev & Del Balso 2018) of ``nbytes`` per rank on ``topology.nodes`` nodes of
    ``topology.per_node`` ranks: a ring reduce-scatter inside each node over ``intra`` links, a ring all-reduce of
    the ``1/G`` shards across the nodes over ``inter`` links, a ring all-gather inside the node. Checked against
    :func:`moelab.network.cost`."""
    g = seeded(62)
    cases = [case(nbytes=2**20, topology=Topology(2, 2), intra=FAST, inter=SLOW),
             case(nbytes=2**20, topology=Topology(4, 1), intra=FAST, inter=SLOW),
             case(nbytes=10**6, topology=Topology(1, 8), intra=FAST, inter=SLOW),
             case(nbytes=4 * 10**8, topology=Topology(8, 8), intra=Link("NVLink", 2e-6, 160e9),
                  inter=Link("InfiniBand", 5e-6, 50e9))]
    for _ in range(6):
        cases.append(case(nbytes=_nbytes(g),
                          topology=Topology(int(torch.randint(1, 9, (), generator=g)),
                                            int(torch.randint(1, 9, (), generator=g))),
                          intra=_link(g), inter=_link(g)))
    hints = [(_whole_buffer_across, "across the nodes each rank all-reduces only its shard, nbytes / per_node, "
                                    "left by the reduce-scatter inside the node."),
             (lambda nbytes, topology, intra, inter: cost("ring_all_reduce", nbytes, topology.world, inter),
              "this is a flat ring over the slow links; the hierarchical one keeps most rounds inside the nodes.")]
    return run_check("check_hierarchical_time", fn, _hierarchical, cases, "moelab.network.cost", rtol=1e-9, atol=0.0,
                     hints=hints)


def _ratio(d: int, block: int) -> float:
    return wire_ratio(d, block, "fp8_e4m3")


def check_wire_ratio(fn: Callable[[int, int], float]) -> Verdict:
    """Exercise 06.4: ``fn(d, block) -> float``, the bytes of a row of ``d`` FP8 values with one fp32 scale per
    1×``block`` tile (the last tile may be partial), as :func:`moelab.quant.pack` lays it out, over the row's fp32
    bytes (DeepSeek-V3 §3.3.3: 1×128 tiles for activations). Checked against :func:`moelab.quant.wire_ratio`."""
    g = seeded(63)
    cases = [case(d=512, block=128), case(d=512, block=32), case(d=512, block=512), case(d=7168, block=128),
             case(d=100, block=128), case(d=1, block=1)]
    for _ in range(6):
        cases.append(case(d=int(torch.randint(1, 10_000, (), generator=g)),
                          block=[16, 32, 64, 100, 128, 256, 512][int(torch.randint(0, 7, (), generator=g))]))
    hints = [(lambda d, block: (d + 4 * (d // block)) / (4 * d),
              "a last, partial tile needs its scale too: ⌈d / block⌉ scales."),
             (lambda d, block: (d + math.ceil(d / block)) / (4 * d), "each scale is an fp32: 4 bytes."),
             (lambda d, block: 0.25, "the fp32 scales travel with the values: 4 bytes per block."),
             (lambda d, block: _ratio(d, block) * 2, "the ratio is against fp32, 4 bytes a value, not bf16.")]
    return run_check("check_wire_ratio", fn, _ratio, cases, "moelab.quant.wire_ratio", hints=hints)


def _scatter_inputs(rank: int, world: int, n: int, seed: int) -> dict:
    return {"x": torch.randn(n, generator=seeded(1000 * seed + rank))}


def _ring_reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    return ring_reduce_scatter(x)


def _summed_chunk(shift: int, split: Callable[[torch.Tensor, int], tuple]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A wrong answer: the sum (gloo's all-reduce) cut by ``split``, chunk ``rank + shift`` of it."""
    def wrong(x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total)
        p = dist.get_world_size()
        chunks = list(split(total, p))
        chunks += [total[:0]] * (p - len(chunks))          # torch.chunk may make fewer than p
        return chunks[(dist.get_rank() + shift) % p]
    return wrong


def check_ring_reduce_scatter(fn: Callable[[torch.Tensor], torch.Tensor]) -> Verdict:
    """Exercise 06.2, rank code: ``fn(x) -> tensor``, on every rank: the ring reduce-scatter of the 1-D ``x``.

    Cut ``x`` into ``p`` chunks as ``torch.tensor_split`` does (uneven when ``p`` does not divide ``len(x)``: the
    first chunks are one longer), pass them around the ring on ``isend`` / ``irecv`` for ``p − 1`` rounds, adding
    as they go, and return chunk ``rank`` of the sum over all ranks (Patarasuk & Yuan 2009). Run on 2–4 real gloo
    ranks against :func:`moelab.collectives.ring_reduce_scatter`."""
    plan = [(2, 10, 1), (2, 1, 6), (3, 1001, 2), (3, 12, 5), (4, 10, 3), (4, 3, 4)]     # by world size: one launch each
    cases = [RankCase(world, functools.partial(_scatter_inputs, n=n, seed=seed), f"x of {n} values")
             for world, n, seed in plan]
    hints = [(_summed_chunk(1, torch.tensor_split), "rank r must end with chunk r: in round s, send chunk r − s − 1 "
                                                    "and add what arrives into chunk r − s − 2."),
             (_summed_chunk(0, lambda t, p: t.chunk(p)), "cut with torch.tensor_split: torch.chunk makes chunks of "
                                                         "⌈n / p⌉ and fewer of them when p does not divide n.")]
    return run_rank_check("check_ring_reduce_scatter", fn, _ring_reduce_scatter, cases,
                           "moelab.collectives.ring_reduce_scatter", rtol=1e-5, atol=1e-5, hints=hints)
