"""Pipeline parallelism: a model's layers cut into stages on different ranks, micro-batches flowing through them.

A batch is cut into ``m`` micro-batches. Stage ``s`` (on rank ``s``) runs its layers on each micro-batch and sends
the activations to stage ``s + 1``; in the backward pass the gradients flow back the same way. What differs between
schedules is the *order* in which each stage runs its forwards (F) and backwards (B):

- **GPipe** (Huang et al. 2019): every micro-batch's forward, then every backward. A stage keeps the activations
  of all ``m`` micro-batches until their backward.
- **1F1B** (PipeDream-Flush, Narayanan et al. 2021): stage ``s`` runs ``p − 1 − s`` forwards to fill the pipe,
  then alternates one forward and one backward, then drains. It keeps at most ``p − s`` micro-batches'
  activations instead of ``m``.

Both idle the same time, the *bubble*: the last stage waits ``(p − 1)·F`` for its first micro-batch, the first
stage ``(p − 1)·B`` for its first gradient, so with equal stages a step lasts ``(m + p − 1)·(F + B)`` of which
``(p − 1)·(F + B)`` is idle — a fraction ``(p − 1) / (m + p − 1)`` (:func:`bubble_fraction`).

A schedule here is data (:class:`Action` lists, one per stage, from :func:`gpipe` and :func:`one_f_one_b`), and
:func:`run_schedule` executes one on real ranks: point-to-point ``isend``/``recv`` of activations and gradients,
so that a send never waits for its receiver and two neighbours that send to each other at the same moment do not
deadlock; every receive has the process group's timeout. Gradients are accumulated over the micro-batches as one
process accumulates them (each micro-batch's loss divided by ``m``), and the MoE layers' balancing losses join the
backward of the micro-batch that produced them, so a pipelined step equals one process's step in loss and in every
gradient (tests/test_pipeline.py).

Shapes: token ids ``(B, T)`` cut into ``m`` micro-batches of ``B / m``; activations between stages
``(B / m, T, d_model)``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .model import Transformer

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Action:
    """One step of a stage's schedule: ``kind`` ``"F"`` (forward) or ``"B"`` (backward) of micro-batch ``mb``."""

    kind: str
    mb: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}"


def _check(stages: int, microbatches: int) -> None:
    if not (isinstance(stages, int) and stages >= 1):
        raise ValueError(f"stages = {stages!r} is not allowed; allowed: an integer >= 1")
    if not (isinstance(microbatches, int) and microbatches >= 1):
        raise ValueError(f"microbatches = {microbatches!r} is not allowed; allowed: an integer >= 1")


def gpipe(stages: int, microbatches: int) -> list[list[Action]]:
    """GPipe: on every stage, the forwards of all micro-batches, then their backwards in the same order."""
    _check(stages, microbatches)
    return [[Action("F", i) for i in range(microbatches)] + [Action("B", i) for i in range(microbatches)]
            for _ in range(stages)]


def one_f_one_b(stages: int, microbatches: int) -> list[list[Action]]:
    """1F1B: stage ``s`` warms up with ``min(p − 1 − s, m)`` forwards, alternates forward and backward, then
    runs the backwards left."""
    _check(stages, microbatches)
    out = []
    for s in range(stages):
        warmup = min(stages - 1 - s, microbatches)
        actions = [Action("F", i) for i in range(warmup)]
        forward, backward = warmup, 0
        while forward < microbatches:
            actions += [Action("F", forward), Action("B", backward)]
            forward, backward = forward + 1, backward + 1
        actions += [Action("B", i) for i in range(backward, microbatches)]
        out.append(actions)
    return out


def schedule(name: str, stages: int, microbatches: int) -> list[list[Action]]:
    """The schedule named ``name`` (:data:`SCHEDULES`)."""
    makers = {"gpipe": gpipe, "1f1b": one_f_one_b}
    if name not in makers:
        raise ValueError(f"schedule = {name!r} is not allowed; allowed: {', '.join(map(repr, SCHEDULES))}")
    return makers[name](stages, microbatches)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """The idle share of a GPipe or 1F1B step with equal stages: ``(p − 1) / (m + p − 1)``."""
    _check(stages, microbatches)
    return (stages - 1) / (microbatches + stages - 1)


def in_flight(actions: list[Action]) -> int:
    """The most micro-batches whose activations a stage holds at once under ``actions`` (forward done, backward
    not yet): ``m`` for GPipe, ``p − s`` for 1F1B on stage ``s``."""
    held = most = 0
    for a in actions:
        held += 1 if a.kind == "F" else -1
        most = max(most, held)
    return most


def split_layers(n_layer: int, stages: int) -> list[range]:
    """The layers of each stage: as equal as possible, the first stages taking one more when they do not divide."""
    _check(stages, 1)
    if n_layer < stages:
        raise ValueError(f"stages = {stages} is not allowed for a model of n_layer = {n_layer}; allowed: at most "
                         f"{n_layer} stages (every stage needs a layer)")
    base, extra = divmod(n_layer, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class Stage(nn.Module):
    """Stage ``index`` of ``stages`` of a :class:`~moelab.model.Transformer`: the embedding on the first stage,
    its share of the blocks, and the final norm, output head and loss on the last. It holds the model's own
    modules, so its parameters are the model's."""

    def __init__(self, model: Transformer, index: int, stages: int):
        super().__init__()
        if not (isinstance(index, int) and 0 <= index < stages):
            raise ValueError(f"index = {index!r} is not allowed; allowed: 0 … {stages - 1}")
        if model.config.tie_embeddings and stages > 1:
            raise ValueError("ModelConfig.tie_embeddings = True is not allowed with stages > 1: the first and last "
                             "stages would each hold the shared matrix; allowed: tie_embeddings = False")
        self.index, self.stages = index, stages
        self.first, self.last = index == 0, index == stages - 1
        self.layer_ids = split_layers(model.config.n_layer, stages)[index]
        self.layers = nn.ModuleList(model.layers[i] for i in self.layer_ids)
        self.embed = model.tok_embeddings if self.first else None
        self.dropout = model.dropout
        self.norm = model.norm if self.last else None
        self.output = model.output if self.last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, aux)``: the activations for the next stage (the mean cross-entropy on the last stage), and
        this stage's MoE balancing losses of this forward."""
        if self.first:
            x = self.dropout(self.embed(x))
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        aux = sum((layer.ffn.aux_loss for layer in self.layers if hasattr(layer.ffn, "aux_loss")),
                  torch.zeros((), device=x.device))
        if self.last:
            logits = self.output(self.norm(x))
            x = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return x, aux


