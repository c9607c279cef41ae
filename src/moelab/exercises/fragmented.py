"""Checks for notebooks/exercises/11_fragmented_clusters.ipynb: shares by speed, stragglers, ZeRO-1's step.

- :func:`check_shares_by_speed` — sequences per rank in proportion to speed, largest remainders rounded up, against
  :func:`moelab.uneven.split_by_speed`;
- :func:`check_ddp_slowdown` — the expected slowdown of a synchronous step with random stragglers, against
  :func:`moelab.uneven.straggler_slowdown`;
- :func:`check_zero1_step` — rank code, on real gloo ranks: ZeRO-1's reduce-scatter, the update of this rank's
  shard and the all-gather, against the same step with moelab's ring collectives.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from ..collectives import ring_all_gather, ring_reduce_scatter
from ..network import chunk_sizes
from ..uneven import split_by_speed, straggler_slowdown
from .core import Verdict, case, run_check, seeded
from .ranks import RankCase, run_rank_check

__all__ = ["check_shares_by_speed", "check_ddp_slowdown", "check_zero1_step"]


def _floors(total: int, speeds: list[float]) -> list[int]:
    return [math.floor(total * s / sum(speeds)) for s in speeds]


def _rounded(total: int, speeds: list[float]) -> list[int]:
    return [round(total * s / sum(speeds)) for s in speeds]


def check_shares_by_speed(fn) -> Verdict:
    """Notebook 11, exercise 1: ``fn(total, speeds) -> list[int]``: ``total`` sequences in proportion to
    ``speeds``, each exact share rounded down and the sequences left over given to the largest remainders (ties to
    the lower rank), as :func:`moelab.uneven.split_by_speed` (inputs where every rank gets at least one)."""
    g = seeded(11)
    inputs = [(100, [3.0, 2.0, 2.0, 1.0]), (128, [1.0, 1.0, 1.0, 0.5]), (10, [1.0, 1.0, 1.0]), (7, [2.0, 1.0])]
    for _ in range(6):
        world = int(torch.randint(2, 9, (1,), generator=g))
        speeds = [round(float(s), 2) for s in 0.25 + 2 * torch.rand(world, generator=g)]
        inputs.append((int(torch.randint(4 * world, 200, (1,), generator=g)), speeds))
    return run_check("check_shares_by_speed", fn, split_by_speed,
                     [case(total=t, speeds=s) for t, s in inputs], against="moelab.uneven.split_by_speed",
                     hints=[(_floors, "rounding every share down leaves sequences over: give them, one each, to the "
                                      "ranks whose exact share lost the most."),
                            (_rounded, "rounding each share to the nearest can give out one sequence too many or too "
                                       "few: round down, then hand out what is left by largest remainder.")])


def _one_slow_rank(probability: float, factor: float, ranks: int) -> float:
    return 1 + (factor - 1) * probability


def _all_slow(probability: float, factor: float, ranks: int) -> float:
    return 1 + (factor - 1) * probability ** ranks


def check_ddp_slowdown(fn) -> Verdict:
    """Notebook 11, exercise 2: ``fn(probability, factor, ranks) -> float``: a synchronous step's expected time over
    its time without stragglers, each rank ``factor`` times slower with ``probability``, as
    :func:`moelab.uneven.straggler_slowdown`."""
    inputs = [(0.1, 4.0, 4), (0.1, 4.0, 8), (0.01, 3.0, 1024), (0.5, 2.0, 2), (0.0, 5.0, 16), (0.05, 10.0, 64)]
    return run_check("check_ddp_slowdown", fn, straggler_slowdown,
                     [case(probability=p, factor=f, ranks=n) for p, f, n in inputs],
                     against="moelab.uneven.straggler_slowdown",
                     hints=[(_one_slow_rank, "the step waits for the slowest of all the ranks: it is slow when *any* "
                                             "rank is, with probability 1 − (1 − p)^n."),
                            (_all_slow, "a step is slow when any one rank is slow, not only when all of them are.")])


def _inputs(rank: int, world: int, n: int, seed: int) -> dict:
    return {"params": torch.randn(n, generator=seeded(seed)),
            "grads": torch.randn(n, generator=seeded(seed + rank + 1)), "lr": 0.1}


def _zero1_step(params: torch.Tensor, grads: torch.Tensor, lr: float) -> torch.Tensor:
    """ZeRO-1 with SGD: the mean gradient of this rank's shard (a reduce-scatter), its shard stepped, then every
    updated shard all-gathered."""
    p, r = dist.get_world_size(), dist.get_rank()
    sizes = chunk_sizes(params.numel(), p)
    start = sum(sizes[:r])
    shard = params[start:start + sizes[r]] - lr * ring_reduce_scatter(grads) / p
    padded = torch.zeros(max(sizes))
    padded[:sizes[r]] = shard
    whole = ring_all_gather(padded)
    return torch.cat([whole[i, :n] for i, n in enumerate(sizes)])


def _summed(params: torch.Tensor, grads: torch.Tensor, lr: float) -> torch.Tensor:
    return _zero1_step(params, grads * dist.get_world_size(), lr)


def _no_gather(params: torch.Tensor, grads: torch.Tensor, lr: float) -> torch.Tensor:
    p, r = dist.get_world_size(), dist.get_rank()
    sizes = chunk_sizes(params.numel(), p)
    start = sum(sizes[:r])
    out = params.clone()
    out[start:start + sizes[r]] -= lr * ring_reduce_scatter(grads) / p
    return out


def _equal_shards(params: torch.Tensor, grads: torch.Tensor, lr: float) -> torch.Tensor:
    p, r = dist.get_world_size(), dist.get_rank()
    size = math.ceil(params.numel() / p)
    total = grads.clone()
    dist.all_reduce(total)
    pieces = [params[i * size:(i + 1) * size] - lr * total[i * size:(i + 1) * size] / p for i in range(p)]
    return torch.cat([piece if i == r else params[i * size:(i + 1) * size] for i, piece in enumerate(pieces)])


def check_zero1_step(fn) -> Verdict:
    """Notebook 11, exercise 3, rank code: ``fn(params, grads, lr) -> tensor``, on every rank: ZeRO-1's step with
    SGD. ``params`` (1-D, the same on every rank) is cut into shards of ``chunk_sizes(n, p)`` (the first
    ``n % p`` one larger); rank ``r`` receives the mean over the ranks of the gradients of its shard (a
    reduce-scatter), steps its shard ``shard − lr · mean``, and returns the whole updated vector (an all-gather
    of every rank's shard). Run on 2–4 real gloo ranks."""
    plan = [(2, 10, 1), (2, 7, 2), (3, 100, 3), (3, 8, 4), (4, 1001, 5), (4, 16, 6)]
    cases = [RankCase(world, functools.partial(_inputs, n=n, seed=seed), f"{n} parameters")
             for world, n, seed in plan]
    return run_rank_check("check_zero1_step", fn, _zero1_step, cases, "ZeRO-1 on moelab's ring collectives",
                          hints=[(_summed, "the step takes the mean of the ranks' gradients: divide the "
                                           "reduce-scattered sum by the number of ranks."),
                                 (_no_gather, "each rank stepped only its own shard: all-gather the updated shards "
                                              "so that every rank has the whole new vector."),
                                 (_equal_shards, "shards are chunk_sizes(n, p): the first n % p ranks hold one value "
                                                 "more; equal shards of ceil(n / p) misplace the rest.")])
