"""Sharded data parallelism (ZeRO stages 1, 2 and 3) written on the ring reduce-scatter and all-gather.

Plain data parallelism keeps on every rank the whole training state: parameters, gradients and the optimizer's
two AdamW moments — 16 bytes a parameter in fp32. ZeRO (Rajbhandari et al. 2020) cuts what is redundant: the
parameters, flattened into one vector, are split into ``p`` shards, and rank ``r`` owns shard ``r``.

- **ZeRO-1** shards the optimizer state: after backward the gradients are *reduce-scattered* (each rank receives
  the sum of its own shard only), the rank runs AdamW on its shard, and an *all-gather* of the updated shards gives
  every rank the whole parameters again. The same bytes as an all-reduce (which is a reduce-scatter followed by an
  all-gather), and the moments take ``1/p`` of the memory.
- **ZeRO-2** shards the gradients too: a rank keeps only its shard's summed gradient between steps.
- **ZeRO-3** shards the parameters: a rank keeps only its shard, all-gathers the whole parameters to compute the
  step's forward and backward, and drops them afterwards — ``16/p`` bytes a parameter held between steps. Here
  the whole model is gathered once before forward and kept through backward, so a step sends what ZeRO-1 sends;
  FSDP gathers one layer at a time and frees it after its forward, so that its peak holds one layer, and gathers
  it again in backward: 1.5 times DDP's bytes.

AdamW works element by element, so running it on a shard gives exactly the elements a whole-vector AdamW would:
every stage's parameters equal DDP's after any number of steps (tests/test_zero.py). The collectives are
:func:`moelab.collectives.ring_reduce_scatter` and :func:`~moelab.collectives.ring_all_gather` of chapter 06, over
an optional emulated :class:`~moelab.network.Network` that counts their bytes per link class.

Shapes: ``N`` parameters in all, flattened in the model's order; shard ``r`` holds ``chunk_sizes(N, p)[r]`` of them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import ring_all_gather, ring_reduce_scatter
from .network import Network, chunk_sizes

STAGES = (1, 2, 3)


class Zero:
    """ZeRO stage ``stage`` over the default process group for ``model``'s parameters, with AdamW
    (``optimizer_kwargs`` as ``torch.optim.AdamW`` takes them). Per step: ``zero.step_begin()`` (ZeRO-3 gathers the
    parameters), forward and backward, then ``zero.step()``."""

    def __init__(self, model: torch.nn.Module, stage: int, net: Network | None = None, **optimizer_kwargs):
        if stage not in STAGES:
            raise ValueError(f"stage = {stage!r} is not allowed; allowed: {', '.join(map(str, STAGES))}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("Zero: parameters must be fp32; allowed: a model in torch.float32")
        self.stage, self.net = stage, net
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.shapes = [p.shape for p in self.params]
        self.numel = sum(p.numel() for p in self.params)
        sizes = chunk_sizes(self.numel, self.world)
        self.start = sum(sizes[:self.rank])
        flat = torch.cat([p.detach().flatten() for p in self.params])
        own = flat[self.start:self.start + sizes[self.rank]]
        if stage < 3:                  # the parameters become views of one flat buffer; the shard is a view of it
            self.flat = flat
            for p, view in zip(self.params, self._views(flat)):
                p.data = view
            self.shard = torch.nn.Parameter(own)
        else:
            self.shard = torch.nn.Parameter(own.clone())
            self._release()
        self.optimizer = torch.optim.AdamW([self.shard], **optimizer_kwargs)
        self.held: dict[str, int] = {}              # bytes of state at the last step (:meth:`_held`)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's part of a flat vector, in its shape."""
        return [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in self.shapes]), self.shapes)]

    def _gather(self) -> None:
        """Every rank's shard, all-gathered (ring), written into the model's parameters."""
        sizes = chunk_sizes(self.numel, self.world)
        padded = torch.zeros(max(sizes))
        padded[:self.shard.numel()] = self.shard.detach()
        shards = ring_all_gather(padded, self.net)
        flat = torch.cat([shards[r, :n] for r, n in enumerate(sizes)])
        if self.stage < 3:
            self.flat.copy_(flat)
        else:
            for p, view in zip(self.params, self._views(flat)):
                p.data = view

    def _release(self) -> None:
        """ZeRO-3: drop the whole parameters (and their gradients); only the shard stays."""
        for p in self.params:
            p.grad = None
            p.data = torch.empty(0)

    def step_begin(self) -> None:
        """Before forward: ZeRO-3 gathers the whole parameters; the other stages hold them already."""
        if self.stage == 3:
            self._gather()

    def step(self) -> None:
        """After backward: reduce-scatter the gradients (each rank's shard, averaged over the ranks), AdamW on the
        shard, then all-gather the parameters (ZeRO-1, 2) or drop them (ZeRO-3). The model's gradients are consumed
        (zeroed, or freed from ZeRO-2 on): no ``zero_grad`` is needed."""
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros(shape)).flatten()
                           for p, shape in zip(self.params, self.shapes)])
        self.shard.grad = ring_reduce_scatter(grads, self.net) / self.world
        if self.stage >= 2:
            for p in self.params:
                p.grad = None
        self.optimizer.step()
        self.held = self._held()
        self.optimizer.zero_grad(set_to_none=self.stage >= 2)
        for p in self.params:                       # consumed: ZeRO-1 keeps its (whole) gradient buffers, zeroed
            if p.grad is not None:
                p.grad.zero_()
        if self.stage == 3:
            self._release()
        else:
            self._gather()

    def _held(self) -> dict[str, int]:
        """The training state this rank keeps, in bytes, read off its tensors at the optimizer step: ``parameters``
        (the whole flat vector, or under ZeRO-3 the shard: the gathered copy is dropped after each step),
        ``gradients`` (the model's, or under ZeRO-2 and 3 the summed shard) and ``optimizer`` (AdamW's moments)."""
        params = self.flat if self.stage < 3 else self.shard
        if self.stage == 1:
            grads = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        else:
            grads = self.shard.grad.numel() * self.shard.grad.element_size()
        moments = sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                      for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
        return {"parameters": params.numel() * params.element_size(), "gradients": grads, "optimizer": moments}
