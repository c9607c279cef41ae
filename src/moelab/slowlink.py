"""Data parallelism for slow links: an INT8 all-reduce with error feedback, and DiLoCo's outer step.

**INT8 all-reduce** (INTELLECT-1 sends its pseudo-gradients this way): a ring reduce-scatter whose every message
is the chunk quantised to INT8 with one fp32 scale per 1×128 tile (the receiver dequantises, adds in fp32, and
quantises the sum again for the next hop), then a ring all-gather of the finished chunks, quantised once — so
every rank ends with the same numbers. Each rank sends ``2(p−1)/p`` of the buffer at ``1 + 4/128`` bytes a value
instead of 4: 0.258 of the fp32 ring all-reduce's bytes.

**Error feedback** (Seide et al. 2014; Karimireddy et al. 2019): what one step's compression dropped is added to the
next step's input, so that no part of the gradient is lost for good, only delayed.

**DiLoCo** (Douillard et al. 2023): every worker takes ``H`` inner steps alone from the shared parameters
``θ``; then the *pseudo-gradient* ``Δ = θ − θ_local`` (old global minus new local: the direction the workers moved,
negated like a gradient) is averaged over the workers and an outer optimizer (Nesterov SGD) steps ``θ`` with it.
With ``H = 1``, an inner SGD step, outer lr 1 and no momentum this is plain data parallel SGD; with any ``H``,
outer lr 1 and no momentum it is **local SGD** (Stich 2019; Lin et al. 2020): the new parameters are the workers'
average.

**Over an emulated network.** :class:`LinkGroup` is a process group whose all-reduce is the ring of
:mod:`moelab.collectives` over a :class:`~moelab.network.Network`. Torch's own DDP communication hooks —
``allreduce_hook``, ``fp16_compress_hook``, ``powerSGD_hook`` (Vogels et al. 2019) — take it as their process
group, so their every byte crosses the emulated links and is counted per link class; :func:`int8_hook` is the
INT8 all-reduce with error feedback as a DDP hook. (Torch's ``bf16_compress_hook`` would fit too, but it refuses
to run on gloo: "BF16 all reduce communication hook required CUDA 11+ and NCCL 2.10+".) :func:`ring_bytes` and
:func:`powersgd_sizes` count what each method must send, for the tests. Built in
notebooks/08_slow_link_training.ipynb.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import quant
from .collectives import (Codec, chunk_sizes, ring_all_gather_in_place, ring_all_reduce,
                          ring_reduce_scatter_in_place)
from .network import Link, Network, cost
from .timeline import Timeline

BLOCK = 128


def _int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` (flat) as packed bytes: INT8 values and fp32 scales per 1×128 tile."""
    return quant.pack(*quant.quantize(x.view(1, -1), "int8", BLOCK))


def _fp32(packed: torch.Tensor, n: int) -> torch.Tensor:
    q, scales = quant.unpack(packed, n, "int8")
    return quant.dequantize(q, scales, BLOCK).view(-1)


INT8 = Codec(encode=_int8, decode=_fp32,
             empty=lambda n: torch.empty(1, quant.packed_bytes(n, BLOCK), dtype=torch.uint8))


def int8_all_reduce(x: torch.Tensor, net: Network | None = None, timeline: Timeline | None = None) -> torch.Tensor:
    """The sum of ``x`` over the ranks, every message in INT8 with 1×128 scales (see the module docstring). The
    result is the same on every rank; its error is a few quantisation steps of the partial sums."""
    p, r = dist.get_world_size(), dist.get_rank()
    ranks = list(range(p))
    sizes = chunk_sizes(x.numel(), p)
    chunks = ring_reduce_scatter_in_place(x.detach().float().flatten().clone(), ranks, net, timeline, codec=INT8)
    packed = [INT8.empty(n) for n in sizes]                   # all-gather of the quantised sums, encoded once
    packed[r] = INT8.encode(chunks[r])
    ring_all_gather_in_place(packed, ranks, net, timeline)
    return torch.cat([INT8.decode(b, n) for b, n in zip(packed, sizes)]).view_as(x).to(x.dtype)


