"""Training on a fragmented cluster: the runs of notebooks/11_fragmented_clusters.ipynb and benchmarks/fragmented.py.

The course's small MoE language model (:func:`moelab.presets.lm_config`) trains data-parallel on an emulated
network with a virtual clock that counts each rank's computation in its own CPU time (``cpu_time``: 4 ranks on 2
cores), scaled by the rank's speed:

- :func:`dp_rank`: synchronous data parallelism, the batch split equally or by speed
  (:func:`moelab.uneven.split_by_speed`), the gradients averaged with weights over the ring all-reduce — with fixed
  speeds (mixed generations) and optionally random slowdowns (stragglers, :func:`moelab.uneven.slowdowns`);
- :func:`diloco_rank`: DiLoCo and Streaming DiLoCo (:class:`moelab.streaming_diloco.StreamingDiLoCo`; one fragment
  and no delay is DiLoCo), fp32 or INT8 outer gradients, under the same speeds and stragglers;
- :func:`failure_replica`: DiLoCo whose replicas may die, run by :func:`moelab.elastic.run_replicas`: a quorum per
  outer step, a commit vote, and a restarted replica healed from a peer;
- :func:`zero_rank`: a few AdamW steps under ZeRO-1/2/3 (:class:`moelab.zero.Zero`) or DDP on the same ring: the
  parameters, the state each rank holds and the bytes it sends.
"""
from __future__ import annotations

import copy
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import train
from ..collectives import ring_all_reduce
from ..compression import int8_all_reduce
from ..data import load_corpus, rank_batch
from ..diloco import pseudo_gradients
from ..dp import sum_expert_loads
from ..elastic import Membership, send_state
from ..model import Transformer
from ..network import FAST, Link, Network
from ..presets import lm_config
from ..streaming_diloco import StreamingDiLoCo
from ..uneven import split_by_speed, weighted_average_gradients
from ..zero import Zero
from .two_tier import TwoTierRun


@dataclass(frozen=True)
class FragmentedRun(TwoTierRun):
    """A run of this chapter (see :class:`TwoTierRun`): by default 4 ranks in one node of fast links, as a job
    that mixes two generations of accelerators in one machine room would see them; ``batch_size`` sequences per
    rank when the batch is split equally (``batch_size × world`` in all)."""

    nodes: int = 1
    per_node: int = 4
    inter: Link = FAST


def _setup(rank: int, run: FragmentedRun, speed: float):
    data = load_corpus()
    net = Network(run.topology, run.intra, run.inter, virtual=True, cpu_time=True, speed=speed)
    torch.manual_seed(run.seed)
    model = Transformer(lm_config(data.tokenizer.vocab_size))
    return data, net, model, train.make_optimizer(model, run.train_config())


def _set_lr(opt: torch.optim.Optimizer, step: int, run: FragmentedRun) -> None:
    for group in opt.param_groups:
        group["lr"] = train.lr_at(step, run.train_config())


def _steps(rank: int, run: FragmentedRun, net: Network, opt: torch.optim.Optimizer, speed: float,
           stragglers: list[list[float]] | None):
    """The run's steps on the clock started together: each with its learning rate set and, under ``stragglers``,
    this rank's speed for the step."""
    dist.barrier()
    net.reset()
    for step in range(run.steps):
        if stragglers is not None:
            net.set_speed(speed * stragglers[step][rank])
        _set_lr(opt, step, run)
        yield step


