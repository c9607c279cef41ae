"""A round of point-to-point messages posted now and waited for later: communication in flight while a rank computes.

:func:`post` starts every send and receive of a round (one ``batch_isend_irecv``) and returns at once; the rank
goes on computing while gloo or NCCL move the bytes, and :meth:`Round.wait` blocks only until they have arrived.
That is all an asynchronous collective is (``async_op=True`` in ``torch.distributed``), and what DeepSeek-V3's
DualPipe and PyTorch's DDP use to hide communication behind computation.

On an emulated :class:`~moelab.network.Network` the round has an emulated duration too: it begins when it is
posted, or when the rank's link is free of the rounds posted before it (they queue on the link), and its
messages arrive ``α + n/β`` after that (a message cannot leave before its sender posted it: each carries its
sender's begin). The computation in between does not slow it, and waiting for it costs only what is left of it:
on a virtual network, ``wait`` moves the simulated clock to the later of its arrival and the moment the rank
started waiting, whatever the loopback transfer took. :func:`moelab.collectives.exchange` is a round posted and
waited for at once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .network import Network

Message = tuple[int, torch.Tensor]                      # (peer rank, tensor to send or buffer to receive into)


class Round:
    """A posted round (:func:`post`). After :meth:`wait`: ``begin`` and ``end`` on the emulated network (the
    network's clock; 0 without one), ``sent`` and ``received`` bytes."""

    def __init__(self, sends: list[Message], recvs: list[Message], order: list[int], net: Network | None,
                 reserve: bool):
        self.sends, self.recvs, self.order, self.net = sends, recvs, order, net
        self.sent = sum(t.numel() * t.element_size() for _, t in sends)
        self.received = sum(t.numel() * t.element_size() for _, t in recvs)
        self.begin = self.end = 0.0
        ops = [dist.P2POp(dist.isend, t, peer) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for peer, t in recvs]
        if net is not None:                          # each message carries when its round began on the sender
            self.me = dist.get_rank()
            self.sizes = [(peer, t.numel() * t.element_size()) for peer, t in sends]
            self.recv_sizes = [(peer, t.numel() * t.element_size()) for peer, t in recvs]
            self.round_time = net.round_time(self.me, self.sizes, self.recv_sizes)
            self.begin = net.begin(net.now(), self.round_time)
            if reserve:                              # the link is busy until this round is through
                net.clock = self.begin + self.round_time
            device = (sends or recvs)[0][1].device if sends or recvs else torch.device("cpu")
            self.stamp = torch.tensor([self.begin], dtype=torch.float64, device=device)
            senders = sorted({peer for peer, _ in recvs})
            self.stamps = {peer: torch.empty(1, dtype=torch.float64, device=device) for peer in senders}
            ops += [dist.P2POp(dist.isend, self.stamp, peer) for peer in sorted({peer for peer, _ in sends})]
            ops += [dist.P2POp(dist.irecv, self.stamps[peer], peer) for peer in senders]
        self.requests: list | None = dist.batch_isend_irecv(ops) if ops else []

    def wait(self, arrived: Callable[[int], None] | None = None, overlapped: bool = True) -> None:
        """Block until every message has arrived (``arrived(j)`` runs as receive ``j`` completes, while later ones
        may still be in flight); a second call returns at once. On the emulated network the round ends at its
        arrival; ``overlapped`` (the rank computed since :func:`post`): at the later of that and now, the real
        wait not counted."""
        if self.requests is None:                    # waited for already (a gloo request waits only once)
            return
        waited_from = self.net.now() if self.net is not None and overlapped else None
        n_sends, n_recvs = len(self.sends), len(self.recvs)
        for j, request in zip(self.order, self.requests[n_sends:n_sends + n_recvs]):
            request.wait()
            if arrived is not None:
                arrived(j)
        for request in self.requests[:n_sends] + self.requests[n_sends + n_recvs:]:
            request.wait()
        if self.net is not None:
            for peer, n in self.sizes:
                self.net.count(self.me, peer, n)
            self.end = self.net.round_end(self.me, self.begin, self.sizes, self.recv_sizes,
                                          {peer: float(t) for peer, t in self.stamps.items()})
            self.net.finish_round(self.round_time, self.end, waited_from)
        self.requests = None


def post(sends: Sequence[Message], recvs: Sequence[Message], net: Network | None = None,
         reserve: bool = True) -> Round:
    """Start one round: every send and receive at once; returns without waiting. Empty tensors are skipped on both
    sides (both know the sizes). On ``net``, with ``reserve``, rounds posted later queue behind this one."""
    order = [j for j, (_, t) in enumerate(recvs) if t.numel()]
    return Round([(peer, t.contiguous()) for peer, t in sends if t.numel()], [recvs[j] for j in order], order,
                 net, reserve)


class InFlight:
    """A whole collective in flight on the emulated network (:func:`in_flight`): its result, and when it began and
    arrives on this rank's simulated clock."""

    def __init__(self, result, net: Network | None, begin: float, end: float, round_time: float):
        self.result, self.net, self.begin, self.end, self.round_time = result, net, begin, end, round_time
        self.waited = False

    def wait(self):
        """The collective's result; on the network, the clock moves to its arrival if the rank gets there first
        (waiting costs only what is left). A second call returns at once."""
        if self.net is not None and not self.waited:
            self.net.finish_round(0.0, self.end, self.net.now())
            self.net.link_seconds += self.round_time
        self.waited = True
        return self.result


def in_flight(collective: Callable[[Network | None], object], net: Network | None = None) -> InFlight:
    """Start ``collective(net)`` (a collective of several rounds, e.g. a ring all-reduce) as if it were
    asynchronous: the ranks exchange the data now, but on the emulated network this rank's clock goes back to
    when the collective began, and :meth:`InFlight.wait` moves it to the collective's end only when the rank
    waits. The rounds' own rules hold meanwhile (a late rank delays everyone's arrival; collectives started
    later queue behind it on the link). The result must not be used before :meth:`InFlight.wait`, as with an
    ``async_op=True`` collective, whose result is only there after ``wait``."""
    if net is None:
        return InFlight(collective(None), None, 0.0, 0.0, 0.0)
    begin, link_seconds = net.now(), net.link_seconds
    result = collective(net)
    end, round_time = net.now(), net.link_seconds - link_seconds
    net.offset -= end - begin                                # the rank goes on computing from when it began
    net.link_seconds = link_seconds                          # counted when waited for
    return InFlight(result, net, begin, end, round_time)
