"""Streaming DiLoCo: DiLoCo's outer step one fragment of the model at a time, each in flight while training goes on.

DiLoCo (:mod:`moelab.diloco`) sends the whole model's pseudo-gradients every ``H`` steps: a burst of traffic while
the compute waits. Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512) makes three changes:

1. **Fragments.** The model is cut into ``F`` fragments of layers, strided (fragment ``p`` holds blocks ``p``,
   ``p + F``, …, so each spans the whole depth); here the embedding travels with the first block and the final
   norm and output head with the last. Fragment ``p`` has its outer step every ``H`` steps as in DiLoCo, but
   staggered: after inner steps ``(p + 1)·H/F``, ``(p + 1)·H/F + H``, … — so only one fragment is on the wire at
   a time and the peak traffic of a sync is ``1/F`` of DiLoCo's.
2. **Overlap.** A fragment's outer all-reduce starts ``τ`` steps (``delay``) before the step it is due at and is
   applied there: the ``τ`` inner steps in between run while it travels. When it lands the fragment's local
   parameters become ``lerp(θ_global, θ_local, α)`` (``alpha``; 0 takes the new global parameters, as DiLoCo
   does, throwing away the ``τ`` steps' local change to that fragment; torchft calls it
   ``fragment_update_alpha``).
3. **Quantised outer gradients** (the paper sends 4-bit floats): pass the course's INT8 all-reduce as
   ``all_reduce``.

With one fragment, no delay and ``alpha = 0`` it is DiLoCo, value for value (tests/test_streaming_diloco.py).
Built in notebooks/11_fragmented_clusters.ipynb.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .collectives import ring_all_reduce
from .diloco import pseudo_gradients
from .network import Network
from .rounds import InFlight, in_flight

AllReduce = Callable[[torch.Tensor, Network | None], torch.Tensor]


def fragments(model: torch.nn.Module, F: int) -> list[list[torch.nn.Parameter]]:
    """The parameters of a :class:`~moelab.model.Transformer` in ``F`` strided fragments of its blocks (block
    ``l`` in fragment ``l % F``), the embedding with the first block, the final norm and head with the last."""
    n_layer = len(model.layers)
    if not (isinstance(F, int) and F >= 1 and n_layer % F == 0):
        raise ValueError(f"fragments = {F!r} is not allowed for a model of {n_layer} blocks; allowed: a divisor of "
                         f"{n_layer}")
    parts: list[list[torch.nn.Parameter]] = [[] for _ in range(F)]
    blocks = {id(p): i % F for i, block in enumerate(model.layers) for p in block.parameters()}
    last = (n_layer - 1) % F
    for name, p in model.named_parameters():
        parts[blocks.get(id(p), 0 if name.startswith("tok_embeddings") else last)].append(p)
    return parts


class StreamingDiLoCo:
    """The outer loop of Streaming DiLoCo over ``model``'s local parameters: call :meth:`step` after every inner
    optimizer step. Each fragment has its own global copy and outer Nesterov SGD (``outer_lr``,
    ``outer_momentum``); ``all_reduce(t, net)`` sums over the ranks (the ring by default). ``syncs`` records each
    outer sync: ``(fragment, step it started, step it landed, bytes this rank sent)``."""

    def __init__(self, model: torch.nn.Module, F: int, H: int, delay: int = 0, alpha: float = 0.0,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, all_reduce: AllReduce = ring_all_reduce,
                 net: Network | None = None):
        self.fragments = fragments(model, F)
        if not (isinstance(H, int) and H >= F and H % F == 0):
            raise ValueError(f"H = {H!r} is not allowed with {F} fragments; allowed: a multiple of {F} (each "
                             f"fragment syncs H/F steps after the one before)")
        if not (isinstance(delay, int) and 0 <= delay < H // F):
            raise ValueError(f"delay = {delay!r} is not allowed; allowed: an integer from 0 to {H // F - 1} (a "
                             f"fragment's sync lands before the next fragment's starts)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha = {alpha!r} is not allowed; allowed: 0 <= alpha <= 1")
        self.H, self.delay, self.alpha, self.all_reduce, self.net = H, delay, alpha, all_reduce, net
        self.global_params = [[p.detach().clone().requires_grad_() for p in part] for part in self.fragments]
        self.outer_opts = [torch.optim.SGD(g, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)
                           for g in self.global_params]
        self.pending: dict[int, tuple[int, InFlight]] = {}
        self.syncs: list[tuple[int, int, int, int]] = []

    def due(self, step: int) -> list[int]:
        """The fragments whose outer sync starts after inner step ``step`` (0-based): ``τ`` steps before it lands
        after steps ``(p + 1)·H/F``, ``(p + 1)·H/F + H``, … (counted from 1), so that after every ``H``-th step
        no sync is in flight and every fragment's global copy is DiLoCo's equivalent."""
        offset = self.H // len(self.fragments)
        lands = step + 1 + self.delay
        return [p for p in range(len(self.fragments)) if (lands - (p + 1) * offset) % self.H == 0
                and lands >= (p + 1) * offset]

    def step(self, step: int) -> None:
        """After inner step ``step``: start the syncs that are due, then apply those that land now."""
        for p in self.due(step):
            deltas = pseudo_gradients(self.global_params[p], self.fragments[p])
            flat = torch.cat([d.flatten() for d in deltas])
            sent = sum(self.net.sent_bytes.values()) if self.net is not None else 0
            self.pending[p] = (step, in_flight(lambda net, flat=flat: self.all_reduce(flat, net), self.net))
            if self.net is not None:
                self.syncs.append((p, step, step + self.delay, sum(self.net.sent_bytes.values()) - sent))
        for p in [p for p, (started, _) in self.pending.items() if started + self.delay == step]:
            self._land(p, self.pending.pop(p)[1].wait())

    def _land(self, p: int, summed: torch.Tensor) -> None:
        flat = summed / dist.get_world_size()
        for g, d in zip(self.global_params[p], flat.split([g.numel() for g in self.global_params[p]])):
            g.grad = d.view_as(g).clone()
        self.outer_opts[p].step()
        self.outer_opts[p].zero_grad(set_to_none=True)
        with torch.no_grad():
            for g, local in zip(self.global_params[p], self.fragments[p]):
                local.copy_(torch.lerp(g, local, self.alpha))