def dp_rank(rank: int, world_size: int, run: FragmentedRun, speeds: list[float], split: str = "equal",
            stragglers: list[list[float]] | None = None) -> dict:
    """Synchronous data parallelism on ranks of ``speeds``, each step's batch of ``batch_size × world`` sequences
    split ``"equal"`` or ``"by_speed"``; ``stragglers[step][rank]`` multiplies a rank's speed at a step. Returns
    rank 0's evaluations (step, validation loss, simulated seconds, bytes sent) and this rank's share."""
    if split not in ("equal", "by_speed"):
        raise ValueError(f"split = {split!r} is not allowed; allowed: 'equal', 'by_speed'")
    data, net, model, opt = _setup(rank, run, speeds[rank])
    total = run.batch_size * world_size
    shares = split_by_speed(total, speeds) if split == "by_speed" else [run.batch_size] * world_size
    rows = slice(sum(shares[:rank]), sum(shares[:rank + 1]))
    evals: list[dict] = []
    for step in _steps(rank, run, net, opt, speeds[rank], stragglers):
        x, y = data.batch("train", total, model.config.block_size, seed=run.seed * 10**6 + step * 1000)
        _, loss = model(x[rows], y[rows])               # this rank's mean loss over its share
        opt.zero_grad(set_to_none=True)
        (loss + model.aux_loss).backward()
        weighted_average_gradients(model.parameters(), shares[rank], all_reduce=lambda t: ring_all_reduce(t, net))
        with net.paused():
            sum_expert_loads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train_config().grad_clip)
        opt.step()
        model.after_step()
        if rank == 0 and (step + 1) % run.eval_every == 0:
            _evaluate(evals, step + 1, model, data, run, net)
    return {"evals": evals, "share": shares[rank], "sent": sum(net.sent_bytes.values())}


def _evaluate(evals: list[dict], step: int, model: Transformer, data, run: FragmentedRun, net: Network) -> None:
    with net.paused():
        val = train.evaluate(model, data, "val", run.batch_size, run.eval_batches)
    evals.append({"step": step, "val": val, "seconds": net.now(), "sent": sum(net.sent_bytes.values())})


def diloco_rank(rank: int, world_size: int, run: FragmentedRun, speeds: list[float], F: int = 1, delay: int = 0,
                quantised: bool = False, stragglers: list[list[float]] | None = None, alpha: float = 0.0) -> dict:
    """DiLoCo (``F = 1``, ``delay = 0``) or Streaming DiLoCo with ``F`` fragments, each sync landing ``delay``
    steps after it starts and mixed in with ``alpha``, outer gradients in fp32 or INT8 (``quantised``). Rank 0
    evaluates the global model every ``eval_every`` steps. Returns the evaluations and this rank's syncs
    ``(fragment, started, landed, bytes)``."""
    data, net, model, opt = _setup(rank, run, speeds[rank])
    streaming = StreamingDiLoCo(model, F, run.H, delay, alpha, run.outer_lr, run.outer_momentum,
                                int8_all_reduce if quantised else ring_all_reduce, net)
    global_model = copy.deepcopy(model)
    twin = {id(p): q for p, q in zip(model.parameters(), global_model.parameters())}
    evals: list[dict] = []
    for step in _steps(rank, run, net, opt, speeds[rank], stragglers):
        x, y = rank_batch(data, step, rank, run.batch_size, model.config.block_size, run.seed)
        train.train_step(model, opt, x, y, run.train_config().grad_clip)
        streaming.step(step)
        if rank == 0 and (step + 1) % run.eval_every == 0:
            with torch.no_grad():
                for part, copies in zip(streaming.fragments, streaming.global_params):
                    for p, g in zip(part, copies):
                        twin[id(p)].copy_(g)
            _evaluate(evals, step + 1, global_model, data, run, net)
    return {"evals": evals, "syncs": streaming.syncs, "sent": sum(net.sent_bytes.values())}


