"""Collectives written by hand from point-to-point messages (``torch.distributed`` isend / irecv).

Every algorithm here is a sequence of *rounds*; in a round each rank sends to and receives from a few peers at
once (:func:`exchange`, one ``batch_isend_irecv``). That is all NCCL, gloo or MPI do underneath, and the
algorithms are theirs:

- **ring** reduce-scatter, all-gather and all-reduce (= reduce-scatter + all-gather; Patarasuk & Yuan 2009,
  the bandwidth-optimal schedule NCCL's Ring uses): ``2(p−1)`` rounds, each rank sends ``2(p−1)/p`` of the buffer;
- **recursive halving-doubling** all-reduce (Rabenseifner 2004; MPICH): ``2·lg p`` rounds, the same bytes — fewer
  latencies for small buffers; non-powers of two first fold the extra ranks into a neighbour;
- **binomial-tree** broadcast and reduce: ``⌈lg p⌉`` rounds of the whole buffer;
- **pairwise-exchange** all-to-all with uneven splits (MPICH's ``alltoall_intra_pairwise``): ``p−1`` rounds,
  in round ``s`` rank ``r`` sends to ``r+s`` and receives from ``r−s``;
- **hierarchical** all-reduce and all-to-all for a :class:`~moelab.network.Topology` of nodes: do the heavy part
  inside the nodes and cross the slow links with fewer, or fewer and larger, messages (Horovod's hierarchical
  all-reduce; DeepSeek-V3 / DeepEP's two-hop dispatch).

Rounds are labelled on the timeline by what they do ("reduce-scatter 2", "across all-gather 1", …).

Each takes ``net`` (an emulated :class:`~moelab.network.Network`: slow links, bytes counted per link class) and
``timeline`` (a :class:`~moelab.timeline.Timeline`: one event per round, with its bytes, for a Gantt chart).
They run on the default process group, return new tensors and leave their inputs untouched. Built in
notebooks/06_collectives.ipynb; tests/test_collectives.py checks each against torch.distributed's built-in.

Shapes: ``p`` ranks, ``G`` ranks per node; a row-wise collective's ``x`` is ``(N, d)``: ``N`` rows of ``d`` values.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from . import quant
from .network import Network, Topology, chunk_sizes
from .rounds import Message, post
from .timeline import Timeline, phase

SEGMENTS = 4                                            # pieces per ring message, to overlap sums with transfers


def exchange(sends: Sequence[Message], recvs: Sequence[Message], net: Network | None = None,
             timeline: Timeline | None = None, label: str = "round",
             arrived: Callable[[int], None] | None = None) -> None:
    """One round: post every send and receive at once, wait for all of them (:func:`moelab.rounds.post`). Empty
    tensors are skipped on both sides (both know the sizes). ``arrived(j)`` runs as soon as receive ``j`` is
    complete, while later ones may still be in flight (to overlap reduction with transfer). With ``net``, the
    round lasts until its messages would have arrived on the emulated links
    (:meth:`~moelab.network.Network.round_end`; one 8-byte time stamp per peer travels along, not counted), and
    the bytes sent are counted per link class; with ``timeline``, the round is one event."""
    with phase(timeline, label) as event:
        start = time.perf_counter()
        flight = post(sends, recvs, net, reserve=False)
        flight.wait(arrived, overlapped=False)
        event.sent, event.received = flight.sent, flight.received
        event.comm = time.perf_counter() - start


class Codec(NamedTuple):
    """How a lossy ring carries a chunk: ``encode(chunk) -> message``, ``decode(message, n) -> n fp32 values``, and
    ``empty(n)``, a buffer to receive the message for ``n`` values into."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor, int], torch.Tensor]
    empty: Callable[[int], torch.Tensor]


