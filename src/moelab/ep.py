"""Expert parallelism's communication: the all-to-all that sends tokens to the ranks holding their experts.

With experts sharded over ranks, every rank holds rows (token copies) for every other rank's experts. A step
first tells each rank how many rows to expect (:func:`exchange_counts`, one small all-to-all of integers), then
moves the rows themselves with uneven splits (:func:`all_to_all`), and after the experts ran, moves the results
back the same way with the splits swapped (GShard, Lepikhin et al. 2020, §2.2; DeepSeek-V3 §3.2.2 does the same
with its own kernels). :func:`all_to_all` is differentiable: the gradient of sending rows is receiving their
gradients back, which is again an all-to-all with the splits swapped, so an expert-parallel layer trains.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.distributed as dist

from . import quant
from .collectives import check_splits, pairwise_all_to_all
from .dispatch import assignments, combine, grouped_experts, permute
from .ffn import Experts
from .router import Routing
from .timeline import Event, Timeline, backward_phase, collective, phase

if TYPE_CHECKING:
    from .model import Transformer
    from .network import Network


def all_to_all_single(out: torch.Tensor, x: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                      group: dist.ProcessGroup | None = None, net: Network | None = None) -> None:
    """``dist.all_to_all_single(out, x, recv_splits, send_splits, group)``; with ``net``, the same exchange as
    :func:`moelab.collectives.pairwise_all_to_all` over the emulated network (bytes counted per link class, time
    simulated or slept; messages of zero rows are not sent), on the default group."""
    if net is None:
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
        return
    if group is not None:
        raise ValueError("group is not allowed with net: an emulated network carries the default group's ranks; "
                         "allowed: group = None")
    out.copy_(pairwise_all_to_all(x, send_splits, recv_splits, net))


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None = None,
                    net: Network | None = None, peers: Sequence[int] | None = None) -> torch.Tensor:
    """``send_counts[j]`` rows go from this rank to rank ``j`` (or ``send_counts[j, e]`` rows for rank ``j``'s
    local expert ``e``); returns ``recv_counts`` of the same shape: ``recv_counts[j]``, what rank ``j`` sends here.
    With ``net``, over the emulated network, and only with ``peers`` (default: all ranks), whose counts to this
    rank must be the only nonzero ones (the others' rows of ``recv_counts`` are zero)."""
    world = dist.get_world_size(group)
    if send_counts.dim() not in (1, 2) or send_counts.shape[0] != world:
        raise ValueError(f"send_counts has shape {tuple(send_counts.shape)}; allowed: ({world},) or ({world}, "
                         f"local experts), one row per rank")
    recv_counts = torch.zeros_like(send_counts)
    if net is None:
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
        return recv_counts
    talk = [j for j in range(world) if peers is None or j in peers]
    splits = [1 if j in talk else 0 for j in range(world)]
    recv_counts[talk] = pairwise_all_to_all(send_counts[talk], splits, splits, net)
    return recv_counts


def count_bytes(event: Event, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> None:
    """Add the payload of one all-to-all of rows like ``x`` to ``event``: bytes to other ranks (``sent``), from
    other ranks (``received``) and kept on this rank (``local``)."""
    row = math.prod(x.shape[1:]) * x.element_size()
    rank = dist.get_rank(group)
    event.sent += row * (sum(send_splits) - send_splits[rank])
    event.received += row * (sum(recv_splits) - recv_splits[rank])
    event.local += row * send_splits[rank]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                timeline: Timeline | None, name: str, net: Network | None) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.timeline, ctx.name, ctx.net = send_splits, recv_splits, \
            group, timeline, name, net
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group, net)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gradients_back(ctx, grad, f"{ctx.name} backward", grad.dtype), None, None, None, None, None, None


