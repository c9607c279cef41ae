"""Data parallelism's gradient step: every rank's gradients summed into the gradient of the whole batch.

Each rank holds its own batch, the replicated parameters (embeddings, attention, norms, routers, shared experts)
and, with expert parallelism, its slice of every MoE layer's experts (:func:`moelab.ep.shard`). The loss to
minimise is the mean of the ranks' losses, so every gradient is divided by the world size; a replicated
parameter's gradient is first summed over the ranks, while an expert's gradient is already complete on the one
rank that holds it: its tokens came from every rank.

All replicated gradients travel in one flat buffer, one all-reduce per step, as DDP's gradient buckets do (Li et al.
2020): one collective per tensor would pay a collective's latency dozens of times. With equal batches per rank, a
step equals one process training on all the ranks' batches together (balancing losses that are means over sequences
or tokens included; the Switch loss, a product of batch means, is not split this way).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from .timeline import Timeline, collective, phase

if TYPE_CHECKING:
    from .model import Transformer


def average_gradients(model: Transformer, grad_clip: float, *, group: dist.ProcessGroup | None = None,
                      all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, replicas: int | None = None,
                      timeline: Timeline | None = None) -> None:
    """Turn this rank's gradients (after ``backward``) into the gradient of the mean loss over the ranks, then clip
    it to norm ``grad_clip`` (if > 0) by the norm of the whole gradient, experts of all ranks included.

    ``all_reduce(flat) -> sum`` replaces ``dist.all_reduce`` (e.g. a ring over an emulated network), summing over
    ``replicas`` ranks (default: all of ``group``): with DiLoCo across nodes the replicated gradients are averaged
    inside a node only, and the clipping norm then counts the experts of that node's ranks. With a ``timeline``,
    the all-reduce is recorded as phase ``"all-reduce"``."""
    world = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is None:                           # a parameter this step did not reach: its gradient is zero
            p.grad = torch.zeros_like(p)
    experts = [p for moe in model.moe_layers if moe.expert_parallel for p in moe.experts.parameters()]
    sharded = {id(p) for p in experts}
    replicated = [p for p in model.parameters() if id(p) not in sharded]
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


def sum_expert_loads(model: Transformer, group: dist.ProcessGroup | None = None) -> None:
    """Sum the expert loads counted since the last step over the ranks, in every MoE layer that holds all its
    experts, so that the aux-loss-free bias update (:meth:`moelab.moe.MoE.after_step`) sees the whole batch's load
    on every rank, as one process would. Expert-parallel layers sum theirs in their dispatcher."""
    for moe in model.moe_layers:
        if not moe.expert_parallel and moe.config.bias_update_speed > 0:
            dist.all_reduce(moe.step_counts, group=group)