def ring_reduce_scatter_in_place(flat: torch.Tensor, ranks: list[int], net, timeline, prefix: str = "",
                         codec: Codec | None = None) -> list[torch.Tensor]:
    """Ring reduce-scatter of ``flat`` (a private copy, summed in place) among ``ranks`` in ring order; returns its
    chunks, of which the one at this rank's position in ``ranks`` holds the sum over the ranks. With a ``codec``,
    every message is the encoded partial sum, decoded and added on arrival (e.g. INT8,
    :func:`moelab.compression.int8_all_reduce`)."""
    p, i = len(ranks), ranks.index(dist.get_rank())
    sizes = chunk_sizes(flat.numel(), p)
    chunks = list(flat.split(sizes))
    right, left = ranks[(i + 1) % p], ranks[(i - 1) % p]
    buffer = torch.empty_like(chunks[0])                          # the largest chunk; reused every round
    for s in range(p - 1):
        send, recv = (i - s - 1) % p, (i - s - 2) % p
        label = f"{prefix}reduce-scatter {s + 1}"
        if codec is not None:
            incoming = codec.empty(sizes[recv])
            exchange([(right, codec.encode(chunks[send]))], [(left, incoming)], net, timeline, label)
            chunks[recv] += codec.decode(incoming, sizes[recv])
            continue
        # each chunk in SEGMENTS pieces: adding one piece overlaps the transfer of the next (as NCCL's slices)
        mine, incoming = chunks[recv].tensor_split(SEGMENTS), buffer[:chunks[recv].numel()].tensor_split(SEGMENTS)
        exchange([(right, piece) for piece in chunks[send].tensor_split(SEGMENTS)],
                 [(left, piece) for piece in incoming], net, timeline, label,
                 arrived=lambda j: mine[j].add_(incoming[j]))
    return chunks


def ring_all_gather_in_place(chunks: list[torch.Tensor], ranks: list[int], net, timeline, prefix: str = "") -> None:
    """Ring all-gather in place: the chunk at this rank's position in ``ranks`` is filled; after ``p−1`` rounds all
    are (each round passes on the chunk received in the round before)."""
    p, i = len(ranks), ranks.index(dist.get_rank())
    right, left = ranks[(i + 1) % p], ranks[(i - 1) % p]
    for s in range(p - 1):
        send, recv = (i - s) % p, (i - s - 1) % p
        exchange([(right, chunks[send])], [(left, chunks[recv])], net, timeline, f"{prefix}all-gather {s + 1}")


def ring_reduce_scatter(x: torch.Tensor, net: Network | None = None, timeline: Timeline | None = None) -> torch.Tensor:
    """Sum ``x`` over the ranks and return this rank's chunk of the flattened sum (chunks as
    :func:`chunk_sizes`): rank ``r`` gets chunk ``r``, like ``dist.reduce_scatter_tensor`` when it divides."""
    ranks = list(range(dist.get_world_size()))
    return ring_reduce_scatter_in_place(x.detach().flatten().clone(), ranks, net, timeline)[dist.get_rank()]


def ring_all_gather(x: torch.Tensor, net: Network | None = None, timeline: Timeline | None = None) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all), stacked in rank order: ``(world, *x.shape)``."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out = x.new_empty((world, *x.shape))
    out[rank] = x
    ring_all_gather_in_place(list(out.view(world, -1)), list(range(world)), net, timeline)
    return out