def _gradients_back(ctx, grad: torch.Tensor, name: str, wire_dtype: torch.dtype) -> torch.Tensor:
    """The backward of an all-to-all: the gradients of the received rows go back to their senders (the splits
    swapped), in ``wire_dtype`` on the wire, recorded on the timeline as phase ``name``."""
    with phase(ctx.timeline, name) as event, collective(ctx.timeline, event):
        sent = grad.to(wire_dtype).contiguous()
        grad_x = sent.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        all_to_all_single(grad_x, sent, ctx.send_splits, ctx.recv_splits, ctx.group, ctx.net)
        count_bytes(event, sent, ctx.recv_splits, ctx.send_splits, ctx.group)
    return grad_x.to(grad.dtype)


class _QuantizedDispatch(torch.autograd.Function):
    """Rows sent as FP8 E4M3 with one power-of-two fp32 scale per 1×128 tile, packed into bytes (DeepSeek-V3
    §3.3.3), received and dequantised to fp32. The gradient goes back in BF16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                timeline: Timeline | None, event: Event, net: Network | None) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.timeline, ctx.net = send_splits, recv_splits, group, \
            timeline, net
        packed = quant.pack(*quant.quantize(x.detach().float(), "fp8_e4m3", 128, pow2=True))
        out = packed.new_empty((sum(recv_splits), packed.shape[1]))
        all_to_all_single(out, packed, recv_splits, send_splits, group, net)
        count_bytes(event, packed, send_splits, recv_splits, group)
        q, scales = quant.unpack(out, x.shape[1], "fp8_e4m3")
        return quant.dequantize(q, scales, 128).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gradients_back(ctx, grad, "dispatch backward", torch.bfloat16), None, None, None, None, None, None


def all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
               group: dist.ProcessGroup | None = None, timeline: Timeline | None = None,
               name: str = "all-to-all", net: Network | None = None) -> torch.Tensor:
    """Send the first ``send_splits[0]`` rows of ``x`` to rank 0, the next ``send_splits[1]`` to rank 1, …; return
    the rows received, ``recv_splits[j]`` of them from rank ``j``, in rank order. Differentiable: the backward
    pass is the same exchange with the splits swapped, recorded on ``timeline`` as phase ``"<name> backward"``.
    With ``net``, both go over the emulated network (:func:`all_to_all_single`)."""
    send_splits, recv_splits = check_splits(x, send_splits, recv_splits, dist.get_world_size(group))
    return _AllToAll.apply(x, send_splits, recv_splits, group, timeline, name, net)


WIRES = ("fp32", "fp8")      # what the exchanges send: fp32 rows, or FP8 dispatch (1×128 scales) + BF16 combine


def send_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, timeline: Timeline | None,
              event: Event, wire: str, net: Network | None = None) -> torch.Tensor:
    """The dispatch exchange of :func:`expert_parallel`: rows ``x`` out, in ``wire`` (:data:`WIRES`), their bytes
    added to ``event``; returns the received rows as fp32 (dequantised from FP8 if so sent)."""
    if wire == "fp8":
        return _QuantizedDispatch.apply(x, send_splits, recv_splits, group, timeline, event, net)
    rows = all_to_all(x, send_splits, recv_splits, group, timeline, "dispatch", net)
    count_bytes(event, x, send_splits, recv_splits, group)
    return rows


def return_rows(out: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                timeline: Timeline | None, event: Event, wire: str, net: Network | None = None) -> torch.Tensor:
    """The combine exchange: the experts' rows ``out`` back to where they came from (``send_splits`` are the
    dispatch's ``recv_splits``), in fp32 or, on the FP8 wire, BF16; bytes added to ``event``."""
    out = out.to(torch.bfloat16) if wire == "fp8" else out
    with collective(timeline, event):
        back = all_to_all(out, send_splits, recv_splits, group, timeline, "combine", net)
    count_bytes(event, out, send_splits, recv_splits, group)
    return back


