"""Checks for notebooks/exercises/07_overlap_and_pipelines.ipynb: pipeline schedules and gradient buckets.

- :func:`check_step_time` — the length of a pipeline schedule's ideal timeline, every action as soon as its rank is
  free and its input exists, against :func:`moelab.schedules.replay`;
- :func:`check_one_f_one_b_two_stages` — rank code, on 2 real gloo ranks: a 1F1B step of two pipeline stages with
  point-to-point messages, its loss and every gradient against :func:`moelab.pipeline.run_schedule`;
- :func:`check_bucket_plan` — which parameters share a gradient bucket, in the order they fill, against
  :class:`moelab.buckets.BucketedAllReduce`'s buckets.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..buckets import BucketedAllReduce
from ..config import ModelConfig
from ..model import Transformer
from ..pipeline import Stage, random_batch, run_schedule
from ..presets import BALANCE
from ..schedules import Action, dualpipe_bubble, durations, one_f_one_b, replay, schedule
from .core import Case, Verdict, case, run_check, seeded
from .ranks import RankCase, run_rank_check

__all__ = ["check_step_time", "check_one_f_one_b_two_stages", "check_bucket_plan"]


# ---- 07.1: the step time of a schedule's ideal timeline

def _step_time(plan: list[list[Action]], F: float, B: float, W: float) -> float:
    return max(end for rank in replay(plan, durations(F, B, W)) for _, _, end in rank)


def _busiest_rank(plan: list[list[Action]], F: float, B: float, W: float) -> float:
    """Wrong: no rank ever waits for its input, so the step is the busiest rank's work."""
    seconds = durations(F, B, W)
    return max(sum(seconds(r, a) for a in rank) for r, rank in enumerate(plan))


def _deferred_as_full(plan: list[list[Action]], F: float, B: float, W: float) -> float:
    """Wrong: a B that leaves its weights' gradient to a W still lasts a full B."""
    return max(end for rank in replay(plan, durations(F, B, W, deferred_b=B)) for _, _, end in rank)


def _microbatches(plan: list[list[Action]]) -> int:
    return sum(a.kind == "F" for a in plan[0])


def _one_f_one_b_formula(plan: list[list[Action]], F: float, B: float, W: float) -> float:
    """Wrong for DualPipe: 1F1B's step, ``(p − 1)(F + B) + m(F + B)``, whatever the schedule."""
    return (len(plan) - 1 + _microbatches(plan)) * (F + B)


def _report_formula(plan: list[list[Action]], F: float, B: float, W: float) -> float:
    """Wrong for DualPipe when W ≠ F or B ≠ 2F: the work ``m(F + B)`` plus the report's bubble."""
    p, m = len(plan), _microbatches(plan)
    if any(a.chunk is not None for a in plan[0]):
        return m * (F + B) + dualpipe_bubble(p, F, B, W)
    return (p - 1 + m) * (F + B)


def _idle(plan: list[list[Action]], F: float, B: float, W: float) -> float:
    """Wrong: the idle time of a rank (every rank does ``m(F + B)`` of work), not the step's length."""
    return _step_time(plan, F, B, W) - _microbatches(plan) * (F + B)


def _schedule_case(name: str, p: int, m: int, F: float, B: float, W: float) -> Case:
    return Case({"plan": schedule(name, p, m), "F": F, "B": B, "W": W},
                f"{name} on {p} stages, {m} micro-batches, F={F:g}, B={B:g}, W={W:g}")