def failure_replica(members: Membership, run: FragmentedRun, kill: tuple[int, int] | None = None) -> dict:
    """DiLoCo on one replica of :func:`moelab.elastic.run_replicas`: ``run.steps // run.H`` outer steps, each a
    round with the replicas in its quorum (the average over those with state), healing any member without
    state from the round's source. ``kill = (replica, step)``: that replica's first incarnation kills its own
    process (SIGKILL, no goodbye) before that inner step. Returns the outer steps it committed with their
    members, the validation loss of the global model where it was the round's first member, and its timeline
    ``(what, begin, end)`` in ``time.time()``."""
    data = load_corpus()
    torch.manual_seed(run.seed)
    model = Transformer(lm_config(data.tokenizer.vocab_size))
    opt = train.make_optimizer(model, run.train_config())
    global_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    outer = torch.optim.SGD(global_params, lr=run.outer_lr, momentum=run.outer_momentum,
                            nesterov=run.outer_momentum > 0)
    have_state, committed, rounds, evals, log = members.incarnation == 0, 0, [], [], members.log
    n = sum(p.numel() for p in global_params)
    while committed < run.steps // run.H:
        delta = torch.zeros(n)
        if have_state:
            begin = time.time()
            for h in range(run.H):
                step = committed * run.H + h
                if kill == (members.replica, step) and members.incarnation == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                x, y = rank_batch(data, step, members.replica, run.batch_size, model.config.block_size, run.seed)
                _set_lr(opt, step, run)
                train.train_step(model, opt, x, y, run.train_config().grad_clip)
            log.append(("compute", begin, time.time()))
            delta = torch.cat([d.flatten() for d in pseudo_gradients(global_params, list(model.parameters()))])
        while True:                                      # rounds until one commits
            round_ = members.join(committed if have_state else -1)
            begin, summed = time.time(), torch.cat([delta, torch.tensor([float(have_state)])])
            try:
                round_.group.allreduce([summed]).wait()
                ok = True
            except RuntimeError:                         # a member died inside the collective
                ok = False
            if members.commit(round_, ok):
                break
        log.append(("all-reduce", begin, time.time()))
        if have_state:
            for g, d in zip(global_params, (summed[:-1] / summed[-1]).split([g.numel() for g in global_params])):
                g.grad = d.view_as(g).clone()
            outer.step()
            outer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for g, p in zip(global_params, model.parameters()):
                    p.copy_(g)
        committed += 1
        if min(round_.steps.values()) < max(round_.steps.values()):     # someone to heal: send the state
            begin = time.time()
            state = send_state({"params": global_params, "outer": outer.state_dict(), "inner": opt.state_dict(),
                                "committed": committed}, round_)
            if not have_state:
                with torch.no_grad():
                    for g, p, s in zip(global_params, model.parameters(), state["params"]):
                        g.copy_(s)
                        p.copy_(s)
                outer.load_state_dict(state["outer"])
                opt.load_state_dict(state["inner"])
                committed, have_state = state["committed"], True
            log.append(("heal", begin, time.time()))
        rounds.append((committed, round_.members))
        if round_.index == 0:
            evals.append((committed, train.evaluate(model, data, "val", run.batch_size, run.eval_batches)))
    return {"rounds": rounds, "evals": evals, "log": log, "incarnation": members.incarnation,
            "params": torch.cat([g.detach().flatten() for g in global_params])}


def zero_rank(rank: int, world_size: int, run: FragmentedRun, stage: int, steps: int = 3) -> dict:
    """``steps`` AdamW steps of the course LM under ZeRO ``stage`` (0: DDP, the gradients all-reduced on the same
    ring) on ``run``'s virtual network. Returns the parameters after the steps, the state this rank holds
    between steps and the bytes it sent per step, per link class."""
    data, net, model, _ = _setup(rank, run, 1.0)
    n = sum(p.numel() for p in model.parameters())
    adamw = dict(lr=run.lr, betas=(0.9, 0.95), weight_decay=0.1)
    zero = Zero(model, stage, net, **adamw) if stage else None
    opt = None if zero else torch.optim.AdamW(model.parameters(), **adamw)
    net.reset()
    for step in range(steps):
        x, y = rank_batch(data, step, rank, run.batch_size, model.config.block_size, run.seed)
        if zero:
            zero.step_begin()
        _, loss = model(x, y)
        (loss + model.aux_loss).backward()
        if zero:
            zero.step()
            continue
        flat = ring_all_reduce(torch.cat([p.grad.flatten() for p in model.parameters()]), net) / world_size
        for p, g in zip(model.parameters(), flat.split([p.numel() for p in model.parameters()])):
            p.grad.copy_(g.view_as(p))
        opt.step()
        opt.zero_grad(set_to_none=True)
    held = zero.held if zero else {"parameters": 4 * n, "gradients": 4 * n, "optimizer": 8 * n}
    sent_per_step = {k: v / steps for k, v in net.sent_bytes.items()}
    if zero:
        zero.step_begin()                                # ZeRO-3: gather the whole parameters, to compare
    return {"params": torch.cat([p.detach().flatten() for p in model.parameters()]), "held": held, "numel": n,
            "sent_per_step": sent_per_step}
