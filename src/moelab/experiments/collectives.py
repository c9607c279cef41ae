"""Collectives on real ranks: the rank functions of notebooks/06_collectives.ipynb and benchmarks/collectives.py.

- :func:`bandwidth_rank`: the hand-written collectives and gloo's built-ins side by side, interleaved round by
  round, over a range of message sizes; a round's time is from a barrier to a barrier (the slowest rank).
- :func:`agreement_rank`: every hand-written collective against gloo's built-in on the same inputs.
- :func:`emulated_rank`: collectives over an emulated :class:`~moelab.network.Network`, each rank's rounds on a
  :class:`~moelab.timeline.Timeline` (a Gantt chart), with the bytes per link class.
- :func:`routing_rank`: expert-parallel dispatch bytes across nodes, flat and two-hop, with node-limited routing.
- :func:`compressed_rank`: an all-to-all of FP8 or INT8 rows with their scales, against the fp32 one.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .. import collectives as C
from ..network import Link, Network, Topology
from ..timeline import Timeline, start_together


def _builtin_reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.numel() // dist.get_world_size())
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x)   # the 2.13 name first
    return out


def _builtin_all_to_all(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    return out


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    dist.all_reduce(y)
    return y


def contestants(p: int) -> dict[str, dict]:
    """For each collective, gloo's built-in and the hand-written versions, as functions of a flat fp32 buffer."""
    def pairwise(x: torch.Tensor) -> torch.Tensor:
        even = [x.numel() // p] * p
        return C.pairwise_all_to_all(x, even, even)

    return {"all_reduce": {"gloo": _all_reduce, "ring": C.ring_all_reduce,
                           "halving-doubling": C.halving_doubling_all_reduce},
            "reduce_scatter": {"gloo": _builtin_reduce_scatter, "ring": C.ring_reduce_scatter},
            "all_to_all": {"gloo": _builtin_all_to_all, "pairwise": pairwise}}


def bandwidth_rank(rank: int, world_size: int, sizes: list[int], rounds: list[int]) -> list[dict]:
    """Median seconds of every contestant at every size (bytes, fp32), interleaved round by round."""
    table = contestants(world_size)
    rows = []
    for nbytes, n_rounds in zip(sizes, rounds):
        x = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(rank))
        times: dict[tuple[str, str], list[float]] = {(c, a): [] for c, algos in table.items() for a in algos}
        for i in range(n_rounds + 1):                             # the first round warms up
            for (collective, algorithm) in times:
                dist.barrier()
                start = time.perf_counter()
                table[collective][algorithm](x)
                dist.barrier()
                if i:
                    times[collective, algorithm].append(time.perf_counter() - start)
        rows += [{"collective": c, "algorithm": a, "bytes": nbytes, "seconds": statistics.median(t)}
                 for (c, a), t in times.items()]
    return rows