def check_step_time(fn: Callable[[list[list[Action]], float, float, float], float]) -> Verdict:
    """Exercise 07.1: ``fn(plan, F, B, W) -> float``, the length of the ideal timeline of ``plan`` (a list per rank
    of :class:`moelab.schedules.Action`, as :func:`moelab.schedules.schedule` makes them).

    Every action starts as soon as its rank has finished the one before and its input exists
    (:func:`moelab.schedules.needs`: the previous stage's F for an F, the next stage's B for a B, the rank's own B
    for a W; messages take no time). An F lasts ``F``, a B ``B``, a B with ``defer_w`` ``B − W`` and a W ``W``; an F
    with ``paired`` and the B after it (an F&B pair) start together when both inputs exist, the B right after the F.
    Checked on GPipe, 1F1B and DualPipe schedules of random sizes and durations (``W < B``) against the last end of
    :func:`moelab.schedules.replay`."""
    g = seeded(70)
    cases = [_schedule_case("gpipe", 4, 8, 1.0, 2.0, 1.0), _schedule_case("1f1b", 4, 8, 1.0, 2.0, 1.0),
             _schedule_case("dualpipe", 4, 8, 1.0, 2.0, 0.5), _schedule_case("dualpipe", 4, 8, 1.0, 2.0, 1.5),
             _schedule_case("1f1b", 1, 3, 1.0, 2.0, 1.0), _schedule_case("1f1b", 8, 3, 1.0, 2.0, 1.0)]

    def uniform(lo: float, hi: float) -> float:
        return round(float(torch.empty(()).uniform_(lo, hi, generator=g)), 2)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    for name in ("gpipe", "1f1b", "dualpipe", "gpipe", "1f1b", "dualpipe", "dualpipe", "dualpipe"):
        F = uniform(0.5, 2.0)
        B = uniform(F, 3 * F)
        W = uniform(0.05 * B, 0.95 * B)
        if name == "dualpipe":
            p = 2 * randint(1, 4)
            cases.append(_schedule_case(name, p, 2 * p + 2 * randint(0, 4), F, B, W))
        else:
            cases.append(_schedule_case(name, randint(1, 8), randint(1, 12), F, B, W))
    hints = [(_busiest_rank, "a rank also waits for its input: the previous stage's forward, the next stage's "
                             "backward; place the actions on a timeline rather than adding up one rank's work."),
             (_deferred_as_full, "a B with defer_w computes only its input's gradient: it lasts B − W, and the W "
                                 "that comes later does the rest."),
             (_one_f_one_b_formula, "(p − 1)(F + B) + m(F + B) is the step of GPipe and 1F1B; DualPipe's bubble is "
                                    "shorter: replay its actions instead."),
             (_report_formula, "the report's (p/2 − 1)(F&B + B − 3W) holds for W = F and B = 2F (section 4), not in "
                               "general; replay the actions instead."),
             (_idle, "this is the idle time; return the whole step, from the first action's start to the last "
                     "one's end.")]
    return run_check("check_step_time", fn, _step_time, cases, "moelab.schedules.replay", rtol=1e-9, atol=1e-9,
                     hints=hints)


# ---- 07.2: a 1F1B step of two stages on two ranks

TINY = ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=16, n_routed_experts=4, top_k=2,
                   d_expert=16, **BALANCE)


def _pipeline_inputs(rank: int, world: int, seed: int, batch: int, m: int) -> dict:
    return {"seed": seed, "batch": batch, "m": m}


def _judged(fn: Callable, seed: int, batch: int, m: int) -> dict:
    """This rank's stage of the model built from ``seed`` (the same on every rank), a batch of random tokens, and
    ``fn(stage, idx, targets, m)``: its returned loss and every gradient of the stage's parameters, by the model's
    names (a parameter ``fn`` left without a gradient counts as zero)."""
    with torch.random.fork_rng(devices=[]):           # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = Transformer(TINY)
    stage = Stage(model, dist.get_rank() if dist.is_initialized() else 0, 2)
    idx, targets = random_batch(TINY, batch, seed)
    loss = fn(stage, idx, targets, m)
    grads = {stage.param_names[id(q)]: (q.grad if q.grad is not None else torch.zeros_like(q)).detach().clone()
             for q in stage.parameters()}
    return {"loss": loss.detach() if isinstance(loss, torch.Tensor) else loss, "grads": grads}


def _library(stage: Stage, idx: torch.Tensor, targets: torch.Tensor, m: int) -> float:
    return run_schedule(stage, one_f_one_b(2, m)[dist.get_rank()], idx, targets, m).loss