@dataclass
class StepRecord:
    """What :func:`run_schedule` measured on one rank: the mean micro-batch loss (last stage; 0 elsewhere), each
    action's start and end (seconds from the step's start), and the most micro-batches held at once."""

    loss: float
    events: list[tuple[str, float, float]]
    held: int


def run_schedule(stage: Stage, actions: list[Action], idx: torch.Tensor, targets: torch.Tensor,
                 microbatches: int, group: dist.ProcessGroup | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> StepRecord:
    """One training step's forwards and backwards of ``stage`` in the order of ``actions``; gradients accumulate
    in the stage's parameters (call the optimizer afterwards). ``idx`` and ``targets`` ``(B, T)`` are the whole
    batch, which every rank knows (only the first stage reads ``idx``, only the last ``targets``); ranks are the
    stages in order within ``group``."""
    B, T = idx.shape
    if B % microbatches:
        raise ValueError(f"microbatches = {microbatches} is not allowed for a batch of {B}; allowed: a divisor of {B}")
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    prev = ranks[stage.index - 1] if not stage.first else None
    nxt = ranks[stage.index + 1] if not stage.last else None
    mb = B // microbatches
    shape = (mb, T, stage.layers[0].attn.wq.in_features)                # the activations between stages
    saved: dict[int, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}
    pending: list[tuple[dist.Work, torch.Tensor]] = []          # a tensor in flight must outlive its send
    events, losses, held, most = [], [], 0, 0
    start = clock()
    for a in actions:
        rows = slice(a.mb * mb, (a.mb + 1) * mb)
        if a.kind == "F":
            if stage.first:
                x_in = None
                x = idx[rows]
            else:
                x_in = torch.empty(shape)
                dist.recv(x_in, prev, group=group)
                x_in.requires_grad_()
                x = x_in
            t0 = clock()
            out, aux = stage(x, targets[rows] if stage.last else None)
            events.append((repr(a), t0 - start, clock() - start))
            if stage.last:
                losses.append(out.item())
            else:
                sent = out.detach().contiguous()
                pending.append((dist.isend(sent, nxt, group=group), sent))
            saved[a.mb] = (x_in, out, aux)
            held += 1
            most = max(most, held)
        elif a.kind == "B":
            if a.mb not in saved:
                raise ValueError(f"action {a!r} comes before the forward of micro-batch {a.mb}; allowed: each "
                                 f"micro-batch's backward after its forward on the same stage")
            x_in, out, aux = saved.pop(a.mb)
            if stage.last:
                grad = None
            else:
                grad = torch.empty(shape)
                dist.recv(grad, nxt, group=group)
            t0 = clock()
            if stage.last:
                ((out + aux) / microbatches).backward()
            else:
                torch.autograd.backward([out, aux / microbatches], [grad, None])
            events.append((repr(a), t0 - start, clock() - start))
            if not stage.first:
                sent = x_in.grad.contiguous()
                pending.append((dist.isend(sent, prev, group=group), sent))
            held -= 1
        else:
            raise ValueError(f"action {a!r} is not allowed; allowed: kind 'F' or 'B'")
    for work, _ in pending:
        work.wait()
    if saved:
        raise ValueError(f"the schedule left micro-batches {sorted(saved)} without a backward; allowed: a schedule "
                         f"with one F and one B of every micro-batch 0 … {microbatches - 1}")
    return StepRecord(sum(losses) / microbatches if losses else 0.0, events, most)


def step_rank(rank: int, world: int, config, name: str, microbatches: int, batch: int, seed: int = 0) -> dict:
    """A rank of one pipelined training step (for :func:`moelab.dist.launch`): the model built from ``seed`` on
    every rank, this rank's :class:`Stage` of ``world``, one step of schedule ``name`` on a batch of random
    tokens. Returns the loss (last stage), this stage's gradients by the model's parameter names, the actions'
    times and the most micro-batches held at once."""
    torch.manual_seed(seed)
    model = Transformer(config)
    stage = Stage(model, rank, world)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(config.vocab_size, (batch, config.block_size), generator=g)
    targets = torch.randint(config.vocab_size, (batch, config.block_size), generator=g)
    dist.barrier()
    record = run_schedule(stage, schedule(name, world, microbatches)[rank], idx, targets, microbatches)
    owned = {id(p) for p in stage.parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if id(p) in owned and p.grad is not None}
    return {"loss": record.loss, "grads": grads, "events": record.events, "held": record.held}


def measured_bubbles(events: list[list[tuple[str, float, float]]]) -> list[float]:
    """Each rank's idle share of the step, from its actions' ``(name, start, end)`` (one list per rank, times from
    a common start): ``1 − busy / step``, the step lasting until the last rank's last action ends."""
    step = max(end for rank in events for _, _, end in rank)
    if not step > 0:
        raise ValueError(f"the events end at {step!r}; allowed: a step that takes time")
    return [1 - sum(end - start for _, start, end in rank) / step for rank in events]
