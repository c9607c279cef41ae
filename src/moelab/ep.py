"""Expert parallelism: each rank holds a slice of every MoE layer's experts, and tokens travel to them.

:func:`shard` turns an :class:`~moelab.moe.MoE` layer expert-parallel in place: it keeps this rank's experts and
swaps the layer's dispatcher for one that sends every token to the ranks holding its experts and brings the
results back (:class:`ExpertParallel`, or :class:`~moelab.twohop.TwoHopExpertParallel` across nodes). The router
and the shared experts stay whole on every rank. How the rows travel (process group, wire format, emulated
network, timeline) is one :class:`~moelab.exchange.Exchange`. Built in notebooks/05_expert_parallelism.ipynb.

Shapes: ``x`` is this rank's ``(T, d_model)`` token rows; ``E`` experts in all, ``E_local = E / world`` per rank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .dispatch import assignments, combine, permute
from .exchange import Exchange, ExchangeDispatcher, exchange_counts, return_rows, run_local_experts, send_rows
from .ffn import Experts
from .network import Network, Topology
from .router import Routing
from .timeline import Timeline, collective, phase
from .twohop import TwoHopExpertParallel

if TYPE_CHECKING:
    from .model import Transformer
    from .moe import MoE


def expert_parallel(x: torch.Tensor, routing: Routing, local_experts: Experts, n_experts: int, *,
                    ex: Exchange = Exchange()) -> torch.Tensor:
    """The routed experts' output for this rank's rows ``x`` ``(T, d_model)``, when the ``n_experts`` experts are
    sharded over the ranks in order: rank ``r`` holds experts ``r·E_local … (r+1)·E_local − 1`` as
    ``local_experts``. Equal to the single-process grouped dispatch with all experts (GShard's dispatch/combine).

    1. *dispatch*: sort this rank's (token, expert) assignments by expert, so that rows for rank 0's experts come
       first, then rank 1's; exchange how many rows each rank sends to each local expert
       (:func:`~moelab.exchange.exchange_counts`); all-to-all the token rows. Each rank now holds every rank's
       rows for its own experts.
    2. *expert*: run the local experts on them (grouped matmuls, as in one process).
    3. *combine*: all-to-all the outputs back, and add them into their tokens with the routing weights — applied
       here, on the token's own rank, so the router's gradient never travels.

    With ``ex.timeline``, the three phases are recorded with their bytes (``T·k`` rows of ``d_model`` values
    leave in dispatch and come back in combine, the same again for the gradients in backward) and the rows each
    rank's experts processed. ``ex.wire = "fp8"`` sends the dispatch as DeepSeek-V3 does (§3.3.3): FP8 E4M3 with a
    power-of-two scale per 1×128 tile (:mod:`moelab.wire`); the experts compute on the dequantised rows.
    """
    world, E_local = ex.world, local_experts.n_experts
    if E_local * world != n_experts:
        raise ValueError(f"local_experts holds {E_local} experts on each of {world} ranks, not n_experts = "
                         f"{n_experts}; allowed: n_experts divisible by the world size, E_local = n_experts / world")
    with phase(ex.timeline, "dispatch") as event:
        token, expert, weight = assignments(routing)
        order, _ = permute(token, expert, n_experts)
        token, expert, weight = token[order], expert[order], weight[order]
        send = torch.bincount(expert, minlength=n_experts).view(world, E_local)   # rows per (rank, local expert)
        with collective(ex.timeline, event):
            recv = exchange_counts(send, ex)                                       # rows from (rank, local expert)
            send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
            rows = send_rows(x.index_select(0, token), send_splits, recv_splits, event, ex)
    out = run_local_experts(rows, recv, local_experts, ex.timeline)
    with phase(ex.timeline, "combine") as event:
        back = return_rows(out, recv_splits, send_splits, event, ex)
        return combine(x, token, back.to(x.dtype) * weight[:, None])


class ExpertParallel(ExchangeDispatcher):
    """The dispatcher of an expert-parallel MoE layer: :func:`expert_parallel` over its exchange."""

    def route(self, x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        return expert_parallel(x, routing, experts, self.n_experts, ex=self.exchange)


@torch.no_grad()
def shard(moe: MoE, group: dist.ProcessGroup | None = None, *, wire: str = "fp32", net: Network | None = None,
          two_hop: Topology | None = None, timeline: Timeline | None = None) -> MoE:
    """Make ``moe`` expert-parallel over ``group``, in place, and return it: keep only this rank's
    ``n_routed_experts / world_size`` experts (rank ``r`` holds experts ``r·E_local … (r+1)·E_local − 1``) and
    dispatch through an :class:`~moelab.exchange.Exchange` of ``group``, ``wire``, ``net`` and ``timeline``. With
    ``two_hop``, a topology of nodes, tokens go in two hops, one copy per node
    (:class:`~moelab.twohop.TwoHopExpertParallel`)."""
    exchange = Exchange(group=group, wire=wire, net=net, timeline=timeline)
    c, world, rank = moe.config, exchange.world, exchange.rank
    if moe.expert_parallel:
        raise ValueError("shard: this MoE layer is already expert-parallel; allowed: a layer holding all experts")
    if c.n_routed_experts % world:
        raise ValueError(f"n_routed_experts = {c.n_routed_experts} cannot be split over {world} ranks; allowed: "
                         f"a multiple of the world size")
    if c.dispatch == "capacity":
        raise ValueError("dispatch = 'capacity' is not supported with expert parallelism; allowed: a dropless "
                         "dispatch ('loop', 'sorted', 'grouped'), which all run as grouped")
    E_local = c.n_routed_experts // world
    local = Experts(E_local, c.d_model, c.d_expert).to(moe.experts.w_gate)
    for name, p in local.named_parameters():
        p.copy_(getattr(moe.experts, name)[rank * E_local:(rank + 1) * E_local])
    moe.experts = local
    if two_hop is None:
        moe.dispatcher = ExpertParallel(c.n_routed_experts, exchange)
    else:
        moe.dispatcher = TwoHopExpertParallel(c.n_routed_experts, exchange, two_hop)
    return moe


def replicated_parameters(model: Transformer) -> list[torch.nn.Parameter]:
    """The parameters every rank holds a copy of under expert parallelism (embeddings, attention, norms, routers,
    shared experts): all but the MoE layers' routed experts, in the model's order."""
    sharded = {id(p) for moe in model.moe_layers for p in moe.experts.parameters()}
    return [p for p in model.parameters() if id(p) not in sharded]