def _by_hand(stage: Stage, idx: torch.Tensor, targets: torch.Tensor, m: int, divide: tuple[bool, bool] = (True, True),
             aux: tuple[bool, bool] = (True, True), loss_divided: bool = True, send_grad: bool = True) -> float:
    """1F1B on two ranks, written out; the flags (per stage: first, last) make the known wrong answers: gradients
    not divided by ``m``, the balancing loss left out of the backward, the loss not divided by ``m``, the input's
    activations sent back in place of their gradient."""
    rank, rows = dist.get_rank(), idx.shape[0] // m
    scale, with_aux = 1 / m if divide[rank] else 1.0, aux[rank]
    saved, sends, loss = {}, [], 0.0
    for a in one_f_one_b(2, m)[rank]:
        batch = slice(a.mb * rows, (a.mb + 1) * rows)
        if a.kind == "F":
            if stage.first:
                x_in = None
                out, stage_aux = stage(idx[batch])
                sent = out.detach()
                sends.append((dist.isend(sent, 1, tag=a.mb), sent))
            else:
                x_in = torch.empty(rows, idx.shape[1], stage.width)
                dist.recv(x_in, 0, tag=a.mb)
                x_in.requires_grad_()
                out, stage_aux = stage(x_in, targets[batch])
                loss += out.item() / (m if loss_divided else 1)
            saved[a.mb] = (x_in, out, stage_aux)
        else:
            x_in, out, stage_aux = saved.pop(a.mb)
            if stage.last:
                ((out + stage_aux if with_aux else out) * scale).backward()
                sent = x_in.grad if send_grad else x_in.detach()
                sends.append((dist.isend(sent, 0, tag=m + a.mb), sent))
            else:
                grad = torch.empty_like(out)
                dist.recv(grad, 1, tag=m + a.mb)
                tensors, grads = ([out, stage_aux * scale], [grad, None]) if with_aux else ([out], [grad])
                torch.autograd.backward(tensors, grads)
    for work, _ in sends:
        work.wait()
    return loss


def _wrong(**flags) -> Callable:
    return functools.partial(_judged, functools.partial(_by_hand, **flags))


def check_one_f_one_b_two_stages(fn: Callable[[Stage, torch.Tensor, torch.Tensor, int], float]) -> Verdict:
    """Exercise 07.2, rank code: ``fn(stage, idx, targets, m) -> float``, on 2 ranks: rank ``r`` holds
    ``stage = moelab.pipeline.Stage(model, r, 2)``, and ``fn`` runs the 1F1B order of 2 stages and ``m``
    micro-batches (:func:`moelab.schedules.one_f_one_b`) with point-to-point messages: activations from rank 0 to
    rank 1, their gradients back. ``idx`` and ``targets`` ``(B, T)`` are the whole batch on both ranks, micro-batch
    ``i`` its rows ``i·B/m … (i+1)·B/m − 1``. Each micro-batch's loss is divided by ``m`` and the stage's MoE
    balancing loss (``aux``, the second value ``stage`` returns) joins its backward, as one process accumulating
    the micro-batches would; ``fn`` returns this rank's share of the loss: the sum of the micro-batch losses over
    ``m`` on the last stage, 0.0 on the first.

    On 2 real gloo ranks, a small MoE LM built alike on both from a seed, against
    :func:`moelab.pipeline.run_schedule` with ``one_f_one_b(2, m)[rank]``: the loss and every gradient of the
    stage's parameters, on fresh copies of the model. A function that raises, or leaves a rank waiting for a
    message, is a verdict too."""
    if not callable(fn):
        raise TypeError(f"fn = {fn!r} is not allowed; allowed: the function you wrote, e.g. "
                        f"check_one_f_one_b_two_stages(my_function)")
    plan = [(1, 2, 0), (2, 4, 1), (4, 4, 2), (3, 6, 3)]             # (m, batch, seed)
    cases = [RankCase(2, functools.partial(_pipeline_inputs, seed=seed, batch=batch, m=m),
                      f"m={m} micro-batch{'es' if m > 1 else ''} of {batch // m} "
                      f"sequence{'s' if batch // m > 1 else ''}")
             for m, batch, seed in plan]
    no_m = ("divide each micro-batch's loss by m before its backward, on both stages (and the balancing loss "
            "with it), and return the sum of the micro-batch losses over m: one process's mean.")
    no_aux = ("the stage's balancing loss aux joins the backward: (loss + aux) / m on the last stage, and "
              "backward([out, aux / m], [grad, None]) on the first.")
    hints = [(_wrong(divide=(False, False)), no_m), (_wrong(divide=(True, False)), no_m),
             (_wrong(divide=(False, True)), no_m), (_wrong(loss_divided=False), no_m),
             (_wrong(aux=(False, False)), no_aux), (_wrong(aux=(True, False)), no_aux),
             (_wrong(aux=(False, True)), no_aux),
             (_wrong(send_grad=False), "the last stage sends back the gradient of its input, x_in.grad after the "
                                       "backward, not the activations that came in.")]
    return run_rank_check("check_one_f_one_b_two_stages", functools.partial(_judged, fn),
                          functools.partial(_judged, _library), cases, "moelab.pipeline.run_schedule",
                          rtol=1e-5, atol=1e-6, hints=hints)


