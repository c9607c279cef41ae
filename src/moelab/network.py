"""The network under the collectives: link classes, a two-level topology, the α-β cost model, and an emulator.

**α-β model** (Hockney 1994; Thakur, Rabenseifner & Gropp 2005): a message of ``n`` bytes over a link costs
``α + n/β`` — a latency per message plus the bytes at the link's bandwidth. A collective's cost is the sum over
its rounds of the slowest message in each round. :func:`cost` gives the formula of every algorithm in
:mod:`moelab.collectives` (the MPICH comments' formulas, reduction arithmetic left out); :func:`bus_bandwidth`
converts a measured time to nccl-tests' *bus bandwidth*, comparable across rank counts.

**Emulated links.** On one laptop every message travels over loopback. A :class:`Network` makes the link
between two ranks a class — fast inside a node ("NVLink"), slow between nodes ("25 GbE") — and every round of
messages of the collectives takes at least the α-β time of its slowest message: after the real transfer the
rank sleeps for the rest (:meth:`Network.begin` says when the round began). It also counts the bytes and messages
each rank sent, per link class. So a learner runs the same collective over two networks and sees the model's
prediction come true.

**Virtual time.** A training run over a slow link would sleep for minutes; with ``virtual=True`` the network
sleeps not at all and keeps a *simulated* clock instead (:meth:`Network.now`): the real clock, except that every
round's loopback time is replaced by its α-β time on the emulated links (late senders included, as above). The
computation between rounds is measured as it runs; :meth:`Network.paused` leaves out what should not count
(evaluation, say). ``link_seconds`` adds up the α-β time of the rounds alone. With ``cpu_time=True`` the
computation is measured in the rank's own CPU time (``time.thread_time``) instead of the wall clock, as if every
rank had a core to itself: four ranks on a two-core laptop otherwise slow each other down by how many of them
happen to compute at once, which would blur what overlapping communication with computation saves. ``speed``
makes a rank slower or faster than this machine: its computation counts ``1/speed`` times on the virtual clock
(0.5: a device of half the speed, an older generation in the same job).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Link:
    """A link class: ``alpha`` seconds per message, ``beta`` bytes per second."""

    name: str
    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"Link {self.name!r}: alpha = {self.alpha!r} is not allowed; allowed: seconds >= 0")
        if not (self.beta > 0):
            raise ValueError(f"Link {self.name!r}: beta = {self.beta!r} is not allowed; allowed: bytes/s > 0")

    def time(self, nbytes: float) -> float:
        """``α + n/β``: seconds for one message of ``nbytes``."""
        return self.alpha + nbytes / self.beta


@dataclass(frozen=True)
class Topology:
    """``nodes`` nodes of ``per_node`` ranks each; rank ``r`` is local rank ``r % per_node`` of node
    ``r // per_node`` (as ``torchrun`` numbers ranks node by node)."""

    nodes: int
    per_node: int

    def __post_init__(self) -> None:
        for name in ("nodes", "per_node"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Topology: {name} = {value!r} is not allowed; allowed: an integer >= 1")

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    def node(self, rank: int) -> int:
        return rank // self.per_node

    def local(self, rank: int) -> int:
        return rank % self.per_node

    def rank(self, node: int, local: int) -> int:
        return node * self.per_node + local

    def node_ranks(self, node: int) -> list[int]:
        return [self.rank(node, i) for i in range(self.per_node)]

    def peers(self, local: int) -> list[int]:
        """The ranks with local index ``local`` on every node: the ones that talk across the slow links."""
        return [self.rank(n, local) for n in range(self.nodes)]


# Illustrative link classes, scaled down so that their delays dominate what loopback itself costs on a laptop
# (gloo between 4 processes on 2 cores: ~1-2 ms per round, 100-500 MB/s): the *ratio* is what they teach, a
# slow link 10× below the fast one in bandwidth and 5× above it in latency. For scale: NVLink on an H800
# carries 160 GB/s as DeepSeek measured it, InfiniBand 50 GB/s (3.2× less), 25 GbE about 3 GB/s (50× less).
FAST = Link("fast", alpha=1e-3, beta=100e6)
SLOW = Link("slow", alpha=5e-3, beta=10e6)


@dataclass
class Network:
    """An emulated two-level network: ``intra`` links inside a node, ``inter`` links between nodes. Every rank has
    its own link to each peer (one NIC per GPU, as DeepSeek-V3's nodes have 8 NICs for 8 GPUs); a node whose
    ranks share one NIC would be slower than this model.

    :func:`moelab.collectives.exchange` asks it how long each round must take (:meth:`round_time`) and reports
    each message it sent (:meth:`count`); ``sent_bytes`` and ``messages`` are per link class name. With
    ``virtual`` it does not sleep but keeps simulated time (see the module docstring)."""

    topology: Topology
    intra: Link = FAST
    inter: Link = SLOW
    virtual: bool = False
    cpu_time: bool = False
    speed: float = 1.0
    sent_bytes: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    clock: float | None = None          # time (:meth:`now`) at which this rank's last round ended
    offset: float = 0.0                 # simulated minus real time (virtual networks)
    link_seconds: float = 0.0           # the α-β time of all rounds so far

    def __post_init__(self) -> None:
        if self.cpu_time and not self.virtual:
            raise ValueError("Network: cpu_time = True is not allowed with virtual = False (a rank cannot sleep in CPU "
                             "time); allowed: cpu_time with a virtual network")
        if not (isinstance(self.speed, (int, float)) and 0 < self.speed < float("inf")):
            raise ValueError(f"Network: speed = {self.speed!r} is not allowed; allowed: a number > 0")
        if self.speed != 1 and not self.virtual:
            raise ValueError("Network: speed != 1 is not allowed with virtual = False (the real clock runs at this "
                             "machine's speed); allowed: a speed with a virtual network")
        self.reset()

    def now(self) -> float:
        """This rank's time on the network: ``perf_counter()`` (``thread_time()`` with ``cpu_time``), divided by
        ``speed`` and shifted on a virtual network."""
        return self._real() / self.speed + self.offset

    def _real(self) -> float:
        return time.thread_time() if self.cpu_time else time.perf_counter()

    def finish_round(self, round_time: float, end: float, waited_from: float | None = None) -> None:
        """A round is over on this rank; on the emulated links it ends at ``end``: sleep until then, or on a
        virtual network move the simulated clock there (earlier or later than the real clock). A round that was
        in flight while the rank computed (:mod:`moelab.rounds`) ends at the later of ``end`` and
        ``waited_from``, when the rank began to wait for it."""
        self.link_seconds += round_time
        target = end if waited_from is None else max(end, waited_from)
        if self.virtual:
            self.offset += target - self.now()
        else:
            time.sleep(max(0.0, target - self.now()))       # one reading of the clock: it may pass target meanwhile
        self.clock = max(end, self.now(), self.clock if self.clock is not None else end)

    def set_speed(self, speed: float) -> None:
        """From now on count this rank's computation ``1/speed`` times (a straggler's slow spell, and its end);
        the clock does not jump."""
        if not (isinstance(speed, (int, float)) and 0 < speed < float("inf")):
            raise ValueError(f"Network: speed = {speed!r} is not allowed; allowed: a number > 0")
        if not self.virtual:
            raise ValueError("Network.set_speed: virtual = False is not allowed; allowed: a virtual network")
        now = self.now()
        self.speed = speed
        self.offset = now - self._real() / speed

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block out of the record (work that is not part of the run being timed, such as evaluation):
        a virtual network's clock stops, and the bytes, messages and link time of any rounds in the block are
        not counted."""
        if not self.virtual:
            raise ValueError("Network.paused: virtual = False is not allowed; allowed: a virtual network")
        start = self._real()
        saved = dict(self.sent_bytes), dict(self.messages), self.clock, self.offset, self.link_seconds
        try:
            yield
        finally:
            self.sent_bytes, self.messages, self.clock, self.offset, self.link_seconds = saved
            self.offset -= (self._real() - start) / self.speed

    def link(self, a: int, b: int) -> Link:
        return self.intra if self.topology.node(a) == self.topology.node(b) else self.inter

    def round_time(self, me: int, sends: list[tuple[int, int]], recvs: list[tuple[int, int]]) -> float:
        """The α-β time of a round of concurrent ``(peer, bytes)`` messages, all starting together: messages to
        (or from) the same peer share a link and add up, one α for them all (they are pieces of one transfer);
        links to different peers work in parallel, so the round takes as long as its busiest link."""
        return max((t for _, t in self._per_link(me, sends, recvs)), default=0.0)

    def _per_link(self, me: int, sends, recvs) -> list[tuple[tuple[str, int], float]]:
        per_link: dict[tuple[str, int], int] = {}
        for direction, messages in (("send", sends), ("recv", recvs)):
            for peer, n in messages:
                per_link[direction, peer] = per_link.get((direction, peer), 0) + n
        return [(key, self.link(me, key[1]).time(n)) for key, n in per_link.items()]

    def round_end(self, me: int, begin: float, sends, recvs, sender_begins: dict[int, float]) -> float:
        """When a round ends on the emulated network: what this rank sends is done ``α + n/β`` after the round
        began here; what it receives, ``α + n/β`` after the round began on the sender (``sender_begins``, which
        travels with the messages), so a rank that waited for a late sender also waits for its transfer."""
        ends = [(begin if direction == "send" else sender_begins[peer]) + t
                for (direction, peer), t in self._per_link(me, sends, recvs)]
        return max(ends, default=begin)

    def begin(self, now: float, round_time: float) -> float:
        """When a round that starts ``now`` begins on the emulated network: at the end of this rank's previous
        round if the rank went straight on (less than one round's time later), so that the software's own work
        between rounds overlaps the link's time, as a NIC's transfers overlap the CPU's; otherwise ``now``."""
        if self.clock is not None and now - self.clock < round_time:
            return self.clock
        return now

    def count(self, me: int, peer: int, nbytes: int) -> None:
        name = self.link(me, peer).name
        self.sent_bytes[name] = self.sent_bytes.get(name, 0) + nbytes
        self.messages[name] = self.messages.get(name, 0) + 1

    def reset(self) -> None:
        """Zero the counters and the clocks (all ranks together, after a barrier: simulated clocks restart from the
        real one, or from zero in CPU time, which every rank counts from its own start)."""
        self.sent_bytes.clear()
        self.messages.clear()
        self.clock = None
        real = self._real()                             # now() starts at 0 (CPU time) or the real clock
        self.offset = (0.0 if self.cpu_time else real) - real / self.speed
        self.link_seconds = 0.0


def chunk_sizes(n: int, p: int) -> list[int]:
    """``n`` elements in ``p`` chunks whose sizes differ by at most one, larger first (as ``torch.tensor_split``)."""
    return [n // p + (1 if i < n % p else 0) for i in range(p)]


def ring_bytes(n: int, p: int, rank: int, message_bytes=lambda k: 4 * k) -> int:
    """Bytes ``rank`` sends in a ring all-reduce of ``n`` values over ``p`` ranks (chunks as
    :func:`chunk_sizes`), a chunk of ``k`` values costing ``message_bytes(k)``: in the
    reduce-scatter it sends every chunk but its own, in the all-gather every chunk but its right neighbour's."""
    sizes = chunk_sizes(n, p)
    return sum(message_bytes(sizes[c]) for c in range(p) if c != rank) + \
        sum(message_bytes(sizes[c]) for c in range(p) if c != (rank + 1) % p)


def add_by_class(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Several ranks' :attr:`Network.sent_bytes` (or messages) added up per link class."""
    total: dict[str, int] = {}
    for count in counts:
        for name, n in count.items():
            total[name] = total.get(name, 0) + n
    return total


ALGORITHMS = ("ring_all_reduce", "halving_doubling_all_reduce", "ring_reduce_scatter", "ring_all_gather",
              "tree_broadcast", "tree_reduce", "pairwise_all_to_all", "hierarchical_all_reduce",
              "hierarchical_all_to_all")


def cost(algorithm: str, nbytes: float, p: int, link: Link, topology: Topology | None = None,
         inter: Link | None = None) -> float:
    """Predicted seconds of ``algorithm`` on ``p`` ranks for a buffer of ``nbytes`` per rank (for all-to-all: the
    whole send buffer, split evenly over the ranks, this rank's own share included; for all-gather: the
    gathered buffer), every message over ``link``. The hierarchical algorithms take a ``topology`` and the
    ``inter``-node link; ``link`` is then the intra-node one. Chunks are assumed equal (``nbytes / p``)."""
    lg = math.ceil(math.log2(p)) if p > 1 else 0
    a, b = link.alpha, 1.0 / link.beta
    if algorithm == "ring_reduce_scatter" or algorithm == "ring_all_gather":
        return (p - 1) * (a + nbytes / p * b)
    if algorithm == "ring_all_reduce":
        return 2 * (p - 1) * (a + nbytes / p * b)
    if algorithm == "halving_doubling_all_reduce":
        pof2 = 1 << (p.bit_length() - 1)
        steps = int(math.log2(pof2))
        fold = 2 * (a + nbytes * b) if pof2 < p else 0.0          # fold in and out the ranks beyond 2^⌊lg p⌋
        return fold + 2 * steps * a + 2 * (pof2 - 1) / pof2 * nbytes * b
    if algorithm in ("tree_broadcast", "tree_reduce"):
        return lg * (a + nbytes * b)
    if algorithm == "pairwise_all_to_all":
        return (p - 1) * (a + nbytes / p * b)
    if algorithm == "hierarchical_all_to_all":
        if topology is None or inter is None:
            raise ValueError("hierarchical_all_to_all needs topology and inter; allowed: a Topology and a Link")
        G, N = topology.per_node, topology.nodes
        return (N - 1) * inter.time(nbytes * G / p) + (G - 1) * link.time(nbytes * N / p)
    if algorithm == "hierarchical_all_reduce":
        if topology is None or inter is None:
            raise ValueError("hierarchical_all_reduce needs topology and inter; allowed: a Topology and a Link")
        G, N = topology.per_node, topology.nodes
        intra = 2 * (G - 1) * (a + nbytes / G * b)
        return intra + 2 * (N - 1) * inter.time(nbytes / G / N)
    raise ValueError(f"algorithm = {algorithm!r} is not allowed; allowed: {', '.join(ALGORITHMS)}")


BUS_FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
               "all_gather": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
               "broadcast": lambda n: 1.0, "reduce": lambda n: 1.0}


def bus_bandwidth(collective: str, nbytes: float, seconds: float, p: int) -> float:
    """nccl-tests' bus bandwidth (bytes/s): ``algbw = S / t`` times the collective's factor (``2(n−1)/n`` for
    all-reduce, ``(n−1)/n`` for reduce-scatter, all-gather and all-to-all, 1 for broadcast and reduce), so that
    it can be compared with a link's bandwidth whatever the number of ranks (nccl-tests, doc/PERFORMANCE.md)."""
    if collective not in BUS_FACTORS:
        raise ValueError(f"collective = {collective!r} is not allowed; allowed: {', '.join(BUS_FACTORS)}")
    return nbytes / seconds * BUS_FACTORS[collective](p)