def ring_all_reduce(x: torch.Tensor, net: Network | None = None, timeline: Timeline | None = None,
                    ranks: list[int] | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks (or over ``ranks``, in ring order, called by those alone): ring reduce-scatter,
    then ring all-gather of the summed chunks."""
    ranks = list(range(dist.get_world_size())) if ranks is None else ranks
    flat = x.detach().flatten().clone()
    ring_all_gather_in_place(ring_reduce_scatter_in_place(flat, ranks, net, timeline), ranks, net, timeline)
    return flat.view_as(x)


def halving_doubling_all_reduce(x: torch.Tensor, net: Network | None = None,
                                timeline: Timeline | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks by recursive halving (reduce-scatter) then recursive doubling (all-gather).

    With ``p`` not a power of two, the ``p − 2^⌊lg p⌋`` extra ranks first fold in: among the first
    ``2·rem`` ranks each even rank sends its buffer to the odd one after it and waits; the remaining
    ``2^⌊lg p⌋`` ranks run the algorithm; then each odd rank sends the result back (MPICH's scheme)."""
    p, r = dist.get_world_size(), dist.get_rank()
    flat = x.detach().flatten().clone()
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    if r < 2 * rem and r % 2 == 0:
        exchange([(r + 1, flat)], [], net, timeline, "fold in")
        exchange([], [(r + 1, flat)], net, timeline, "fold out")
        return flat.view_as(x)
    if r < 2 * rem:
        incoming = torch.empty_like(flat)
        exchange([], [(r - 1, incoming)], net, timeline, "fold in")
        flat += incoming
    me = r // 2 if r < 2 * rem else r - rem                       # rank among the 2^⌊lg p⌋ that take part

    def real(n: int) -> int:
        return 2 * n + 1 if n < rem else n + rem

    offsets = [0]
    for size in chunk_sizes(flat.numel(), pof2):
        offsets.append(offsets[-1] + size)

    def segment(lo: int, hi: int) -> torch.Tensor:
        return flat[offsets[lo]:offsets[hi]]

    lo, hi, mask = 0, pof2, pof2 >> 1
    while mask:                                                   # halving: keep half, send the other half
        mid = (lo + hi) // 2
        keep, give = ((mid, hi), (lo, mid)) if me & mask else ((lo, mid), (mid, hi))
        incoming = torch.empty_like(segment(*keep))
        exchange([(real(me ^ mask), segment(*give))], [(real(me ^ mask), incoming)], net, timeline,
                 f"halving {pof2 // (2 * mask)}")
        segment(*keep).add_(incoming)
        (lo, hi), mask = keep, mask >> 1
    mask = 1
    while mask < pof2:                                            # doubling: swap blocks, each twice as large
        other = (lo - (hi - lo), lo) if me & mask else (hi, hi + (hi - lo))
        exchange([(real(me ^ mask), segment(lo, hi))], [(real(me ^ mask), segment(*other))], net, timeline,
                 f"doubling {mask.bit_length()}")
        lo, hi, mask = min(lo, other[0]), max(hi, other[1]), mask << 1
    if r < 2 * rem:
        exchange([(r - 1, flat)], [], net, timeline, "fold out")
    return flat.view_as(x)


def tree_broadcast(x: torch.Tensor, root: int = 0, net: Network | None = None,
                   timeline: Timeline | None = None) -> torch.Tensor:
    """The root's ``x`` on every rank, along a binomial tree: in round ``j`` every rank that has it sends it
    ``2^j`` ranks further (relative to the root), so ``⌈lg p⌉`` rounds reach everyone. ``x`` is only read on
    the root; elsewhere it gives the shape and dtype."""
    p, r = dist.get_world_size(), dist.get_rank()
    _check_root(root, p)
    out = x.detach().clone()
    me = (r - root) % p
    mask = 1
    while mask < p:                                               # receive from the parent
        if me & mask:
            exchange([], [((me - mask + root) % p, out)], net, timeline, f"tree {mask.bit_length()}")
            break
        mask <<= 1
    mask >>= 1
    while mask:                                                   # pass it on to the children
        if me + mask < p:
            exchange([((me + mask + root) % p, out)], [], net, timeline, f"tree {mask.bit_length()}")
        mask >>= 1
    return out


def tree_reduce(x: torch.Tensor, root: int = 0, net: Network | None = None,
                timeline: Timeline | None = None) -> torch.Tensor | None:
    """The sum of ``x`` over the ranks, on the root (``None`` elsewhere), along a binomial tree: the broadcast's
    rounds in reverse, each parent adding its children's partial sums."""
    p, r = dist.get_world_size(), dist.get_rank()
    _check_root(root, p)
    acc = x.detach().clone()
    me = (r - root) % p
    mask = 1
    while mask < p:
        if me & mask:                                             # send the partial sum to the parent, done
            exchange([((me - mask + root) % p, acc)], [], net, timeline, f"tree {mask.bit_length()}")
            return None
        if me + mask < p:
            incoming = torch.empty_like(acc)
            exchange([], [((me + mask + root) % p, incoming)], net, timeline, f"tree {mask.bit_length()}")
            acc += incoming
        mask <<= 1
    return acc


def _check_root(root: int, p: int) -> None:
    if not (isinstance(root, int) and 0 <= root < p):
        raise ValueError(f"root = {root!r} is not allowed; allowed: a rank in 0..{p - 1}")


def check_splits(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                 p: int) -> tuple[list[int], list[int]]:
    """The splits of an all-to-all of the rows of ``x`` on ``p`` ranks as lists of ints, or a clear error."""
    send, recv = [int(n) for n in send_splits], [int(n) for n in recv_splits]
    if len(send) != p or len(recv) != p:
        raise ValueError(f"send_splits has {len(send)} entries and recv_splits {len(recv)}; allowed: {p} each, "
                         f"one per rank")
    if sum(send) != x.shape[0]:
        raise ValueError(f"send_splits add up to {sum(send)} rows but x has {x.shape[0]}; allowed: equal")
    return send, recv


def pairwise_all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                        net: Network | None = None, timeline: Timeline | None = None) -> torch.Tensor:
    """``dist.all_to_all_single`` with uneven splits by pairwise exchange: the rows for this rank stay; in round
    ``s = 1 … p−1`` rank ``r`` sends its rows for ``r+s`` and receives ``r−s``'s rows for it — one send and one
    receive per round, so no rank is flooded by all the others at once."""
    p, r = dist.get_world_size(), dist.get_rank()
    send, recv = check_splits(x, send_splits, recv_splits, p)
    outgoing = list(x.detach().split(send))
    out = x.new_empty((sum(recv), *x.shape[1:]))
    incoming = list(out.split(recv))
    incoming[r].copy_(outgoing[r])
    for s in range(1, p):
        to, frm = (r + s) % p, (r - s) % p
        exchange([(to, outgoing[to])], [(frm, incoming[frm])], net, timeline, f"pairwise {s}")
    return out


