"""DiLoCo's outer step: workers train alone for ``H`` steps, then move the shared parameters where they went together.

DiLoCo (Douillard et al. 2023): every worker takes ``H`` inner steps alone from the shared parameters ``θ``; then
the *pseudo-gradient* ``Δ = θ − θ_local`` (old global minus new local: the direction the workers moved, negated
like a gradient) is averaged over the workers and an outer optimizer (Nesterov SGD) steps ``θ`` with it. With
``H = 1``, an inner SGD step, outer lr 1 and no momentum this is plain data parallel SGD; with any ``H``, outer lr 1
and no momentum it is **local SGD** (Stich 2019; Lin et al. 2020): the new parameters are the workers' average.
Built in notebooks/10_slow_link_training.ipynb.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def pseudo_gradients(global_params: list[torch.Tensor], local_params: list[torch.Tensor]) -> list[torch.Tensor]:
    """DiLoCo's ``Δ = θ_global − θ_local`` for each parameter: where the worker moved, with a gradient's sign (an
    SGD step with it moves ``θ_global`` towards the worker)."""
    return [g.detach() - local.detach() for g, local in zip(global_params, local_params)]


def outer_step(global_params: list[torch.Tensor], local_params: list[torch.Tensor],
               outer_opt: torch.optim.Optimizer, all_reduce=None) -> int:
    """One DiLoCo outer step on every rank: average the pseudo-gradients over the ranks (``all_reduce(t) -> sum``,
    by default ``dist.all_reduce``; e.g. :func:`int8_all_reduce`), step ``global_params`` with ``outer_opt``, and
    copy the new global parameters into the local ones. Returns the number of values all-reduced."""
    world = dist.get_world_size()
    deltas = pseudo_gradients(global_params, local_params)
    flat = torch.cat([d.flatten() for d in deltas])
    if all_reduce is None:
        dist.all_reduce(flat)
    else:
        flat = all_reduce(flat)
    flat = flat / world
    for g, d in zip(global_params, flat.split([d.numel() for d in deltas])):
        g.grad = d.view_as(g).clone()
    outer_opt.step()
    outer_opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for g, local in zip(global_params, local_params):
            local.copy_(g)
    return flat.numel()
