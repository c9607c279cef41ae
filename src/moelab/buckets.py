"""Gradient buckets all-reduced while backward goes on: data parallelism that hides its communication.

Backward produces gradients from the last layer to the first. DDP (Li et al. 2020, §3.2.3) packs the parameters,
in that reverse order, into buckets of about ``bucket_bytes``; a hook on each parameter notes when its gradient is
complete, and when a bucket's last gradient is in, the bucket's all-reduce starts at once (``async_op=True``) while
backward computes the earlier layers' gradients. After backward, waiting for the buckets costs only the part of
their all-reduce that backward did not cover — on a slow link, the last buckets' at least.

:class:`BucketedAllReduce` does this with ``Tensor.register_post_accumulate_grad_hook`` and gloo's asynchronous
all-reduce. On an emulated :class:`~moelab.network.Network` each bucket's all-reduce takes the ring's α-β time
(:func:`moelab.network.cost`) on the slowest link among the ranks, beginning when the last rank launched it, queued
behind the buckets before it; :meth:`BucketedAllReduce.finish` waits for them in order. ``overlap=False`` launches
every bucket after backward instead: the same gradients (tests/test_buckets.py), nothing hidden.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .network import Network, cost, ring_bytes


class Bucket:
    """Parameters whose gradients travel in one all-reduce, and that all-reduce's state once launched."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.ready = params, 0
        self.flat = self.work = self.stamp = self.stamp_work = None
        self.begin = self.seconds = 0.0

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


class BucketedAllReduce:
    """Average the gradients of ``params`` over ``group``'s ranks in buckets of at most ``bucket_bytes`` (a
    parameter larger than that gets a bucket of its own), launched from backward hooks when ``overlap``. Call
    :meth:`finish` after ``backward``; ``launched`` lists ``(bucket index, begin, seconds)`` of the last step on
    the emulated ``net``. One ``backward`` per step: the hooks count each parameter's gradient once."""

    def __init__(self, params, bucket_bytes: int, net: Network | None = None, overlap: bool = True,
                 group: dist.ProcessGroup | None = None):
        if not (isinstance(bucket_bytes, int) and bucket_bytes > 0):
            raise ValueError(f"bucket_bytes = {bucket_bytes!r} is not allowed; allowed: an integer > 0")
        params = [p for p in params if p.requires_grad]
        self.net, self.overlap, self.group = net, overlap, group
        self.world = dist.get_world_size(group)
        self.buckets: list[Bucket] = []
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):                  # backward meets the last parameters first
            nbytes = p.numel() * p.element_size()
            if current and size + nbytes > bucket_bytes:
                self.buckets.append(Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(Bucket(current))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.handles = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params] if overlap else []
        self.launched: list[tuple[int, float, float]] = []

    def _grad_ready(self, p: torch.nn.Parameter) -> None:
        bucket = self.bucket_of[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        for p in bucket.params:
            if p.grad is None:                      # a parameter this step did not reach: its gradient is zero
                p.grad = torch.zeros_like(p)
        bucket.flat = torch.cat([p.grad.flatten() for p in bucket.params])
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        if self.net is not None:
            net, topology = self.net, self.net.topology
            link = net.inter if topology.nodes > 1 else net.intra
            bucket.seconds = cost("ring_all_reduce", bucket.nbytes, self.world, link)
            bucket.begin = max(net.now(), net.clock if net.clock is not None else -float("inf"))
            net.clock = bucket.begin + bucket.seconds          # later buckets queue behind this one
            bucket.stamp = torch.tensor([bucket.begin], dtype=torch.float64)
            bucket.stamp_work = dist.all_reduce(bucket.stamp, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket (launching those not launched yet), average the gradients and write them back."""
        for bucket in self.buckets:
            if bucket.work is None:
                self._launch(bucket)
        self.launched = []
        for i, bucket in enumerate(self.buckets):
            waited_from = self.net.now() if self.net is not None else None
            bucket.work.wait()
            if self.net is not None:
                bucket.stamp_work.wait()
                begin = float(bucket.stamp)                     # the all-reduce starts when its last rank joins
                me = dist.get_rank(self.group)
                size = bucket.flat.element_size()
                self.net.count(me, (me + 1) % self.world,
                               ring_bytes(bucket.flat.numel(), self.world, me, lambda k: k * size))
                self.net.finish_round(bucket.seconds, begin + bucket.seconds, waited_from)
                self.launched.append((i, begin, bucket.seconds))
            for p, g in zip(bucket.params, bucket.flat.split([p.numel() for p in bucket.params])):
                p.grad.copy_(g.view_as(p) / self.world)
            bucket.ready, bucket.flat, bucket.work, bucket.stamp, bucket.stamp_work = 0, None, None, None, None

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for handle in self.handles:
            handle.remove()
