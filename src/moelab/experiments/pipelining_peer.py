"""Torch's own pipeline parallelism (``torch.distributed.pipelining``) as the peer of :mod:`moelab.pipeline`.

:func:`torch_pipeline_rank` runs one training step of the course's language model with torch's
``ScheduleGPipe`` or ``Schedule1F1B`` on the same stages (:class:`moelab.pipeline.Stage`), the same model and the
same batch as :func:`moelab.pipeline.step_rank`, so that tests/test_pipelining_peer.py can check that both
libraries give one process's loss and gradients.

Torch's ``PipelineStage`` passes between ranks what its module's forward returns, and hands the last stage's
output with that micro-batch's targets to the schedule's ``loss_fn``. :class:`Stage` returns ``(out, aux)`` and
computes the loss itself, so :class:`TensorStage` wraps it: the activations alone, and on the last stage the
logits, which :func:`moelab.pipeline.cross_entropy` (the loss of :class:`Stage`) turns into the micro-batch's
mean loss. Torch backpropagates each micro-batch's loss as it is and divides the accumulated gradients by the number of
micro-batches at the end (``scale_grads=True``); with micro-batches of equal size that is the gradient of the
batch's mean loss, what :func:`moelab.pipeline.run_schedule` gets by dividing each loss before its backward.

The MoE balancing losses are the limit: torch's schedule backpropagates the last stage's ``loss_fn`` only, so the
losses that the MoE layers of the other stages produce would have no way into the backward. Rather than drop
them silently, :func:`torch_pipeline_rank` accepts only configs whose balancing losses are zero
(``aux_loss_coef = z_loss_coef = seq_aux_coef = 0``); the MoE layers still route, and the aux-loss-free bias
(``bias_update_speed``) is allowed, as it changes no gradient (it only counts loads until ``after_step``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..config import ModelConfig
from ..model import Transformer
from ..pipeline import Stage, cross_entropy, random_batch

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
BALANCING_LOSSES = ("aux_loss_coef", "z_loss_coef", "seq_aux_coef")


class TensorStage(nn.Module):
    """A :class:`~moelab.pipeline.Stage` as torch's pipelining needs it: one tensor out — the activations for
    the next stage, or on the last stage the logits ``(B, T, vocab)`` for the schedule's ``loss_fn``."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)[0]     # the balancing losses are zero (see the module docstring)


def torch_pipeline_rank(rank: int, world: int, config: ModelConfig, name: str, microbatches: int, batch: int,
                        seed: int = 0) -> dict:
    """A rank of one training step with torch's schedule ``name`` (``"gpipe"`` or ``"1f1b"``), for
    :func:`moelab.dist.launch`: the model, stage and batch of :func:`moelab.pipeline.step_rank`. Returns the mean
    micro-batch loss (last stage; 0.0 elsewhere) and this stage's gradients by the model's parameter names."""
    if name not in SCHEDULES:
        raise ValueError(f"name = {name!r} is not allowed; allowed: {', '.join(map(repr, SCHEDULES))}")
    for field in BALANCING_LOSSES:
        if getattr(config, field):
            raise ValueError(f"ModelConfig.{field} = {getattr(config, field)!r} is not allowed: torch's schedule "
                             f"backpropagates only the last stage's loss; allowed: 0")
    if batch % microbatches:
        raise ValueError(f"microbatches = {microbatches} is not allowed for a batch of {batch}; allowed: a "
                         f"divisor of {batch}")
    torch.manual_seed(seed)
    model = Transformer(config)
    stage = Stage(model, rank, world)
    idx, targets = random_batch(config, batch, seed)
    piped = PipelineStage(TensorStage(stage), rank, world, torch.device("cpu"))
    schedule = SCHEDULES[name](piped, n_microbatches=microbatches, loss_fn=cross_entropy)
    dist.barrier()
    losses: list[torch.Tensor] = []
    if stage.first and stage.last:
        schedule.step(idx, target=targets, losses=losses)
    elif stage.first:
        schedule.step(idx)
    elif stage.last:
        schedule.step(target=targets, losses=losses)
    else:
        schedule.step()
    grads = stage.gradients()
    loss = sum(loss.item() for loss in losses) / microbatches if stage.last else 0.0
    return {"loss": loss, "grads": grads}
