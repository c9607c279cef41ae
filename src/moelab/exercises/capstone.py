"""Checks for the exercises of notebooks/14_capstone.ipynb: what crosses the slow link in the capstone's cluster.

References: :func:`moelab.twohop.node_rows` (DeepSeek-V3 §3.2.2: a token is sent to each node it needs once),
:func:`moelab.wire.round_trip_bytes` (moelab's FP8 wire: the forward dispatch in FP8 with 1×128 scales,
the other three trips in BF16; DeepSeek-V3 §3.3.3 has a second FP8 trip), and rank code on real gloo ranks
(:mod:`.ranks`): the two-hop dispatch's first hop, against :func:`moelab.twohop.node_rows` sent with
``all_to_all_single``.

Shapes: ``T`` tokens on a rank, ``k`` choices per token.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..quant import packed_bytes
from ..twohop import node_rows
from ..wire import round_trip_bytes
from .core import Verdict, case, run_check, seeded
from .ranks import RankCase, run_rank_check, send_to

__all__ = ["check_copies_across", "check_row_bytes", "check_first_hop"]


def _copies_across(indices: torch.Tensor, experts_per_node: int, node: int) -> int:
    _, row_node, _ = node_rows(indices, experts_per_node)
    return int((row_node != node).sum())


def _choices_across(indices: torch.Tensor, experts_per_node: int, node: int) -> int:
    return int((indices // experts_per_node != node).sum())


def _tokens_across(indices: torch.Tensor, experts_per_node: int, node: int) -> int:
    return int((indices // experts_per_node != node).any(1).sum())


def check_copies_across(fn) -> Verdict:
    """Exercise 13.1: ``fn(indices, experts_per_node, node) -> int``, how many copies of this rank's tokens two-hop
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
    """Exercise 13.2: ``fn(d, wire) -> int``, the bytes one row of ``d`` values costs on its four trips (dispatch,
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


def _hop_inputs(rank: int, world: int, per_node: int, experts_per_node: int, k: int, tokens: int, seed: int) -> dict:
    """Every rank's routing drawn alike (top-``k`` distinct experts); this rank's rows carry ``100·rank + t``."""
    g = seeded(seed)
    indices = [torch.rand(tokens, world // per_node * experts_per_node, generator=g).topk(k, dim=-1).indices
               for _ in range(world)]
    x = (100.0 * rank + torch.arange(tokens, dtype=torch.float32))[:, None].repeat(1, 3)
    return {"x": x, "indices": indices[rank], "per_node": per_node, "experts_per_node": experts_per_node}


def _first_hop(x: torch.Tensor, indices: torch.Tensor, per_node: int, experts_per_node: int) -> torch.Tensor:
    """moelab's node rows (:func:`moelab.twohop.node_rows`), each sent to the rank with this rank's local index on
    its node."""
    token, node, _ = node_rows(indices, experts_per_node)
    return send_to(x[token], node * per_node + dist.get_rank() % per_node)


def _first_hop_to_local_zero(x: torch.Tensor, indices: torch.Tensor, per_node: int,
                             experts_per_node: int) -> torch.Tensor:
    token, node, _ = node_rows(indices, experts_per_node)
    return send_to(x[token], node * per_node)


def _flat(x: torch.Tensor, indices: torch.Tensor, per_node: int, experts_per_node: int) -> torch.Tensor:
    """One row per choice, to the expert's rank (notebook 05's dispatch)."""
    experts_per_rank = experts_per_node // per_node
    token = torch.arange(len(indices)).repeat_interleave(indices.shape[1])
    expert = indices.flatten()
    order = expert.argsort(stable=True)
    return send_to(x[token[order]], expert[order] // experts_per_rank)


def check_first_hop(fn) -> Verdict:
    """Exercise 13.3, rank code: ``fn(x, indices, per_node, experts_per_node) -> tensor``, on every rank.

    The first hop of DeepSeek-V3's two-hop dispatch (§3.2.2): one copy of each token row ``x[t]`` per node its
    choices ``indices[t]`` fall on (experts ``n·experts_per_node …`` live on node ``n``; ranks are numbered node by
    node, ``per_node`` per node), ordered by node then token, each sent to the rank with this rank's local index on
    that node. Return the rows this rank receives, in the senders' rank order. Run on 2 and 4 real gloo ranks
    against :func:`moelab.twohop.node_rows` and ``all_to_all_single``."""
    plan = [(2, 1, 4, 2, 6, 1), (2, 2, 4, 3, 4, 5), (4, 2, 4, 2, 6, 2), (4, 2, 2, 4, 5, 3), (4, 1, 2, 1, 3, 4)]
    cases = [RankCase(world, functools.partial(_hop_inputs, per_node=per_node, experts_per_node=epn, k=k,
                                               tokens=tokens, seed=seed),
                      f"{per_node} per node, top-{k} of {epn} experts per node, {tokens} tokens")
             for world, per_node, epn, k, tokens, seed in plan]
    hints = [(_first_hop_to_local_zero, "send each copy to the rank with your own local index on its node "
                                        "(rank % per_node), so that every rank has one peer per node."),
             (_flat, "one copy per (token, node), not one row per chosen expert: that is the flat dispatch.")]
    return run_rank_check("check_first_hop", fn, _first_hop, cases, "moelab.twohop.node_rows and all_to_all_single",
                          hints=hints)