# ---- 07.3: gradient buckets

@contextlib.contextmanager
def _one_rank_group() -> Iterator[None]:
    """A process group of this process alone, for :class:`BucketedAllReduce`'s world size (the buckets do not depend
    on it); none is made when one exists already."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _bucket_plan(sizes: list[int], cap: int) -> list[list[int]]:
    """BucketedAllReduce's buckets over fp32 parameters of ``sizes`` bytes (on the meta device: shapes only)."""
    params = [torch.nn.Parameter(torch.empty(n // 4, device="meta")) for n in sizes]
    index = {id(p): i for i, p in enumerate(params)}
    buckets = BucketedAllReduce(params, bucket_bytes=cap, overlap=False).buckets
    return [[index[id(p)] for p in bucket.params] for bucket in buckets]


def _fill(order: list[int], sizes: list[int], cap: int, full: Callable[[int, int], bool]) -> list[list[int]]:
    buckets: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and full(sum(sizes[j] for j in current) + sizes[i], cap):
            buckets.append(current)
            current = []
        current.append(i)
    return buckets + [current] if current else buckets


def _forward_order(sizes: list[int], cap: int) -> list[list[int]]:
    return _fill(list(range(len(sizes))), sizes, cap, lambda n, c: n > c)


def _closed_at_cap(sizes: list[int], cap: int) -> list[list[int]]:
    return _fill(list(reversed(range(len(sizes)))), sizes, cap, lambda n, c: n >= c)


def _empty_first(sizes: list[int], cap: int) -> list[list[int]]:
    """Wrong: a parameter over the cap closes the current bucket even when it is empty."""
    buckets, current = [], []
    for i in reversed(range(len(sizes))):
        if sum(sizes[j] for j in current) + sizes[i] > cap:
            buckets.append(current)
            current = []
        current.append(i)
    return buckets + [current]


def _sorted_buckets(sizes: list[int], cap: int) -> list[list[int]]:
    return [sorted(bucket) for bucket in _bucket_plan(sizes, cap)]


def check_bucket_plan(fn: Callable[[list[int], int], list[list[int]]]) -> Verdict:
    """Exercise 07.3: ``fn(sizes, cap) -> list of lists``: the gradient buckets of parameters of ``sizes`` bytes (in
    the model's order; fp32, so multiples of 4) with a cap of ``cap`` bytes, each bucket the list of its parameters'
    indices, in the order DDP-style bucketing fills them (Li et al. 2020): from the last parameter to the first,
    as backward meets them; the next parameter opens a new bucket when adding it would make the current one larger
    than ``cap``, so a parameter larger than the cap has a bucket of its own. Checked against the buckets of
    :class:`moelab.buckets.BucketedAllReduce` (built in a process group of this process alone)."""
    g = seeded(72)
    chapter = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64)
    with torch.random.fork_rng(devices=[]):
        model_sizes = [4 * p.numel() for p in Transformer(chapter).parameters()]
    cases = [case(sizes=[400_000] * 6, cap=1_000_000), case(sizes=[500_000] * 6, cap=1_000_000),
             case(sizes=[300, 2_000, 300, 300, 5_000, 100, 100], cap=1_000), case(sizes=[12], cap=4),
             case(sizes=model_sizes, cap=20_000)]
    for _ in range(7):
        n = int(torch.randint(1, 40, (), generator=g))
        sizes = (4 * torch.randint(1, 50_000, (n,), generator=g)).tolist()
        cases.append(case(sizes=sizes, cap=4 * int(torch.randint(1, 100_000, (), generator=g))))
    hints = [(_forward_order, "backward produces the last parameters' gradients first: fill the buckets from the "
                              "last parameter to the first."),
             (_closed_at_cap, "a bucket may hold exactly cap bytes: open a new one only when the next parameter "
                              "would take it over the cap (>, not >=)."),
             (_sorted_buckets, "within a bucket, too, list the parameters in the order backward meets them: the "
                               "last first."),
             (_empty_first, "a parameter larger than the cap closes the current bucket only when it holds "
                            "something: no bucket is empty.")]
    with _one_rank_group():
        return run_check("check_bucket_plan", fn, _bucket_plan, cases, "moelab.buckets.BucketedAllReduce",
                         hints=hints)