def expert_parallel(x: torch.Tensor, routing: Routing, local_experts: Experts, n_experts: int,
                    group: dist.ProcessGroup | None = None, timeline: Timeline | None = None,
                    wire: str = "fp32", net: Network | None = None) -> torch.Tensor:
    """The routed experts' output for this rank's rows ``x`` ``(N, d_model)``, when the ``n_experts`` experts are
    sharded over the ranks in order: rank ``r`` holds experts ``r·E_local … (r+1)·E_local − 1`` as
    ``local_experts``. Equal to the single-process grouped dispatch with all experts (GShard's dispatch/combine).

    1. *dispatch*: sort this rank's (token, expert) assignments by expert, so that rows for rank 0's experts come
       first, then rank 1's; exchange how many rows each rank sends to each local expert
       (:func:`exchange_counts`); :func:`all_to_all` the token rows. Each rank now holds every rank's rows for
       its own experts.
    2. *expert*: run the local experts on them (grouped matmuls, as in one process).
    3. *combine*: :func:`all_to_all` the outputs back, and add them into their tokens with the routing weights —
       applied here, on the token's own rank, so the router's gradient never travels.

    With a ``timeline``, the three phases are recorded with their bytes (``N·k`` rows of ``d_model`` values
    leave in dispatch and come back in combine, the same again for the gradients in backward) and the rows each
    rank's experts processed.

    ``wire = "fp8"`` sends as DeepSeek-V3 does (§3.3.3): dispatch rows in FP8 E4M3 with a power-of-two scale per
    1×128 tile (``d_model + 4·⌈d_model/128⌉`` bytes a row instead of ``4·d_model``), combine rows in BF16; the
    gradients travel in BF16. The experts compute on the dequantised rows.

    With ``net`` (an emulated :class:`~moelab.network.Network`; ``group`` must be None), every exchange is the
    pairwise all-to-all over its links, bytes counted per link class.
    """
    if wire not in WIRES:
        raise ValueError(f"wire = {wire!r} is not allowed; allowed: {', '.join(WIRES)}")
    world, E_local = dist.get_world_size(group), local_experts.n_experts
    if E_local * world != n_experts:
        raise ValueError(f"local_experts holds {E_local} experts on each of {world} ranks, not n_experts = "
                         f"{n_experts}; allowed: n_experts divisible by the world size, E_local = n_experts / world")
    with phase(timeline, "dispatch") as event:
        token, expert, weight = assignments(routing)
        order, _ = permute(token, expert, n_experts)
        token, expert, weight = token[order], expert[order], weight[order]
        send = torch.bincount(expert, minlength=n_experts).view(world, E_local)   # rows per (rank, local expert)
        sent = x.index_select(0, token)
        with collective(timeline, event):
            recv = exchange_counts(send, group, net)                               # rows from (rank, local expert)
            send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
            rows = send_rows(sent, send_splits, recv_splits, group, timeline, event, wire, net)
    out = run_local_experts(rows, recv, local_experts, timeline)
    with phase(timeline, "combine") as event:
        back = return_rows(out, recv_splits, send_splits, group, timeline, event, wire, net)
        y = combine(x, token, back.to(x.dtype) * weight[:, None])
    return y


def run_local_experts(rows: torch.Tensor, recv: torch.Tensor, local_experts: Experts,
                      timeline: Timeline | None = None) -> torch.Tensor:
    """The expert phase: ``rows`` arrived ordered by source rank, then by local expert, ``recv[j, e]`` of them
    from rank ``j`` for local expert ``e``; returns each row's expert output (unweighted), in the same order."""
    E_local = local_experts.n_experts
    local_expert = torch.arange(E_local, device=rows.device).repeat(recv.shape[0]).repeat_interleave(recv.flatten())
    positions = torch.arange(rows.shape[0], device=rows.device)

    def run_experts(rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0]:
            return grouped_experts(rows, positions, local_expert, rows.new_ones(rows.shape[0]), local_experts)
        return local_experts.expert(0, rows)    # nothing came: the experts still get a (zero) gradient

    with phase(timeline, "expert") as event:
        event.rows = rows.shape[0]
        return backward_phase(timeline, Event("expert backward", rows=rows.shape[0]), rows, run_experts)