def _check_topology(topology: Topology) -> None:
    if topology.world != dist.get_world_size():
        raise ValueError(f"topology has {topology.nodes} nodes × {topology.per_node} ranks = {topology.world}, "
                         f"but the world has {dist.get_world_size()} ranks; allowed: nodes × per_node = world size")


def hierarchical_all_reduce(x: torch.Tensor, topology: Topology, net: Network | None = None,
                            timeline: Timeline | None = None) -> torch.Tensor:
    """Two-level all-reduce (Horovod's hierarchical all-reduce): a ring
    reduce-scatter inside each node leaves local rank ``l`` with chunk ``l`` summed over the node; the ranks with
    the same local index ring-all-reduce that chunk across the nodes (each crossing the slow links with 1/G of
    the buffer, G = ranks per node); a ring all-gather inside the node assembles the result."""
    _check_topology(topology)
    r = dist.get_rank()
    node, local = topology.node(r), topology.local(r)
    flat = x.detach().flatten().clone()
    inside = topology.node_ranks(node)
    chunks = ring_reduce_scatter_in_place(flat, inside, net, timeline, "inside ")
    across = topology.peers(local)
    if len(across) > 1:
        mine = chunks[local]
        summed = ring_reduce_scatter_in_place(mine, across, net, timeline, "across ")
        ring_all_gather_in_place(summed, across, net, timeline, "across ")
    ring_all_gather_in_place(chunks, inside, net, timeline, "inside ")
    return flat.view_as(x)


