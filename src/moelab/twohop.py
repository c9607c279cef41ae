"""Two-hop expert parallelism: each token crosses the slow links once per node it needs, not once per expert.

DeepSeek-V3 (§3.2.2) limits each token "to be dispatched to at most 4 nodes", to which it is "first transmitted
via IB to the GPUs with the same in-node index on its target nodes" and then "instantaneously forwarded via
NVLink", and it combines the same way back: the expensive inter-node bandwidth carries one copy of a token per
*node*, however many of that node's experts it chose. Node-limited routing (:func:`moelab.router.limit_to_groups`
with one group per node) bounds those copies by ``M = topk_group``. Without the node-level deduplication the limit
saves nothing on the slow links — each of a token's ``k`` choices would still travel on its own — so the two go
together.

:func:`two_hop_expert_parallel` (the dispatcher :class:`TwoHopExpertParallel`) on rank ``(n, l)`` (node ``n``,
local index ``l`` of a :class:`~moelab.network.Topology`), with experts sharded over the ranks in order as in
:func:`moelab.ep.expert_parallel`:

1. *across*: one *node row* per (token, node it chose), sent to the rank with the same local index on that node
   (one slow-link peer per node, as in :func:`moelab.collectives.hierarchical_all_to_all`), in ``wire``; with it, in
   fp32, the token's ``k`` choices as that node's local expert ids and their gate weights (zero where the choice
   is on another node);
2. *inside*: the receiving rank forwards each node row to the ranks of its node that hold the chosen experts, one
   row per (node row, expert), over the fast links; the experts run;
3. *combine*: the outputs come back inside the node, are weighted and summed into one row per node row on the
   forwarding rank, and that one row crosses the slow link back (in BF16 on the FP8 wire), where the node rows of
   a token are added.

Every exchange is :func:`moelab.exchange.all_to_all` (differentiable; the gradients take the same paths back), and
with the exchange's ``net`` goes over an emulated :class:`~moelab.network.Network`, bytes counted per link
class. The result equals the single-process dispatch up to the order of the sums (tests/test_capstone.py). Built in
notebooks/14_capstone.ipynb.

Shapes: ``x`` is this rank's ``(T, d_model)`` token rows; ``k`` choices per token.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .dispatch import assignments, combine
from .exchange import (
    Exchange,
    ExchangeDispatcher,
    all_to_all,
    exchange_counts,
    return_rows,
    run_local_experts,
    send_rows,
)
from .ffn import Experts
from .network import Topology
from .router import Routing
from .timeline import collective, phase


def node_rows(indices: torch.Tensor, experts_per_node: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The node rows of a routing's ``indices`` ``(T, k)``: ``(token, node)`` of each distinct pair, ordered by node
    then token, and for each assignment (token-major, as :func:`moelab.dispatch.assignments`) its node row."""
    T, k = indices.shape
    token = torch.arange(T, device=indices.device).repeat_interleave(k)
    key = (indices.flatten() // experts_per_node) * T + token
    unique, row_of = torch.unique(key, return_inverse=True)              # sorted: by node, then by token
    return unique % T, unique // T, row_of


def two_hop_expert_parallel(x: torch.Tensor, routing: Routing, local_experts: Experts, n_experts: int,
                            topology: Topology, *, ex: Exchange = Exchange()) -> torch.Tensor:
    """The routed experts' output for this rank's rows ``x`` ``(T, d_model)``, dispatched in two hops (see the
    module docstring). The exchange's wire applies to both hops; its group must be the default one."""
    if ex.group is not None:
        raise ValueError("two_hop_expert_parallel: ex.group is not allowed (the topology numbers the default "
                         "group's ranks); allowed: group = None")
    world, rank, E_local = dist.get_world_size(), dist.get_rank(), local_experts.n_experts
    timeline = ex.timeline
    if topology.world != world or E_local * world != n_experts:
        raise ValueError(f"topology {topology.nodes} × {topology.per_node} with {E_local} experts per rank does not "
                         f"fit {world} ranks and n_experts = {n_experts}; allowed: nodes × per_node = world size, "
                         f"E_local = n_experts / world size")
    node, local = topology.node(rank), topology.local(rank)
    per_node = topology.per_node * E_local
    k = routing.indices.shape[1]
    peers, inside = topology.peers(local), topology.node_ranks(node)

    with phase(timeline, "dispatch across") as event:
        token, row_node, row_of = node_rows(routing.indices, per_node)
        _, expert, weight = assignments(routing)
        slot = torch.arange(k, device=x.device).repeat(routing.indices.shape[0])
        ids = torch.zeros(len(token), k, device=x.device).index_put((row_of, slot), (expert % per_node + 1).float())
        gates = torch.zeros(len(token), k, device=x.device, dtype=weight.dtype).index_put((row_of, slot), weight)
        send = torch.zeros(world, dtype=torch.long, device=x.device)
        send[[topology.rank(m, local) for m in range(topology.nodes)]] = torch.bincount(row_node,
                                                                                        minlength=topology.nodes)
        with collective(timeline, event):
            recv = exchange_counts(send, ex, peers=peers)
            send_splits, recv_splits = send.tolist(), recv.tolist()
            rows = send_rows(x.index_select(0, token), send_splits, recv_splits, event, ex)
            meta = all_to_all(torch.cat([ids, gates.float()], 1), send_splits, recv_splits, ex=ex, name="routing")
    with phase(timeline, "dispatch inside") as event:
        got = meta[:, :k].detach().long() - 1                              # this node's local expert ids, -1: none
        row2, slot2 = torch.nonzero(got >= 0, as_tuple=True)
        expert2 = got[row2, slot2]
        order = expert2.argsort(stable=True)                               # by rank in the node, then local expert
        row2, slot2, expert2 = row2[order], slot2[order], expert2[order]
        send2 = torch.zeros(world, E_local, dtype=torch.long, device=x.device)
        send2[inside] = torch.bincount(expert2, minlength=per_node).view(topology.per_node, E_local)
        with collective(timeline, event):
            recv2 = exchange_counts(send2, ex, peers=inside)
            send2_splits, recv2_splits = send2.sum(1).tolist(), recv2.sum(1).tolist()
            rows2 = send_rows(rows.index_select(0, row2), send2_splits, recv2_splits, event, ex)
    out = run_local_experts(rows2, recv2, local_experts, timeline)
    with phase(timeline, "combine inside") as event:
        back2 = return_rows(out, recv2_splits, send2_splits, event, ex)
        partial = combine(rows, row2, back2.to(rows.dtype) * meta[row2, k + slot2, None])
    with phase(timeline, "combine across") as event:
        back = return_rows(partial, recv_splits, send_splits, event, ex)
        return combine(x, token, back.to(x.dtype))


class TwoHopExpertParallel(ExchangeDispatcher):
    """The dispatcher of an expert-parallel MoE layer across the nodes of ``topology``:
    :func:`two_hop_expert_parallel` over its exchange."""

    def __init__(self, n_experts: int, exchange: Exchange, topology: Topology):
        super().__init__(n_experts, exchange)
        self.topology = topology

    def route(self, x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        return two_hop_expert_parallel(x, routing, experts, self.n_experts, self.topology, ex=self.exchange)
