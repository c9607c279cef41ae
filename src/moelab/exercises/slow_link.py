"""Checks for notebook 10 (training over slow links): step times, ring bytes, DiLoCo and PowerSGD.

Four checks: the step time of data parallelism, DiLoCo's pseudo-gradient averaged in INT8 on real gloo ranks (rank
code, :mod:`.ranks`), DiLoCo's outer step, and what PowerSGD sends. Each compares the learner's function with
:mod:`moelab.sizing.data_parallel_step`, :mod:`moelab.quant`, :mod:`moelab.diloco` and :mod:`moelab.ddp_hooks`
on fixed random inputs.

Shapes: ``W`` workers, ``n`` values (parameters) each.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.optim.sgd import sgd

from .. import quant
from ..ddp_hooks import powersgd_sizes
from ..diloco import pseudo_gradients
from ..network import Link
from ..sizing import data_parallel_step
from .core import Case, Verdict, case, run_check, seeded
from .ranks import RankCase, run_rank_check

__all__ = ["check_data_parallel_step", "check_int8_pseudo_gradient", "check_outer_step", "check_powersgd_sizes"]


def _step_forward_only(params: float, tokens: float, nodes: int, link: Link, flops: float, H: int) -> dict:
    t = data_parallel_step(params, tokens, nodes, link, flops, H)
    return {**t, "compute": 2 * params * tokens / flops}


def _step_reduce_scatter_only(params: float, tokens: float, nodes: int, link: Link, flops: float, H: int) -> dict:
    t = data_parallel_step(params, tokens, nodes, link, flops, H)
    return {**t, "all_reduce": t["all_reduce"] / 2, "diloco_int8": t["diloco_int8"] / 2}


def _step_diloco_every_step(params: float, tokens: float, nodes: int, link: Link, flops: float, H: int) -> dict:
    t = data_parallel_step(params, tokens, nodes, link, flops, H)
    return {**t, "diloco_int8": t["diloco_int8"] * H}


def check_data_parallel_step(fn) -> Verdict:
    """Notebook 10, exercise 1: ``fn(params, tokens, nodes, link, flops, H) -> dict`` with the seconds per step of
    ``compute`` (``6 · params · tokens / flops``: Kaplan et al. 2020, §2.1), ``all_reduce`` (the ring all-reduce
    of the fp32 gradients, ``2(p−1)·(α + S/(p·β))``: Patarasuk & Yuan 2009) and ``diloco_int8`` (the same ring
    on INT8 pseudo-gradients, ``1 + 4/128`` bytes a value, once every ``H`` steps: Douillard et al. 2023,
    INTELLECT-1), as :func:`moelab.sizing.data_parallel_step`."""
    ethernet, ib = Link("25 GbE", 25e-6, 25e9 / 8), Link("8 × IB NDR", 2.8e-6, 400e9)
    node = 8 * 989e12 * 0.40
    inputs = [(10e9, 262144, 14, ethernet, node, 100), (1e9, 65536, 14, ib, node, 500),
              (7e9, 1e6, 2, ethernet, node, 1), (1e8, 4096, 64, Link("slow", 5e-3, 10e6), 1e12, 50),
              (671e9, 4e6, 3, ethernet, node, 10)]
    cases = []
    for params, tokens, nodes, link, flops, H in inputs:
        labelled = case(params=params, tokens=tokens, nodes=nodes, link=link.name, flops=flops, H=H)
        cases.append(Case({**labelled.kwargs, "link": link}, labelled.label))     # a link by name, not repr
    return run_check("check_data_parallel_step", fn, data_parallel_step, cases,
                     against="moelab.sizing.data_parallel_step",
                     hints=[(_step_forward_only, "a training step computes forward and backward: 6 FLOPs per "
                                                 "parameter per token, not 2."),
                            (_step_reduce_scatter_only, "a ring all-reduce is a reduce-scatter and an all-gather: "
                                                        "2(p − 1) rounds, not p − 1."),
                            (_step_diloco_every_step, "DiLoCo all-reduces once every H steps: divide its time "
                                                      "by H.")])


def _delta_inputs(rank: int, world: int, n: int, seed: int) -> dict:
    """A pseudo-gradient: small values (a few hundred AdamW steps' worth), with an outlier on rank 0."""
    delta = 1e-3 * torch.randn(n, generator=seeded(1000 * seed + rank))
    if rank == 0 and n > 5:
        delta[5] = 0.5
    return {"delta": delta}


def _int8_round_trip(delta: torch.Tensor, block: int = 128) -> torch.Tensor:
    return quant.dequantize(*quant.quantize(delta.view(1, -1), "int8", block), block).view(-1)


def _int8_average(delta: torch.Tensor) -> torch.Tensor:
    """The average over the ranks of every rank's Δ as it arrives in INT8 (moelab.quant's 1×128 tiles)."""
    total = _int8_round_trip(delta)
    dist.all_reduce(total)
    return total / dist.get_world_size()


def _fp32_average(delta: torch.Tensor) -> torch.Tensor:
    total = delta.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def _int8_sum(delta: torch.Tensor) -> torch.Tensor:
    return _int8_average(delta) * dist.get_world_size()


def _int8_one_scale(delta: torch.Tensor) -> torch.Tensor:
    total = _int8_round_trip(delta, block=max(1, delta.numel()))
    dist.all_reduce(total)
    return total / dist.get_world_size()


def check_int8_pseudo_gradient(fn) -> Verdict:
    """Notebook 10, exercise 2, rank code: ``fn(delta) -> tensor``, on every rank: DiLoCo's averaged pseudo-gradient
    when every rank sends its ``Δ`` (a 1-D tensor) in INT8, as INTELLECT-1 does: one fp32 scale per 1×128 tile
    (``max |Δ| / 127``, the last tile maybe partial), values rounded to the nearest of −127 … 127. Return the mean
    over the ranks of what arrives. Run on 2–4 real gloo ranks against :mod:`moelab.quant`'s INT8 round trip,
    averaged with ``dist.all_reduce``."""
    plan = [(2, 256, 1), (2, 3, 5), (3, 1000, 2), (3, 129, 6), (4, 300, 3), (4, 128, 4)]     # one launch a world size
    cases = [RankCase(world, functools.partial(_delta_inputs, n=n, seed=seed), f"Δ of {n} values")
             for world, n, seed in plan]
    hints = [(_fp32_average, "round each rank's Δ to INT8 tiles before it travels: the average is of what "
                             "arrives."),
             (_int8_sum, "the outer step takes the mean of the pseudo-gradients: divide the sum by the number of "
                         "ranks."),
             (_int8_one_scale, "one scale per 1×128 tile, not one for the whole Δ: rank 0's outlier would flatten "
                               "every other value of its tensor to 0.")]
    return run_rank_check("check_int8_pseudo_gradient", fn, _int8_average, cases,
                          "moelab.quant's INT8 round trip, averaged over the ranks", rtol=1e-5, atol=1e-9,
                          hints=hints)


def _outer_step_reference(theta: torch.Tensor, workers: torch.Tensor, buffer: torch.Tensor, lr: float,
                          momentum: float) -> torch.Tensor:
    """What :func:`moelab.diloco.outer_step` does on every rank, without a process group: the average of
    :func:`moelab.diloco.pseudo_gradients` over the workers, stepped by the outer optimizer the lab builds
    (``torch.optim.SGD``, Nesterov when ``momentum > 0``; here its functional form, which ``SGD.step`` calls) from
    the momentum ``buffer`` of the previous steps."""
    deltas = [pseudo_gradients([theta], [w])[0] for w in workers]
    param = theta.clone()
    sgd([param], [torch.stack(deltas).mean(0)], [buffer.clone()], weight_decay=0.0, momentum=momentum, lr=lr,
        dampening=0.0, nesterov=momentum > 0, maximize=False, foreach=False)
    return param


def _outer_step_wrong_sign(theta, workers, buffer, lr, momentum) -> torch.Tensor:
    return _outer_step_reference(theta, 2 * theta - workers, buffer, lr, momentum)


def _outer_step_heavy_ball(theta, workers, buffer, lr, momentum) -> torch.Tensor:
    delta = (theta - workers).mean(0)
    return theta - lr * (momentum * buffer + delta)


def _outer_step_summed(theta, workers, buffer, lr, momentum) -> torch.Tensor:
    return _outer_step_reference(theta, theta - (theta - workers) * len(workers), buffer, lr, momentum)


def check_outer_step(fn) -> Verdict:
    """Notebook 10, exercise 3: ``fn(theta, workers, buffer, lr, momentum) -> new theta``, one DiLoCo outer step
    (Douillard et al. 2023, Algorithm 1): the pseudo-gradient ``Δ = θ − θ_worker`` averaged over the rows of
    ``workers`` ``(W, n)``, then Nesterov SGD (Sutskever et al. 2013, as torch's ``SGD(nesterov=True)``) from the
    momentum ``buffer`` ``(n,)``: ``b = μ·buffer + Δ``, ``θ − lr·(Δ + μ·b)``. As
    :func:`moelab.diloco.outer_step` computes it on every rank."""
    g = seeded(801)

    def draw(W: int, n: int, lr: float, momentum: float, buffer: bool = True):
        theta = torch.randn(n, generator=g)
        return case(theta=theta, workers=theta + 0.1 * torch.randn(W, n, generator=g),
                    buffer=0.1 * torch.randn(n, generator=g) if buffer else torch.zeros(n), lr=lr, momentum=momentum)

    cases = [draw(4, 16, 0.7, 0.9), draw(4, 16, 1.0, 0.0), draw(2, 50, 0.7, 0.9, buffer=False),
             draw(1, 8, 0.5, 0.5), draw(8, 1, 0.7, 0.9), draw(3, 100, 1.0, 0.0)]
    return run_check("check_outer_step", fn, _outer_step_reference, cases,
                     against="moelab.diloco.pseudo_gradients and the lab's outer SGD(nesterov=True)",
                     hints=[(_outer_step_wrong_sign, "the pseudo-gradient is θ_global − θ_local (a gradient's "
                                                     "sign), so that θ − lr·Δ moves towards the workers."),
                            (_outer_step_heavy_ball, "Nesterov steps with Δ + μ·b, b = μ·buffer + Δ the new "
                                                     "buffer, not with the new buffer alone."),
                            (_outer_step_summed, "average the pseudo-gradients over the workers; do not sum "
                                                 "them.")])


def _powersgd_always(shapes: list[torch.Size], rank: int) -> tuple[int, int, int]:
    return powersgd_sizes(shapes, rank, min_compression_rate=0.0)


def _powersgd_last_two_dims(shapes: list[torch.Size], rank: int) -> tuple[int, int, int]:
    as_matrices = [torch.Size((s[:-1].numel(), s[-1])) if len(s) > 1 else s for s in shapes]
    return powersgd_sizes(as_matrices, rank)


def check_powersgd_sizes(fn) -> Verdict:
    """Notebook 10, exercise 4: ``fn(shapes, rank) -> (uncompressed, P, Q)``, the values one PowerSGD step
    all-reduces for gradients of these shapes (Vogels et al. 2019, Algorithm 1; torch's ``powerSGD_hook``): a
    tensor is an ``n × m`` matrix (its first dimension × the rest) sent as ``P`` ``(n × r)`` and ``Q``
    ``(m × r)``, ``r = min(n, m, rank)``, when ``(n + m)·r·2 < n·m``; else, and for vectors, uncompressed. As
    :func:`moelab.ddp_hooks.powersgd_sizes`."""
    size = torch.Size
    layer = [size((120, 64)), size((64,)), size((64, 64)), size((32, 64)), size((32, 64)), size((64, 64)),  # 08's
             size((64,)), size((8, 64)), *[size((8, 64, 64))] * 3, *[size((64, 64))] * 3]      # embedding, layer 0
    cases = [case(shapes=[size((64, 64))], rank=2), case(shapes=[size((64, 64))], rank=16),
             case(shapes=[size((256, 128)), size((128,))], rank=4), case(shapes=layer, rank=2),
             case(shapes=layer, rank=8), case(shapes=[size((8, 64, 64)), size((3, 1000))], rank=1),
             case(shapes=[size((4096,))], rank=4)]
    return run_check("check_powersgd_sizes", fn, powersgd_sizes, cases,
                     against="moelab.ddp_hooks.powersgd_sizes",
                     hints=[(_powersgd_always, "a matrix is sent as P and Q only when that is at least 2× "
                                               "smaller: (n + m)·r·2 < n·m; otherwise it goes uncompressed."),
                            (_powersgd_last_two_dims, "torch views a tensor as n × m with n its first dimension and "
                                                      "m the product of the rest, not as its last two.")])
