"""Checks for the exercises of notebooks/10_capstone.ipynb: what crosses the slow link in the capstone's cluster.

References: :func:`moelab.twohop.node_rows` (DeepSeek-V3 §3.2.2: a token is sent to each node it needs once),
:func:`moelab.wire.round_trip_bytes` (moelab's FP8 wire: the forward dispatch in FP8 with 1×128 scales,
the other three trips in BF16; DeepSeek-V3 §3.3.3 has a second FP8 trip) and
:func:`moelab.network.ring_bytes` on a :class:`~moelab.network.Topology` (the ring of Patarasuk & Yuan 2009).

Shapes: ``T`` tokens on a rank, ``k`` choices per token.
"""
from __future__ import annotations

import torch

from ..network import Topology, ring_bytes
from ..quant import packed_bytes
from ..twohop import node_rows
from ..wire import round_trip_bytes
from .core import Verdict, case, run_check, seeded

__all__ = ["check_copies_across", "check_row_bytes", "check_ring_bytes_across"]


def _copies_across(indices: torch.Tensor, experts_per_node: int, node: int) -> int:
    _, row_node, _ = node_rows(indices, experts_per_node)
    return int((row_node != node).sum())


def _choices_across(indices: torch.Tensor, experts_per_node: int, node: int) -> int:
    return int((indices // experts_per_node != node).sum())


def _tokens_across(indices: torch.Tensor, experts_per_node: int, node: int) -> int:
    return int((indices // experts_per_node != node).any(1).sum())


def check_copies_across(fn) -> Verdict:
    """Exercise 10.1: ``fn(indices, experts_per_node, node) -> int``, how many copies of this rank's tokens two-hop
    dispatch sends to other nodes: one per (token, other node it chose an expert on). ``indices`` ``(T, k)``:
    each token's distinct experts; expert ``e`` lives on node ``e // experts_per_node``; this rank is on ``node``."""
    g = seeded(1010)
    cases = [case(indices=torch.tensor([[0, 5], [1, 2], [7, 4], [6, 3], [2, 3], [4, 6]]), experts_per_node=4,
                  node=0)]
    for T, E, k, per in ((1, 8, 2, 4), (16, 8, 2, 4), (32, 16, 4, 4), (64, 64, 8, 8), (20, 12, 3, 4), (9, 6, 6, 2)):
        indices = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
        cases.append(case(indices=indices, experts_per_node=per, node=int(torch.randint(E // per, (1,),
                                                                                        generator=g))))
    hints = [(_choices_across, "you counted every choice on another node; two hops send a token once per node, "
                               "however many of that node's experts it chose."),
             (_tokens_across, "a token that chose experts on two other nodes is copied to each of them.")]
    return run_check("check_copies_across", fn, _copies_across, cases, against="moelab.twohop.node_rows",
                     hints=hints)


def _scales_left_out(d: int, wire: str) -> int:
    return 16 * d if wire == "fp32" else d + 6 * d


def _all_fp8(d: int, wire: str) -> int:
    return 16 * d if wire == "fp32" else 4 * packed_bytes(d)


def check_row_bytes(fn) -> Verdict:
    """Exercise 10.2: ``fn(d, wire) -> int``, the bytes one row of ``d`` values costs on its four trips (dispatch,
    combine, and both gradients back), ``wire`` ``"fp32"`` or ``"fp8"`` (moelab's FP8 wire: the forward dispatch
    in FP8 with an fp32 scale per 1×128 tile, BF16 for the other three)."""
    g = seeded(1011)
    ds = [64, 7168, 128, 129, 1, 4096] + [int(x) for x in torch.randint(1, 10_000, (4,), generator=g)]
    cases = [case(d=d, wire=wire) for d in ds for wire in ("fp32", "fp8")]
    hints = [(_scales_left_out, "the FP8 dispatch also carries one fp32 scale (4 bytes) per 128 values, rounded up."),
             (_all_fp8, "on this wire only the forward dispatch is FP8: the combine and both backward trips travel "
                        "in BF16, 2 bytes a value.")]
    return run_check("check_row_bytes", fn, round_trip_bytes, cases, against="moelab.wire.round_trip_bytes",
                     hints=hints)


def _ring_across(n: int, nodes: int, per_node: int) -> int:
    topology = Topology(nodes, per_node)
    p = topology.world
    return sum(ring_bytes(n, p, r) for r in range(p) if topology.node(r) != topology.node((r + 1) % p))


def _every_rank(n: int, nodes: int, per_node: int) -> int:
    p = nodes * per_node
    return sum(ring_bytes(n, p, r) for r in range(p))


def _one_direction(n: int, nodes: int, per_node: int) -> int:
    return _ring_across(n, nodes, per_node) // 2


def check_ring_bytes_across(fn) -> Verdict:
    """Exercise 10.3: ``fn(n, nodes, per_node) -> int``, the bytes a flat ring all-reduce of ``n`` fp32 values
    (ring order 0 → 1 → … → p−1 → 0, ranks numbered node by node) sends across nodes, all ranks together."""
    g = seeded(1012)
    cases = [case(n=1000, nodes=2, per_node=2), case(n=10, nodes=3, per_node=4), case(n=7, nodes=1, per_node=4),
             case(n=5, nodes=4, per_node=1)]
    for _ in range(6):
        cases.append(case(n=int(torch.randint(1, 100_000, (1,), generator=g)),
                          nodes=int(torch.randint(1, 6, (1,), generator=g)),
                          per_node=int(torch.randint(1, 9, (1,), generator=g))))
    hints = [(_every_rank, "only the ranks whose right neighbour is on another node send across."),
             (_one_direction, "a ring all-reduce is a reduce-scatter and an all-gather: 2(p−1) rounds, both count.")]
    return run_check("check_ring_bytes_across", fn, _ring_across, cases,
                     against="moelab.network.ring_bytes on a Topology", hints=hints)
