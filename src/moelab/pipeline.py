"""Pipeline parallelism on real ranks: the course LM cut into stages, a schedule's actions run with P2P messages.

:class:`Stage` is a slice of a :class:`~moelab.model.Transformer` (the embedding on the first stage, the head and
the loss on the last), and :func:`run_schedule` runs one rank's actions of a schedule from :mod:`moelab.schedules`
— GPipe, 1F1B or DualPipe — on real ranks: point-to-point ``isend``/``recv`` of activations and gradients, each
message tagged with what it carries, so that a send never waits for its receiver, two neighbours that send to each
other at the same moment do not deadlock, and DualPipe's two directions never take each other's messages; every
receive has the process group's timeout. A DualPipe rank holds two stages, one of each copy of the model
(``chunk`` 0 and 1); a backward with ``defer_w`` computes only its input's gradient and keeps the gradients
at the weights' inputs, from which the later W computes the weights' gradients — torch's own split, the
``stage_backward_input`` / ``stage_backward_weight`` its zero-bubble schedules use.

Gradients are accumulated over the micro-batches as one process accumulates them (each micro-batch's loss divided
by ``m``), and the MoE layers' balancing losses join the backward of the micro-batch that produced them, so a
pipelined step equals one process's step in loss and in every gradient — with DualPipe, once each parameter's
gradients from its two copies are added (tests/test_pipeline.py).

Shapes: token ids ``(B, T)`` cut into ``m`` micro-batches of ``B / m``; activations between stages
``(B / m, T, d_model)``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from .model import Transformer
from .schedules import Action, schedule, stage_of


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of logits ``(b, T, vocab)`` against targets ``(b, T)``, in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def split_layers(n_layer: int, stages: int) -> list[range]:
    """The layers of each stage: as equal as possible, the first stages taking one more when they do not divide."""
    if not (isinstance(stages, int) and stages >= 1):
        raise ValueError(f"stages = {stages!r} is not allowed; allowed: an integer >= 1")
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
        self.width = model.config.d_model
        owned = {id(q) for q in self.parameters()}
        self.param_names = {id(q): n for n, q in model.named_parameters() if id(q) in owned}   # the model's names

    def gradients(self) -> dict[str, torch.Tensor]:
        """This stage's parameters' gradients (copies), by their names in the model."""
        return {self.param_names[id(q)]: q.grad.clone() for q in self.parameters() if q.grad is not None}

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, aux)``: the activations for the next stage (on the last stage the mean cross-entropy against
        ``targets``, or without them the logits), and this stage's MoE balancing losses of this forward."""
        if self.first:
            x = self.dropout(self.embed(x))
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        aux = sum((layer.ffn.aux_loss for layer in self.layers if hasattr(layer.ffn, "aux_loss")),
                  torch.zeros((), device=x.device))
        if self.last:
            logits = self.output(self.norm(x))
            x = logits if targets is None else cross_entropy(logits, targets)
        return x, aux