def hierarchical_all_to_all(x: torch.Tensor, counts: torch.Tensor, topology: Topology, net: Network | None = None,
                            timeline: Timeline | None = None) -> torch.Tensor:
    """``dist.all_to_all_single`` in two hops, as DeepSeek-V3 dispatches tokens across nodes: rank ``(n, l)`` sends
    everything for node ``m`` in one message to its peer ``(m, l)`` (the same local index: one slow-link message
    per node instead of one per rank), which forwards each row to its destination inside node ``m`` over the
    fast links. The rows cross the slow links once, as in the flat all-to-all, in ``nodes − 1`` messages instead of
    ``(nodes − 1)·G``.

    ``counts[i, j]`` is how many rows rank ``i`` sends to rank ``j`` — every rank's splits, which the forwarding
    ranks need (gather them first, e.g. with :func:`ring_all_gather`; the flat all-to-all needs its own row of
    them the same way). Returns the rows in rank order of their sources, as the flat all-to-all does."""
    _check_topology(topology)
    p, r = dist.get_world_size(), dist.get_rank()
    if tuple(counts.shape) != (p, p):
        raise ValueError(f"counts has shape {tuple(counts.shape)}; allowed: ({p}, {p}), rows sent from rank i to j")
    counts = counts.cpu()
    check_splits(x, counts[r].tolist(), counts[:, r].tolist(), p)
    G, N = topology.per_node, topology.nodes
    node, local = topology.node(r), topology.local(r)
    rows = list(x.detach().split(counts[r].tolist()))
    mine = topology.node_ranks(node)
    # hop 1: to (m, local), the rows for all ranks of node m, in local order
    bundles = {node: torch.cat([rows[j] for j in mine])}
    for s in range(1, N):
        to_node, from_node = (node + s) % N, (node - s) % N
        outgoing = torch.cat([rows[j] for j in topology.node_ranks(to_node)])
        source = topology.rank(from_node, local)
        incoming = x.new_empty((int(counts[source, mine].sum()), *x.shape[1:]))
        exchange([(topology.rank(to_node, local), outgoing)], [(source, incoming)], net, timeline, f"across {s}")
        bundles[from_node] = incoming
    # hop 2: inside the node, forward to (node, l') its rows from every source (n, local)
    pieces = {n: dict(zip(mine, bundles[n].split(counts[topology.rank(n, local), mine].tolist())))
              for n in range(N)}
    received = {topology.rank(n, local): pieces[n][r] for n in range(N)}
    for s in range(1, G):
        to, frm = topology.rank(node, (local + s) % G), topology.rank(node, (local - s) % G)
        outgoing = torch.cat([pieces[n][to] for n in range(N)])
        sources = topology.peers(topology.local(frm))
        incoming = x.new_empty((int(counts[sources, r].sum()), *x.shape[1:]))
        exchange([(to, outgoing)], [(frm, incoming)], net, timeline, f"inside {s}")
        received.update(zip(sources, incoming.split(counts[sources, r].tolist())))
    return torch.cat([received[src] for src in range(p)])


def compressed_all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                          fmt: str = "fp8_e4m3", block: int = 128, net: Network | None = None,
                          timeline: Timeline | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pairwise_all_to_all` of rows ``x`` ``(N, d)`` quantised to ``fmt`` with one fp32 scale per 1×``block``
    tile (:func:`moelab.quant.quantize`; DeepSeek-V3 dispatches FP8 this way). Each row travels as ``d`` bytes plus
    4 per tile, packed into one uint8 row. Returns the received ``(q, scales)``, bytes and dtypes as the senders
    had them; :func:`moelab.quant.dequantize` turns them back into numbers."""
    q, scales = quant.quantize(x, fmt, block)
    packed = pairwise_all_to_all(quant.pack(q, scales), send_splits, recv_splits, net, timeline)
    return quant.unpack(packed, x.shape[1], fmt)


def compressed_all_gather(x: torch.Tensor, fmt: str = "fp8_e4m3", block: int = 128, net: Network | None = None,
                          timeline: Timeline | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ring_all_gather` of rows ``x`` ``(N, d)`` (the same shape on every rank) quantised like
    :func:`compressed_all_to_all`; returns every rank's ``(q, scales)`` stacked: ``(world, N, d)`` and
    ``(world, N, tiles)``."""
    q, scales = quant.quantize(x, fmt, block)
    packed = ring_all_gather(quant.pack(q, scales), net, timeline)
    world = packed.shape[0]
    q_all, s_all = quant.unpack(packed.flatten(0, 1), x.shape[1], fmt)
    return q_all.view(world, *q.shape), s_all.view(world, *scales.shape)