def replicated_parameters(model: Transformer) -> list[torch.nn.Parameter]:
    """The parameters every rank holds a copy of (embeddings, attention, norms, routers, shared experts): all but
    the MoE layers' routed experts, in the model's order."""
    sharded = {id(p) for moe in model.moe_layers for p in moe.experts.parameters()}
    return [p for p in model.parameters() if id(p) not in sharded]


def train_step(model: Transformer, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, grad_clip: float,
               group: dist.ProcessGroup | None = None, timeline: Timeline | None = None,
               all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
               replicas: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moelab.train.train_step` with data and expert parallelism: every rank holds its own batch, the
    replicated parameters (embeddings, attention, norms, routers, shared experts) and its shard of each MoE
    layer's experts (:meth:`moelab.moe.MoE.shard_experts`).

    The loss to minimise is the mean of the ranks' losses. So every gradient is divided by the world size; a
    replicated parameter's gradient is first summed over the ranks (all-reduce), while an expert's gradient is
    already complete on the one rank that holds it — its tokens came from every rank. All replicated gradients
    travel in one flat buffer, one all-reduce per step, as DDP's gradient buckets do (Li et al. 2020): one
    collective per tensor would pay each collective's latency dozens of times. Clipping uses the norm of
    the whole gradient, experts of all ranks included. With equal batches per rank, the step equals one process
    training on all the ranks' batches together (balancing losses that are means over sequences or tokens
    included; the Switch loss, a product of batch means, is not split this way). With a ``timeline``, the
    gradient all-reduce is recorded as phase ``"all-reduce"`` (the MoE layers record their own phases if their
    ``timeline`` is set).

    ``all_reduce(flat) -> sum`` replaces ``dist.all_reduce`` (e.g. a ring over an emulated network), summing over
    ``replicas`` ranks (default: all): with DiLoCo across nodes (notebooks/10_capstone.ipynb) the replicated
    gradients are averaged inside a node only, and the clipping norm then counts the experts of that node's ranks.
    """
    unsharded = [i for i, moe in enumerate(model.moe_layers) if not moe.expert_parallel]
    if unsharded:
        raise ValueError(f"MoE layers {unsharded} (counting MoE layers from 0) hold all their experts; allowed: "
                         f"every MoE layer sharded with MoE.shard_experts(group) before ep.train_step")
    _, loss = model(x.to(model.device), y.to(model.device))
    aux = model.aux_loss
    opt.zero_grad(set_to_none=True)
    (loss + aux).backward()
    world = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is None:                           # a parameter this step did not reach: its gradient is zero
            p.grad = torch.zeros_like(p)
    replicated = replicated_parameters(model)
    experts = [p for moe in model.moe_layers for p in moe.experts.parameters()]
    for p in experts:
        p.grad /= world
    sharded_sq = sum((p.grad.pow(2).sum() for p in experts), torch.zeros((), device=model.device))
    # one all-reduce for every replicated gradient and the experts' squared norm (DDP's buckets, in one bucket)
    flat = torch.cat([p.grad.flatten() for p in replicated] + [sharded_sq[None]])
    with phase(timeline, "all-reduce") as event, collective(timeline, event):
        if all_reduce is None:
            dist.all_reduce(flat, group=group)
        else:
            flat = all_reduce(flat)
    grads, sharded_sq = flat[:-1] / (replicas or world), flat[-1]
    for p, g in zip(replicated, grads.split([p.numel() for p in replicated])):
        p.grad.copy_(g.view_as(p))
    if grad_clip > 0:
        norm = (grads.pow(2).sum() + sharded_sq).sqrt()
        scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0)            # as torch.nn.utils.clip_grad_norm_
        for p in model.parameters():
            p.grad.mul_(scale)
    opt.step()
    model.after_step()
    return loss.detach(), aux.detach()