def agreement_rank(rank: int, world_size: int, n: int) -> dict[str, float]:
    """Each hand-written collective and gloo's built-in on the same ``n`` random fp32 values per rank: the largest
    absolute difference of their results on this rank (0 where the algorithm adds in the same order)."""
    p = world_size
    x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
    total = _all_reduce(x)
    gathered = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(gathered, x)
    broadcast = x.clone()
    dist.broadcast(broadcast, 0)
    reduced = C.tree_reduce(x, 0)
    rows = x[: (n // p) * p].view(p, -1)
    a2a = torch.empty_like(rows)
    dist.all_to_all_single(a2a, rows)
    checks = {"ring all-reduce": (C.ring_all_reduce(x), total),
              "halving-doubling all-reduce": (C.halving_doubling_all_reduce(x), total),
              "hierarchical all-reduce (2 nodes)": (C.hierarchical_all_reduce(x, Topology(2, p // 2)), total),
              "ring reduce-scatter": (C.ring_reduce_scatter(x), torch.tensor_split(total, p)[rank]),
              "ring all-gather": (C.ring_all_gather(x), torch.stack(gathered)),
              "tree broadcast": (C.tree_broadcast(x, 0), broadcast),
              "tree reduce": (reduced if rank == 0 else total, total),
              "pairwise all-to-all": (C.pairwise_all_to_all(rows, [rows.shape[0] // p] * p, [rows.shape[0] // p] * p),
                                      a2a)}
    return {name: float((got - expected).abs().max()) for name, (got, expected) in checks.items()}


def compressed_rank(rank: int, world_size: int, rows: int, d: int, fmt: str) -> dict:
    """An even all-to-all of ``rows`` rows of ``d`` values per rank, plain fp32 and compressed to ``fmt`` with 1×128
    scales; the bytes each sent, whether the received bytes are the senders' exactly, and the error after
    dequantising."""
    from ..quant import dequantize, pack, quantize

    p = world_size
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rows, d, generator=g)
    x[:, 0] *= 50                                                    # an outlier channel, as activations have
    splits = [rows // p] * p
    net = Network(Topology(1, p), Link("loopback", 0.0, 1e15), Link("loopback", 0.0, 1e15))
    plain = C.pairwise_all_to_all(x, splits, splits, net)
    plain_bytes = net.sent_bytes.get("loopback", 0)
    net.reset()
    q, scales = C.compressed_all_to_all(x, splits, splits, fmt, 128, net)
    compressed_bytes = net.sent_bytes.get("loopback", 0)
    sender_q = [pack(*quantize(torch.randn(rows, d, generator=torch.Generator().manual_seed(src)) *
                               torch.tensor([50.0] + [1.0] * (d - 1)), fmt)) for src in range(p)]
    expected = torch.cat([sq.view(p, rows // p, -1)[rank] for sq in sender_q])
    back = dequantize(q, scales)
    return {"plain_bytes": plain_bytes, "compressed_bytes": compressed_bytes,
            "exact_bytes": bool(torch.equal(pack(q, scales), expected)),
            "max_relative_error": float(((back - plain).abs() / plain.abs().amax(1, keepdim=True)).max())}


def emulated_rank(rank: int, world_size: int, topology: Topology, cases: list[tuple[str, int]], intra,
                  inter) -> list[dict]:
    """Each ``(algorithm, nbytes)`` of ``cases`` once, on a buffer of ``nbytes`` fp32 bytes over an emulated
    two-level network (``intra`` and ``inter`` links). Per case: this rank's rounds (a timeline, time zero shared
    by all ranks), its bytes and messages per link class, and the seconds until this rank finished."""
    p = world_size
    results = []
    for algorithm, nbytes in cases:
        net, timeline = Network(topology, intra, inter), Timeline()
        x = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(rank))
        runs = {
            "ring_all_reduce": lambda: C.ring_all_reduce(x, net, timeline),
            "halving_doubling_all_reduce": lambda: C.halving_doubling_all_reduce(x, net, timeline),
            "hierarchical_all_reduce": lambda: C.hierarchical_all_reduce(x, topology, net, timeline),
            "ring_reduce_scatter": lambda: C.ring_reduce_scatter(x, net, timeline),
            "ring_all_gather": lambda: C.ring_all_gather(x[: x.numel() // p], net, timeline),
            "tree_broadcast": lambda: C.tree_broadcast(x, 0, net, timeline),
            "tree_reduce": lambda: C.tree_reduce(x, 0, net, timeline),
            "pairwise_all_to_all": lambda: C.pairwise_all_to_all(x.view(p, -1), [1] * p, [1] * p, net, timeline),
            "hierarchical_all_to_all": lambda: C.hierarchical_all_to_all(
                x.view(p, -1), torch.ones(p, p, dtype=torch.long), topology, net, timeline),
        }
        if algorithm not in runs:
            raise ValueError(f"algorithm = {algorithm!r} is not allowed; allowed: {', '.join(runs)}")
        start_together(timeline)
        runs[algorithm]()
        results.append({"algorithm": algorithm, "bytes": nbytes, "events": timeline.to_list(),
                        "seconds": timeline.now(), "sent": dict(net.sent_bytes), "messages": dict(net.messages)})
    dist.barrier()
    return results


def _counts_to(dest: torch.Tensor, p: int) -> list[int]:
    return torch.bincount(dest, minlength=p).tolist()


def _exchange_splits(send: list[int]) -> list[int]:
    """What every rank sends here, from what this rank sends to every rank (a tiny all-to-all, not emulated)."""
    recv = torch.empty(len(send), dtype=torch.long)
    dist.all_to_all_single(recv, torch.tensor(send, dtype=torch.long))
    return recv.tolist()


def routing_rank(rank: int, world_size: int, topology: Topology, n_experts: int, top_k: int, tokens: int,
                 d_model: int, max_nodes: list[int], seed: int = 0) -> list[dict]:
    """Expert-parallel dispatch across nodes, flat and deduplicated, for each node limit ``M`` in ``max_nodes``.

    The experts are spread in order over the ranks, so node ``n`` holds the ``n``-th group of ``E / nodes``;
    a sigmoid router limited to the best ``M`` of those groups (DeepSeek-V3's node-limited routing,
    ``n_group = nodes``, ``topk_group = M``) picks ``top_k`` experts per token. Then the rows go out two ways
    over an emulated network, and the bytes crossing the slow links are counted:

    - *flat*: one row per (token, expert) to the expert's rank (:func:`moelab.collectives.pairwise_all_to_all`),
      as :func:`moelab.ep.expert_parallel` sends them;
    - *per rank*: one row per (token, rank holding any of its experts), the copies for one rank merged;
    - *two-hop*: one row per (token, remote node) to the same local index on that node (DeepSeek-V3 / DeepEP),
      which forwards it inside the node over the fast links (that second hop is not run here: it never
      touches a slow link).

    Every rank has its own slow link to each peer (one NIC per GPU, as DeepSeek-V3's nodes have 8 NICs for 8
    GPUs). Returns per ``M`` the measured slow-link bytes of each, and the analytic counts from the routing
    itself."""
    from ..router import SigmoidRouter

    net = Network(topology)
    p, E_rank = world_size, n_experts // world_size
    nodes = topology.nodes
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(tokens, d_model, generator=g)
    out = []
    for M in max_nodes:
        torch.manual_seed(seed)
        router = SigmoidRouter(d_model, n_experts, top_k, n_group=nodes, topk_group=M)
        with torch.no_grad():
            indices = router(x).indices                                      # (tokens, k)
        owner = indices // E_rank                                            # rank of each chosen expert
        node_of = owner // topology.per_node
        me_node = topology.node(rank)
        # flat: every (token, expert) row to the expert's rank
        order = owner.flatten().argsort(stable=True)
        rows = x[torch.arange(tokens).repeat_interleave(top_k)[order]]
        send = _counts_to(owner.flatten(), p)
        net.reset()
        C.pairwise_all_to_all(rows, send, _exchange_splits(send), net)
        flat = net.sent_bytes.get(net.inter.name, 0)
        # per rank: one row per (token, remote rank holding any of its experts)
        rank_pairs = sorted({(t, int(o)) for t in range(tokens) for o in owner[t]
                             if topology.node(int(o)) != me_node}, key=lambda pair: pair[1])
        dest = torch.tensor([o for _, o in rank_pairs], dtype=torch.long)
        per_rank_rows = x[torch.tensor([t for t, _ in rank_pairs], dtype=torch.long)] if rank_pairs else x[:0]
        send = _counts_to(dest, p)
        net.reset()
        C.pairwise_all_to_all(per_rank_rows, send, _exchange_splits(send), net)
        per_rank = net.sent_bytes.get(net.inter.name, 0)
        # two-hop: hop 1, one row per (token, remote node), to (node, my local index)
        hop_nodes = [sorted({int(n) for n in node_of[t]} - {me_node}) for t in range(tokens)]
        pairs = [(t, topology.rank(n, topology.local(rank))) for t, ns in enumerate(hop_nodes) for n in ns]
        dest = torch.tensor([r for _, r in pairs], dtype=torch.long)
        order = dest.argsort(stable=True)
        hop1 = x[torch.tensor([t for t, _ in pairs], dtype=torch.long)[order]] if pairs else x[:0]
        send = _counts_to(dest, p)
        net.reset()
        C.pairwise_all_to_all(hop1, send, _exchange_splits(send), net)
        two_hop = net.sent_bytes.get(net.inter.name, 0)
        row = d_model * x.element_size()
        remote = node_of != me_node
        out.append({"max_nodes": M, "flat_bytes": flat, "per_rank_bytes": per_rank, "two_hop_bytes": two_hop,
                    "flat_analytic": int(remote.sum()) * row, "per_rank_analytic": len(rank_pairs) * row,
                    "two_hop_analytic": sum(len(ns) for ns in hop_nodes) * row,
                    "nodes_per_token": float(torch.tensor([len({int(n) for n in node_of[t]}) for t in range(tokens)],
                                                          dtype=torch.float).mean())})
    return out
