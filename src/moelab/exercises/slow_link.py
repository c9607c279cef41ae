"""Checks for notebook 08 (training over slow links): step times, ring bytes, DiLoCo and PowerSGD.

Four checks: the step time of data parallelism, the bytes a rank sends in a ring all-reduce, DiLoCo's outer step,
and what PowerSGD sends. Each compares the learner's function with :mod:`moelab.diloco`,
:mod:`moelab.ddp_hooks`, :func:`moelab.network.ring_bytes` and :func:`moelab.sizing.data_parallel_step` on fixed
random inputs.

Shapes: ``W`` workers, ``n`` values (parameters) each.
"""
from __future__ import annotations

import math

import torch
from torch.optim.sgd import sgd

from ..compression import int8_message_bytes
from ..ddp_hooks import powersgd_sizes
from ..diloco import pseudo_gradients
from ..network import Link, ring_bytes
from ..sizing import data_parallel_step
from .core import Case, Verdict, case, run_check, seeded

__all__ = ["check_data_parallel_step", "check_ring_bytes", "check_outer_step", "check_powersgd_sizes"]


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
    """Notebook 08, exercise 1: ``fn(params, tokens, nodes, link, flops, H) -> dict`` with the seconds per step of
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


def _ring_bytes_reference(n: int, p: int, rank: int, wire: str) -> int:
    per_chunk = int8_message_bytes if wire == "int8" else (lambda k: 4 * k)
    return ring_bytes(n, p, rank, per_chunk)


def _ring_bytes_even(n: int, p: int, rank: int, wire: str) -> int:
    values = 2 * (p - 1) * n // p
    return values + 4 * math.ceil(values / 128) if wire == "int8" else 4 * values


def _ring_bytes_no_scales(n: int, p: int, rank: int, wire: str) -> int:
    return ring_bytes(n, p, rank, (lambda k: k) if wire == "int8" else (lambda k: 4 * k))


def _ring_bytes_reduce_scatter_only(n: int, p: int, rank: int, wire: str) -> int:
    return _ring_bytes_reference(n, p, rank, wire) // 2


def check_ring_bytes(fn) -> Verdict:
    """Notebook 08, exercise 2: ``fn(n, p, rank, wire) -> int``, the bytes ``rank`` sends in a ring all-reduce of
    ``n`` values over ``p`` ranks (Patarasuk & Yuan 2009): chunks as ``torch.tensor_split`` cuts them (larger
    first); in the reduce-scatter it sends every chunk but its own, in the all-gather every chunk but its right
    neighbour's; a chunk of ``k`` values costs ``4k`` bytes on the ``"fp32"`` wire and ``k + 4·ceil(k/128)`` on
    the ``"int8"`` one (INTELLECT-1's pseudo-gradients). As :func:`moelab.network.ring_bytes`."""
    cases = [case(n=1024, p=4, rank=0, wire="fp32"), case(n=1024, p=4, rank=0, wire="int8"),
             case(n=1000, p=3, rank=0, wire="fp32"), case(n=1000, p=3, rank=2, wire="int8"),
             case(n=10, p=4, rank=1, wire="fp32"), case(n=3, p=4, rank=3, wire="int8"),
             case(n=5000, p=1, rank=0, wire="fp32"), case(n=1_000_003, p=14, rank=13, wire="int8")]
    return run_check("check_ring_bytes", fn, _ring_bytes_reference, cases,
                     against="moelab.network.ring_bytes",
                     hints=[(_ring_bytes_no_scales, "each INT8 chunk carries an fp32 scale per 128 values "
                                                    "(ceil(k / 128) of them)."),
                            (_ring_bytes_reduce_scatter_only, "the all-gather sends as much again as the "
                                                              "reduce-scatter."),
                            (_ring_bytes_even, "chunks hold whole values: n // p, plus one for the first n % p "
                                               "chunks, and which ones a rank sends depends on its rank.")])


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
    """Notebook 08, exercise 3: ``fn(theta, workers, buffer, lr, momentum) -> new theta``, one DiLoCo outer step
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
    """Notebook 08, exercise 4: ``fn(shapes, rank) -> (uncompressed, P, Q)``, the values one PowerSGD step
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
