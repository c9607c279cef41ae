"""Torch's DDP over an emulated network: a process group whose all-reduce is our ring, and the INT8 hook.

:class:`LinkGroup` is a process group whose all-reduce is the ring of :mod:`moelab.collectives` over a
:class:`~moelab.network.Network`. Torch's own DDP communication hooks — ``allreduce_hook``, ``fp16_compress_hook``,
``powerSGD_hook`` (Vogels et al. 2019) — take it as their process group, so their every byte crosses the emulated
links and is counted per link class; :func:`int8_hook` is :func:`moelab.compression.int8_all_reduce` with error
feedback as a DDP hook. (Torch's ``bf16_compress_hook`` would fit too, but it refuses to run on gloo: "BF16 all
reduce communication hook required CUDA 11+ and NCCL 2.10+".) :class:`BucketLog` records what DDP handed a hook and
:func:`powersgd_sizes` what PowerSGD must send for it, for the byte counts. Built in
notebooks/10_slow_link_training.ipynb.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .collectives import ring_all_reduce
from .compression import ErrorFeedback, int8_all_reduce
from .network import Network, chunk_sizes


def powersgd_sizes(shapes: list[torch.Size], rank: int, min_compression_rate: float = 2.0) -> tuple[int, int, int]:
    """The values one PowerSGD step all-reduces for a bucket of gradients of these ``shapes``, following torch's
    ``powerSGD_hook``: each tensor is an ``n × m`` matrix (first dimension × the rest), sent as ``P``
    (``n × r``) and ``Q`` (``m × r``) with ``r = min(n, m, rank)`` when that is ``min_compression_rate`` times
    smaller, else uncompressed (vectors always are). Returns ``(uncompressed, P, Q)`` values: three
    all-reduces."""
    plain = p_values = q_values = 0
    for shape in shapes:
        n, m = shape[0], shape.numel() // shape[0]
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:
            p_values, q_values = p_values + n * r, q_values + m * r
        else:
            plain += shape.numel()
    return plain, p_values, q_values


class _Done(dist._Work):
    """A finished piece of work (our collectives complete before they return)."""

    def __init__(self, result) -> None:
        super().__init__()
        self.future = torch.futures.Future()
        self.future.set_result(result)

    def wait(self, timeout=None) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        return self.future


class LinkGroup(dist.ProcessGroup):
    """All ranks of the default group, with an all-reduce (sum) that is :func:`moelab.collectives.ring_all_reduce`
    over ``net``: give it to torch's DDP communication hooks as their process group. Its messages travel on the
    default group (gloo or NCCL), with that group's timeout."""

    def __init__(self, net: Network) -> None:
        super().__init__(dist.get_rank(), dist.get_world_size())
        self.net = net

    def allreduce(self, tensors: list[torch.Tensor], opts) -> dist._Work:
        if opts.reduceOp != dist.ReduceOp.SUM:
            raise ValueError(f"LinkGroup.allreduce: op = {opts.reduceOp} is not allowed; allowed: SUM")
        for t in tensors:
            t.copy_(ring_all_reduce(t, self.net))
        return _Done(tensors)

    def getBackendName(self) -> str:
        return "emulated"


@dataclass
class Int8HookState:
    """State of :func:`int8_hook`: the network to send over and the error feedback's residuals."""

    net: Network | None = None
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)


def int8_hook(state: Int8HookState, bucket):      # no annotations: DDP checks them, and here they are strings
    """A DDP communication hook (``bucket``: a ``dist.GradBucket``; returns a future of the averaged bucket):
    the bucket's gradients averaged by :func:`int8_all_reduce` over ``state.net``, after error feedback rounded
    them, chunk by chunk, to what the INT8 wire carries (so what the first hop drops is sent later, not lost)::

        ddp_model.register_comm_hook(Int8HookState(net), int8_hook)"""
    g = state.feedback.compress(bucket.index(), bucket.buffer(), chunk_sizes(bucket.buffer().numel(),
                                                                             dist.get_world_size()))
    average = int8_all_reduce(g, state.net) / dist.get_world_size()
    future = torch.futures.Future()
    future.set_result(average.to(bucket.buffer().dtype))
    return future


@dataclass
class BucketLog:
    """What DDP handed a communication hook: for each call, the bucket's number of values and its gradients'
    shapes (from which :func:`ring_bytes` and :func:`powersgd_sizes` say what the hook must send)."""

    calls: list[tuple[int, list[torch.Size]]] = field(default_factory=list)


def logged(hook, log: BucketLog):
    """``hook``, recording every bucket in ``log`` before it runs: ``ddp.register_comm_hook(state,
    logged(fp16_compress_hook, log))``."""
    def hook_with_log(state, bucket):                   # unannotated, as int8_hook
        log.calls.append((bucket.buffer().numel(), [g.shape for g in bucket.gradients()]))
        return hook(state, bucket)
    return hook_with_log
