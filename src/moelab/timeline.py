"""Per-rank timelines: when each phase of a step ran on a rank, and how many bytes it moved.

    tl = Timeline()
    start_together(tl)                    # on every rank: one time zero for all of them
    with tl.phase("dispatch") as event:
        ...                               # the work
        event.sent += n_bytes             # what the phase sent to other ranks
    tl.events                             # [Event('dispatch', start, end, sent, received, local, rows)]

A phase is timed with ``time.perf_counter`` (on CUDA after a ``torch.cuda.synchronize``, so that queued kernels
count where they run). Processes on one machine read the same monotonic clock, so :func:`start_together` gives
every rank the same time zero, and the events of all ranks can be drawn on one time axis
(:func:`moelab.viz.plot_timeline`), as Nsight Systems or the PyTorch profiler's trace view draw them. Time spent
inside a collective includes the time spent waiting for the slowest rank to get there: that wait is what load
imbalance costs.
"""
from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class Event:
    """One phase on one rank: ``start`` and ``end`` in seconds since the timeline started; bytes of payload sent
    to and received from *other* ranks, bytes that stayed on this rank (``local``: rows for its own experts),
    ``rows`` of work done (tokens through an expert), and ``comm``, the seconds of the phase spent inside
    collectives (moving data, or waiting for the other ranks to arrive)."""

    phase: str
    start: float = 0.0
    end: float = 0.0
    sent: int = 0
    received: int = 0
    local: int = 0
    rows: int = 0
    comm: float = 0.0

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Timeline:
    """The events of one rank, in the order they ended. ``cuda=True`` synchronises the GPU at phase boundaries."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.events: list[Event] = []
        self.t0 = time.perf_counter()

    def restart(self, t0: float | None = None) -> None:
        """Forget the events and start the clock again: at ``t0`` (a ``time.perf_counter`` reading), or now."""
        self.events.clear()
        self._sync()
        self.t0 = time.perf_counter() if t0 is None else t0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        """Seconds since the start (after the GPU's queued work, on CUDA)."""
        self._sync()
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Event]:
        """Time the body as phase ``name``; the body may add bytes and rows to the event it is given."""
        self._sync()
        event = Event(name, start=time.perf_counter() - self.t0)
        yield event
        self._sync()
        event.end = time.perf_counter() - self.t0
        self.events.append(event)

    @contextlib.contextmanager
    def collective(self, event: Event) -> Iterator[None]:
        """Add the time the body takes to ``event.comm`` (the body is a collective)."""
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        event.comm += time.perf_counter() - start

    def totals(self) -> dict[str, dict[str, float]]:
        """Per phase, in order of first appearance: total ``seconds``, ``sent``, ``received``, ``local``, ``rows``,
        ``comm``."""
        out: dict[str, dict[str, float]] = {}
        for e in self.events:
            t = out.setdefault(e.phase, dict(seconds=0.0, sent=0, received=0, local=0, rows=0, comm=0.0))
            t["seconds"] += e.seconds
            for key in ("sent", "received", "local", "rows", "comm"):
                t[key] += getattr(e, key)
        return out

    def to_list(self) -> list[dict]:
        """The events as plain dicts (for JSON, or to send from a rank)."""
        return [asdict(e) for e in self.events]


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward notes the time in ``event``. On a phase's output the gradient passes first: the
    backward phase starts. On the phase's input it passes last: the phase ends, and the event is recorded."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, timeline: Timeline, event: Event, at_input: bool) -> torch.Tensor:
        ctx.timeline, ctx.event, ctx.at_input = timeline, event, at_input
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        now = ctx.timeline.now()
        if ctx.at_input:
            ctx.event.end = now
            ctx.timeline.events.append(ctx.event)
        else:
            ctx.event.start = now
        return grad, None, None, None


def backward_phase(timeline: Timeline | None, event: Event, inputs: torch.Tensor, run):
    """``run(inputs)``, with the backward pass from its output to ``inputs`` recorded on ``timeline`` as ``event``
    (e.g. phase ``"expert backward"``), by two identity autograd functions that note the time when the gradient
    passes them. Without a timeline, or when nothing needs a gradient, it is just ``run(inputs)``."""
    if timeline is None or not torch.is_grad_enabled() or not inputs.requires_grad:
        return run(inputs)
    return _BackwardMark.apply(run(_BackwardMark.apply(inputs, timeline, event, True)), timeline, event, False)


_ONE_MACHINE: dict = {}                  # process group -> whether all its ranks run on this machine


def _one_machine(group: dist.ProcessGroup | None) -> bool:
    if group not in _ONE_MACHINE:
        hosts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        _ONE_MACHINE[group] = len(set(hosts)) == 1
    return _ONE_MACHINE[group]


def start_together(timeline: Timeline, group: dist.ProcessGroup | None = None) -> None:
    """Restart ``timeline`` on every rank of ``group`` with one common time zero. After a barrier the ranks leave
    it at slightly different moments (up to milliseconds when there are more ranks than cores), so each reads
    the clock and they agree on the latest reading (one small all-reduce): the moment the last rank was free to
    start. That needs a clock they share, which ranks on one machine have; across machines each rank starts at
    its own exit from the barrier instead."""
    shared = _one_machine(group)
    dist.barrier(group=group)
    reading = torch.tensor([time.perf_counter()], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        reading = reading.cuda()
    if shared:
        dist.all_reduce(reading, op=dist.ReduceOp.MAX, group=group)
    timeline.restart(float(reading))


def phase(timeline: Timeline | None, name: str) -> contextlib.AbstractContextManager[Event]:
    """``timeline.phase(name)``, or, without a timeline, a context that records nothing (the body still gets an
    :class:`Event` to write its counts into)."""
    return timeline.phase(name) if timeline is not None else contextlib.nullcontext(Event(name))


def collective(timeline: Timeline | None, event: Event) -> contextlib.AbstractContextManager[None]:
    """``timeline.collective(event)``, or nothing without a timeline."""
    return timeline.collective(event) if timeline is not None else contextlib.nullcontext()
