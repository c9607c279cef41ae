"""Expert parallelism's communication: the all-to-all that sends tokens to the ranks holding their experts.

With experts sharded over ranks, every rank holds rows (token copies) for every other rank's experts. A step
first tells each rank how many rows to expect (:func:`exchange_counts`, one small all-to-all of integers), then
moves the rows themselves with uneven splits (:func:`all_to_all`), and after the experts ran, moves the results
back the same way with the splits swapped (GShard, Lepikhin et al. 2020, §2.2; DeepSeek-V3 §3.2.2 does the same
with its own kernels). :func:`all_to_all` is differentiable: the gradient of sending rows is receiving their
gradients back, which is again an all-to-all with the splits swapped, so an expert-parallel layer trains.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``send_counts[j]`` rows go from this rank to rank ``j``; returns ``recv_counts[j]``, the rows rank ``j``
    sends to this rank."""
    world = dist.get_world_size(group)
    if send_counts.shape != (world,):
        raise ValueError(f"send_counts has shape {tuple(send_counts.shape)}; allowed: ({world},), one count per rank")
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_x, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_x, None, None, None


def all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Send the first ``send_splits[0]`` rows of ``x`` to rank 0, the next ``send_splits[1]`` to rank 1, …; return
    the rows received, ``recv_splits[j]`` of them from rank ``j``, in rank order. Differentiable."""
    send_splits, recv_splits = [int(n) for n in send_splits], [int(n) for n in recv_splits]
    world = dist.get_world_size(group)
    if len(send_splits) != world or len(recv_splits) != world:
        raise ValueError(f"send_splits has {len(send_splits)} entries and recv_splits {len(recv_splits)}; "
                         f"allowed: {world} each, one per rank")
    if sum(send_splits) != x.shape[0]:
        raise ValueError(f"send_splits add up to {sum(send_splits)} rows but x has {x.shape[0]}; allowed: equal")
    return _AllToAll.apply(x, send_splits, recv_splits, group)