class ErrorFeedback:
    """Error feedback for a lossy all-reduce: :meth:`compress` adds the residual kept from last time, rounds the
    sum to what the INT8 wire carries exactly, and keeps what rounding dropped for next time."""

    def __init__(self) -> None:
        self.residual: dict[int, torch.Tensor] = {}

    def compress(self, key: int, g: torch.Tensor, pieces: list[int] | None = None) -> torch.Tensor:
        """``g`` plus the residual kept under ``key``, rounded to INT8 tiles; with ``pieces`` (sizes), each piece's
        tiles start at the piece (give the ring's chunks, and the ring's first rounding finds (almost) nothing
        left to drop)."""
        v = g.detach().float().flatten() + self.residual.get(key, 0.0)
        sent = torch.cat([_fp32(_int8(piece), piece.numel()) for piece in v.split(pieces or [v.numel()])])
        self.residual[key] = v - sent
        return sent.view_as(g)


def pseudo_gradients(global_params: list[torch.Tensor], local_params: list[torch.Tensor]) -> list[torch.Tensor]:
    """DiLoCo's ``Δ = θ_global − θ_local`` for each parameter: where the worker moved, with a gradient's sign (an
    SGD step with it moves ``θ_global`` towards the worker)."""
    return [g.detach() - l.detach() for g, l in zip(global_params, local_params)]


def outer_step(global_params: list[torch.Tensor], local_params: list[torch.Tensor],
               outer_opt: torch.optim.Optimizer, all_reduce=None) -> int:
    """One DiLoCo outer step on every rank: average the pseudo-gradients over the ranks (``all_reduce(t) -> sum``,
    by default ``dist.all_reduce``; e.g. :func:`int8_all_reduce`), step ``global_params`` with ``outer_opt``, and
    copy the new global parameters into the local ones. Returns the number of values all-reduced."""
    world = dist.get_world_size()
    deltas = pseudo_gradients(global_params, local_params)
    flat = torch.cat([d.flatten() for d in deltas])
    if all_reduce is None:
        dist.all_reduce(flat)
    else:
        flat = all_reduce(flat)
    flat = flat / world
    for g, d in zip(global_params, flat.split([d.numel() for d in deltas])):
        g.grad = d.view_as(g).clone()
    outer_opt.step()
    outer_opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for g, l in zip(global_params, local_params):
            l.copy_(g)
    return flat.numel()


def ring_bytes(n: int, p: int, rank: int, message_bytes=lambda k: 4 * k) -> int:
    """Bytes ``rank`` sends in a ring all-reduce of ``n`` values over ``p`` ranks (chunks as
    :func:`~moelab.collectives.chunk_sizes`), a chunk of ``k`` values costing ``message_bytes(k)``: in the
    reduce-scatter it sends every chunk but its own, in the all-gather every chunk but its right neighbour's."""
    sizes = chunk_sizes(n, p)
    return sum(message_bytes(sizes[c]) for c in range(p) if c != rank) + \
        sum(message_bytes(sizes[c]) for c in range(p) if c != (rank + 1) % p)


def int8_message_bytes(k: int) -> int:
    """Bytes of a chunk of ``k`` values on the INT8 wire: ``k`` INT8 values and an fp32 scale per 128."""
    return quant.packed_bytes(k, BLOCK)


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


def data_parallel_step(params: float, tokens: float, nodes: int, link: Link, flops: float,
                       H: int = 100) -> dict[str, float]:
    """Seconds per step of data parallelism across ``nodes`` nodes joined by ``link`` (each node's bandwidth to
    the others): ``compute``, ``6 · params · tokens`` FLOPs (Kaplan et al. 2020: forward 2, backward 4 per
    parameter per token) at ``flops`` per second for a node's ``tokens``; ``all_reduce``, the ring all-reduce of
    the fp32 gradients (:func:`moelab.network.cost`, not overlapped with the compute); and ``diloco_int8``, the
    ring all-reduce of INT8 pseudo-gradients (1 + 4/128 bytes a value) every ``H`` steps, per step."""
    return {"compute": 6 * params * tokens / flops,
            "all_reduce": cost("ring_all_reduce", 4 * params, nodes, link),
            "diloco_int8": cost("ring_all_reduce", params * (1 + 4 / BLOCK), nodes, link) / H}