def random_batch(config, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and targets ``(batch, block_size)`` drawn from ``seed + 1``: the batch every rank of a pipelined
    step and the one process it is compared with use alike."""
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randint(config.vocab_size, (batch, config.block_size), generator=g),
            torch.randint(config.vocab_size, (batch, config.block_size), generator=g))


@dataclass
class StepRecord:
    """What :func:`run_schedule` measured on one rank: this rank's share of the step's loss (the micro-batch losses
    of the last stages it holds, divided by ``m``; the step's loss is the sum over ranks), each action's start and
    end (seconds from the step's start, computation only), and the most micro-batches held at once."""

    loss: float
    events: list[tuple[str, float, float]]
    held: int


def _tag(kind: str, chunk: int | None, mb: int, microbatches: int) -> int:
    """The message tag of micro-batch ``mb``'s activations (``"F"``) or gradients (``"B"``) in ``chunk``."""
    return (2 * (kind == "B") + (chunk or 0)) * microbatches + mb


def run_schedule(stages: Stage | tuple[Stage, Stage], actions: list[Action], idx: torch.Tensor,
                 targets: torch.Tensor, microbatches: int, group: dist.ProcessGroup | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> StepRecord:
    """One training step's actions on this rank, in the order of ``actions``: a :class:`Stage` for GPipe and 1F1B,
    a pair (chunk 0's stage, chunk 1's) for DualPipe, where chunk 0 carries the first ``m / 2`` micro-batches and
    chunk 1 the rest. Gradients accumulate in the stages' parameters (call the optimizer afterwards). ``idx`` and
    ``targets`` ``(B, T)`` are the whole batch, which every rank knows (only first stages read ``idx``, only last
    ones ``targets``); ranks are the stages in order within ``group``. ``clock`` times the actions
    (``time.thread_time`` for CPU time)."""
    B, T = idx.shape
    if B % microbatches:
        raise ValueError(f"microbatches = {microbatches} is not allowed for a batch of {B}; allowed: a divisor of {B}")
    by_chunk = {None: stages} if isinstance(stages, Stage) else dict(enumerate(stages))
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    p = next(iter(by_chunk.values())).stages
    mb_rows = B // microbatches
    per_chunk = microbatches // len(by_chunk)

    def rows(a: Action) -> slice:
        i = (a.chunk or 0) * per_chunk + a.mb
        return slice(i * mb_rows, (i + 1) * mb_rows)

    def neighbour(stage: Stage, chunk: int | None, step: int) -> int:
        return ranks[stage_of(stage.index + step, chunk, p)]

    saved: dict[tuple[int | None, int], tuple] = {}
    later: dict[tuple[int | None, int], Callable] = {}        # deferred weight gradients, to run at W
    pending: list[tuple[dist.Work, torch.Tensor]] = []        # a tensor in flight must outlive its send
    events, loss, held, most = [], 0.0, 0, 0
    start = clock()
    for a in actions:
        if a.chunk not in by_chunk:
            raise ValueError(f"action {a!r} is not allowed on this rank; allowed: chunks {sorted(by_chunk, key=str)}")
        stage, key = by_chunk[a.chunk], (a.chunk, a.mb)
        if a.kind == "F":
            x_in = None
            if stage.first:
                x = idx[rows(a)]
            else:
                x = x_in = torch.empty(mb_rows, T, stage.width)
                dist.recv(x_in, neighbour(stage, a.chunk, -1), group=group, tag=_tag("F", a.chunk, a.mb, microbatches))
                x_in.requires_grad_()
            t0 = clock()
            out, aux = stage(x, targets[rows(a)] if stage.last else None)
            events.append((repr(a), t0 - start, clock() - start))
            if stage.last:
                loss += out.item() / microbatches
            else:
                sent = out.detach().contiguous()
                pending.append((dist.isend(sent, neighbour(stage, a.chunk, 1), group=group,
                                           tag=_tag("F", a.chunk, a.mb, microbatches)), sent))
            saved[key] = (x_in, out, aux)
            held += 1
            most = max(most, held)
        elif a.kind == "B":
            if key not in saved:
                raise ValueError(f"action {a!r} comes before the forward of micro-batch {a.mb}; allowed: each "
                                 f"micro-batch's backward after its forward on the same stage")
            x_in, out, aux = saved.pop(key)
            if stage.last:
                tensors, grads = [(out + aux) / microbatches], [None]
            else:
                grad = torch.empty_like(out)
                dist.recv(grad, neighbour(stage, a.chunk, 1), group=group, tag=_tag("B", a.chunk, a.mb, microbatches))
                tensors, grads = [out], [grad]
                if aux.requires_grad:
                    tensors, grads = [out, aux / microbatches], [grad, None]
            t0 = clock()
            if not a.defer_w:
                torch.autograd.backward(tensors, grads)
                held -= 1
            elif x_in is None:                          # a first stage's input has no gradient: all is for W
                later[key] = partial(torch.autograd.backward, tensors, grads)
            else:
                weights = [q for q in stage.parameters() if q.requires_grad]
                (x_in.grad,), groups = stage_backward_input(tensors, grads, [x_in], iter(weights))
                later[key] = partial(stage_backward_weight, iter(weights), groups)
            events.append((repr(a), t0 - start, clock() - start))
            if not stage.first:
                sent = x_in.grad.contiguous()
                pending.append((dist.isend(sent, neighbour(stage, a.chunk, -1), group=group,
                                           tag=_tag("B", a.chunk, a.mb, microbatches)), sent))
        elif a.kind == "W":
            if key not in later:
                raise ValueError(f"action {a!r} has no deferred backward before it; allowed: a W after a B with "
                                 f"defer_w of the same micro-batch")
            weight_gradients = later.pop(key)
            t0 = clock()
            weight_gradients()
            events.append((repr(a), t0 - start, clock() - start))
            held -= 1
        else:
            raise ValueError(f"action {a!r} is not allowed; allowed: kind 'F', 'B' or 'W'")
    for work, _ in pending:
        work.wait()
    if saved or later:
        raise ValueError(f"the schedule left micro-batches {sorted(saved | later, key=str)} without their backward; "
                         f"allowed: a schedule with an F and a B (and a W after a deferred B) of every micro-batch")
    return StepRecord(loss, events, most)


def stages_for(model: Transformer, name: str, rank: int, world: int) -> Stage | tuple[Stage, Stage]:
    """This rank's stage of ``model`` under schedule ``name``; for DualPipe, stage ``rank`` of the model and stage
    ``world − 1 − rank`` of a copy of it (the report's two copies of the parameters)."""
    if name == "dualpipe":
        return Stage(model, rank, world), Stage(copy.deepcopy(model), world - 1 - rank, world)
    return Stage(model, rank, world)


def step_rank(rank: int, world: int, config, name: str, microbatches: int, batch: int, seed: int = 0,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """A rank of one pipelined training step (for :func:`moelab.dist.launch`): the model built from ``seed`` on
    every rank, this rank's stages of ``world`` (:func:`stages_for`), one step of schedule ``name`` on a batch of
    random tokens. Returns this rank's share of the loss, its stages' gradients by the model's parameter names
    (under DualPipe each name comes from two ranks, one per copy: their sum is the gradient), the actions' times
    and the most micro-batches held at once."""
    torch.manual_seed(seed)
    model = Transformer(config)
    stages = stages_for(model, name, rank, world)
    idx, targets = random_batch(config, batch, seed)
    dist.barrier()
    record = run_schedule(stages, schedule(name, world, microbatches)[rank], idx, targets, microbatches,
                          clock=clock)
    grads = {}
    for stage in (stages,) if isinstance(stages, Stage) else stages:
        grads.update(stage.gradients())
    return {"loss": record.loss, "grads": grads, "events": record.events, "held": record.held}
