"""Data parallelism over unequal devices: each rank's share of the batch in proportion to its speed.

Synchronous data parallelism waits, every step, for its slowest rank: with one device at half the speed of the
others and equal batches, the whole job runs at half speed. Giving each rank a number of sequences in proportion
to its speed (:func:`split_by_speed`) makes them finish together. The step must still compute the gradient of the
whole batch's mean loss: a rank's gradient is that of *its* mean loss, so the ranks' gradients are averaged with
weights, each by its share of the sequences (:func:`weighted_average_gradients`) — equal to one process on the
concatenated batch (tests/test_uneven.py). With equal shares it is DDP's plain average.

Shapes: ``B`` sequences in the global batch, ``n_r`` of them on rank ``r``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist


def split_by_speed(total: int, speeds: Sequence[float]) -> list[int]:
    """``total`` sequences split in proportion to ``speeds`` (the largest remainders get the rounding), at least
    one each, summing to ``total``."""
    if not speeds or not all(isinstance(s, (int, float)) and 0 < s < math.inf for s in speeds):
        raise ValueError(f"speeds = {list(speeds)!r} is not allowed; allowed: one number > 0 per rank")
    if not (isinstance(total, int) and total >= len(speeds)):
        raise ValueError(f"total = {total!r} is not allowed; allowed: an integer >= {len(speeds)} (one sequence "
                         f"per rank at least)")
    exact = [total * s / sum(speeds) for s in speeds]
    shares = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(speeds)), key=lambda r: (shares[r] - exact[r], r))
    for r in by_remainder[:total - sum(shares)]:
        shares[r] += 1
    for r in range(len(shares)):                         # a rank with no sequence takes one from the largest share
        if shares[r] == 0:
            shares[shares.index(max(shares))] -= 1
            shares[r] = 1
    return shares


def weighted_average_gradients(params: Iterable[torch.nn.Parameter], count: int,
                               group: dist.ProcessGroup | None = None,
                               all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Turn this rank's gradients of its mean loss over ``count`` sequences into the gradient of the mean over all
    ranks' sequences: ``Σ_r n_r·g_r / Σ_r n_r``, in one all-reduce (the counts travel with the gradients;
    ``all_reduce(t) -> sum``, by default torch's on ``group``). Returns the total count."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:                           # a parameter this step did not reach: its gradient is zero
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() * count for p in params] + [torch.tensor([float(count)])])
    if all_reduce is None:
        dist.all_reduce(flat, group=group)
    else:
        flat = all_reduce(flat)
    total = flat[-1]
    for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
        p.grad.copy_((g / total).view_as(p))
    return int(total)


def slowdowns(steps: int, world: int, probability: float, factor: float, seed: int = 0) -> list[list[float]]:
    """Each rank's speed at each step when any rank is ``factor`` times slower with ``probability`` at any step
    (a straggler now and then: a noisy neighbour, a thermal throttle, a garbage collection), drawn from ``seed``:
    ``speeds[step][rank]``, 1 or ``1/factor``."""
    if not 0 <= probability <= 1:
        raise ValueError(f"probability = {probability!r} is not allowed; allowed: 0 <= probability <= 1")
    if not (isinstance(factor, (int, float)) and factor >= 1 and math.isfinite(factor)):
        raise ValueError(f"factor = {factor!r} is not allowed; allowed: a number >= 1 (how many times slower)")
    slow = torch.rand(steps, world, generator=torch.Generator().manual_seed(seed)) < probability
    return [[1.0 / factor if s else 1.0 for s in row] for row in slow.tolist()]


def straggler_slowdown(probability: float, factor: float, ranks: int) -> float:
    """The expected time of a synchronous step over its time without stragglers, when each of ``ranks`` ranks is
    ``factor`` times slower with ``probability`` (independently): the step waits for the slowest, so it is slow
    whenever any rank is, ``1 + (factor − 1)(1 − (1 − probability)^ranks)``."""
    if not 0 <= probability <= 1:
        raise ValueError(f"probability = {probability!r} is not allowed; allowed: 0 <= probability <= 1")
    return 1 + (factor - 1) * (1 - (1 - probability) ** ranks)
