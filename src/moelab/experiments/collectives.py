"""Collectives on real ranks: the rank functions of notebooks/06_collectives.ipynb and benchmarks/collectives.py.

- :func:`bandwidth_rank`: the hand-written collectives and gloo's built-ins side by side, interleaved round by
  round, over a range of message sizes; a round's time is from a barrier to a barrier (the slowest rank).
- :func:`emulated_rank`: collectives over an emulated :class:`~moelab.network.Network`, each rank's rounds on a
  :class:`~moelab.timeline.Timeline` (a Gantt chart), with the bytes per link class.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .. import collectives as C
from ..network import Network, Topology
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
