"""The exchanges under expert parallelism: a differentiable all-to-all of rows, in a wire format, over a network.

With experts sharded over ranks, every rank holds rows (token copies) for every other rank's experts. A step
first tells each rank how many rows to expect (:func:`exchange_counts`, one small all-to-all of integers), then
moves the rows themselves with uneven splits (:func:`all_to_all`), and after the experts ran, moves the results
back the same way with the splits swapped (GShard, Lepikhin et al. 2020, §2.2; DeepSeek-V3 §3.2.2 does the same
with its own kernels). :func:`all_to_all` is differentiable: the gradient of sending rows is receiving their
gradients back, which is again an all-to-all with the splits swapped, so an expert-parallel layer trains.

Where the rows go and how is one small frozen :class:`Exchange`: the process group, the wire format
(:mod:`moelab.wire`), an optional emulated network (:class:`~moelab.network.Network`, bytes counted per link
class) and an optional timeline (:class:`~moelab.timeline.Timeline`, phases with their bytes).

Shapes: ``x`` holds ``N`` rows of ``d`` values; ``send_splits[j]`` rows go to rank ``j``, ``recv_splits[j]`` come
from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from . import quant
from .collectives import check_splits, pairwise_all_to_all
from .dispatch import grouped_experts
from .ffn import Experts
from .network import Network
from .router import Routing
from .timeline import Event, Timeline, backward_phase, collective, phase
from .wire import Wire, wire_named

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Exchange:
    """Where an expert-parallel layer's rows travel and how: over ``group`` (None: the default group), in
    ``wire`` (a name of :data:`moelab.wire.WIRES`), across the emulated ``net`` (which carries the default group's
    ranks, so ``group`` must then be None), recording phases on ``timeline``."""

    group: dist.ProcessGroup | None = None
    wire: str = "fp32"
    net: Network | None = None
    timeline: Timeline | None = None

    def __post_init__(self) -> None:
        wire_named(self.wire)
        if self.net is not None and self.group is not None:
            raise ValueError("Exchange: group is not allowed with net (an emulated network carries the default "
                             "group's ranks); allowed: group = None")

    @property
    def formats(self) -> Wire:
        return wire_named(self.wire)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def all_to_all_single(out: torch.Tensor, x: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                      ex: Exchange) -> None:
    """``dist.all_to_all_single(out, x, recv_splits, send_splits, group)``; with ``ex.net``, the same exchange as
    :func:`moelab.collectives.pairwise_all_to_all` over the emulated network (messages of zero rows not sent)."""
    if ex.net is None:
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=ex.group)
    else:
        out.copy_(pairwise_all_to_all(x, send_splits, recv_splits, ex.net))


def exchange_counts(send_counts: torch.Tensor, ex: Exchange = Exchange(),
                    peers: Sequence[int] | None = None) -> torch.Tensor:
    """``send_counts[j]`` rows go from this rank to rank ``j`` (or ``send_counts[j, e]`` rows for rank ``j``'s
    local expert ``e``); returns ``recv_counts`` of the same shape: ``recv_counts[j]``, what rank ``j`` sends here.
    Over ``ex.net``, only with ``peers`` (default: all ranks), whose counts to this rank must be the only nonzero
    ones (the others' rows of ``recv_counts`` are zero)."""
    world = ex.world
    if send_counts.dim() not in (1, 2) or send_counts.shape[0] != world:
        raise ValueError(f"send_counts has shape {tuple(send_counts.shape)}; allowed: ({world},) or ({world}, "
                         f"local experts), one row per rank")
    recv_counts = torch.zeros_like(send_counts)
    if ex.net is None:
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=ex.group)
        return recv_counts
    talk = [j for j in range(world) if peers is None or j in peers]
    splits = [1 if j in talk else 0 for j in range(world)]
    recv_counts[talk] = pairwise_all_to_all(send_counts[talk], splits, splits, ex.net)
    return recv_counts


def count_bytes(event: Event, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], rank: int) -> None:
    """Add the payload of one all-to-all of rows like ``x`` to ``event``: bytes to other ranks (``sent``), from
    other ranks (``received``) and kept on this rank (``local``)."""
    row = math.prod(x.shape[1:]) * x.element_size()
    event.sent += row * (sum(send_splits) - send_splits[rank])
    event.received += row * (sum(recv_splits) - recv_splits[rank])
    event.local += row * send_splits[rank]


def _gradients_back(ctx, grad: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The backward of an all-to-all: the gradients of the received rows go back to their senders (the splits
    swapped), in ``dtype`` on the wire, recorded on the timeline as phase ``name``."""
    ex = ctx.ex
    with phase(ex.timeline, name) as event, collective(ex.timeline, event):
        sent = grad.to(dtype).contiguous()
        grad_x = sent.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        all_to_all_single(grad_x, sent, ctx.send_splits, ctx.recv_splits, ex)
        count_bytes(event, sent, ctx.recv_splits, ctx.send_splits, ex.rank)
    return grad_x.to(grad.dtype)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], ex: Exchange,
                name: str) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.ex, ctx.name = send_splits, recv_splits, ex, name
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        all_to_all_single(out, x.contiguous(), recv_splits, send_splits, ex)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gradients_back(ctx, grad, f"{ctx.name} backward", grad.dtype), None, None, None, None


def all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], *,
               ex: Exchange = Exchange(), name: str = "all-to-all") -> torch.Tensor:
    """Send the first ``send_splits[0]`` rows of ``x`` to rank 0, the next ``send_splits[1]`` to rank 1, …; return
    the rows received, ``recv_splits[j]`` of them from rank ``j``, in rank order. Differentiable: the backward
    pass is the same exchange with the splits swapped, recorded on ``ex.timeline`` as phase ``"<name> backward"``."""
    send_splits, recv_splits = check_splits(x, send_splits, recv_splits, ex.world)
    return _AllToAll.apply(x, send_splits, recv_splits, ex, name)


class _FP8Dispatch(torch.autograd.Function):
    """Rows sent as FP8 E4M3 with one power-of-two fp32 scale per 1×128 tile, packed into bytes (DeepSeek-V3
    §3.3.3), received and dequantised; the gradient goes back in the wire's ``dispatch_grad`` format."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], ex: Exchange,
                event: Event) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.ex = send_splits, recv_splits, ex
        packed = quant.pack(*quant.quantize(x.detach().float(), "fp8_e4m3", 128, pow2=True))
        out = packed.new_empty((sum(recv_splits), packed.shape[1]))
        all_to_all_single(out, packed, recv_splits, send_splits, ex)
        count_bytes(event, packed, send_splits, recv_splits, ex.rank)
        q, scales = quant.unpack(out, x.shape[1], "fp8_e4m3")
        return quant.dequantize(q, scales, 128).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype = DTYPES[ctx.ex.formats.dispatch_grad]
        return _gradients_back(ctx, grad, "dispatch backward", dtype), None, None, None, None


def send_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], event: Event,
              ex: Exchange) -> torch.Tensor:
    """The dispatch trip: rows ``x`` out in the wire's dispatch format, their bytes added to ``event``; returns the
    received rows in ``x``'s dtype (dequantised from FP8 if so sent)."""
    fmt = ex.formats.dispatch
    if fmt == "fp8":
        return _FP8Dispatch.apply(x, send_splits, recv_splits, ex, event)
    sent = x.to(DTYPES[fmt])
    rows = all_to_all(sent, send_splits, recv_splits, ex=ex, name="dispatch")
    count_bytes(event, sent, send_splits, recv_splits, ex.rank)
    return rows.to(x.dtype)


def return_rows(out: torch.Tensor, send_splits: list[int], recv_splits: list[int], event: Event,
                ex: Exchange) -> torch.Tensor:
    """The combine trip: the experts' rows ``out`` back to where they came from (``send_splits`` are the
    dispatch's ``recv_splits``) in the wire's combine format; bytes added to ``event``."""
    out = out.to(DTYPES[ex.formats.combine])
    with collective(ex.timeline, event):
        back = all_to_all(out, send_splits, recv_splits, ex=ex, name="combine")
    count_bytes(event, out, send_splits, recv_splits, ex.rank)
    return back


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


class ExchangeDispatcher:
    """Base of the dispatchers that exchange tokens between ranks (:class:`moelab.ep.ExpertParallel`,
    :class:`moelab.twohop.TwoHopExpertParallel`), with the protocol of :class:`moelab.dispatch.LocalDispatcher`:
    phases go on the exchange's timeline, and expert loads are summed over the exchange's ranks. A subclass says
    how the tokens travel in :meth:`route`."""

    expert_parallel = True

    def __init__(self, n_experts: int, exchange: Exchange):
        self.n_experts, self.exchange = n_experts, exchange

    def route(self, x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        """The routed experts' weighted output for this rank's rows ``x``."""
        raise NotImplementedError(f"{type(self).__name__}.route: a dispatcher says how its tokens travel")

    def __call__(self, x: torch.Tensor, routing: Routing, experts: Experts,
                 training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route(x, routing, experts), torch.ones_like(routing.indices, dtype=torch.bool)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return phase(self.exchange.timeline, name)

    def total_counts(self, counts: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(counts, group=self.exchange.group)
        return counts

    def set_timeline(self, timeline: Timeline | None) -> None:
        """Record the layer's phases on ``timeline`` from now on (None: record nothing)."""
        self.exchange = dataclasses.replace(self.exchange, timeline=timeline)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_experts={self.n_experts}, wire={self.exchange.wire!r})"
