"""Expert parallelism on real ranks: the rank functions that notebook 05, its benchmark and its tests launch.

The callers are notebooks/05_expert_parallelism.ipynb, benchmarks/expert_parallel.py and tests/test_ep.py.
Each ``*_rank`` function runs on every rank under :func:`moelab.dist.launch` (or ``torchrun``, see
:mod:`moelab.dist`); they live in a module because spawned processes cannot import a notebook cell. They compute
on :func:`moelab.dist.rank_device`: the CPU under gloo, the rank's GPU under NCCL.

- :func:`toy_rank`: the smallest all-to-all — two ranks, four tokens each, four experts — printed row by row.
- :func:`equivalence_rank`: an expert-parallel MoE layer against the same layer in one process.
- :func:`layer_rank`: forward and backward steps of a sharded MoE layer with a per-rank :class:`Timeline`
  (route / dispatch / expert / combine, bytes, rows), optionally with the load skewed towards rank 0's experts.
- :func:`train_rank`: data + expert parallel training of a small MoE language model on the course corpus;
  :func:`reference_run` trains the same model in one process on the same tokens.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from .. import ep, train
from ..config import ModelConfig
from ..data import TextData, global_batch, load_corpus, rank_batch
from ..dist import rank_device
from ..exchange import all_to_all, exchange_counts
from ..model import Transformer
from ..moe import MoE
from ..timeline import Timeline, start_together


def layer_config(d_model: int = 256, n_experts: int = 8, top_k: int = 2, d_expert: int = 512) -> ModelConfig:
    """A lone MoE layer (DeepSeek-V3's sigmoid router, whose selection bias lets us skew the load)."""
    return ModelConfig(vocab_size=2, block_size=1, n_layer=1, n_head=1, d_model=d_model, n_routed_experts=n_experts,
                       top_k=top_k, d_expert=d_expert, router="sigmoid")


def skew_towards_rank0(moe: MoE, skew: float, world: int) -> None:
    """Add ``skew`` to the selection bias of the experts rank 0 holds: more tokens choose them (the gate values,
    and so the layer's output for a given choice, do not change — DeepSeek-V3's bias only steers selection)."""
    with torch.no_grad():
        moe.router.bias[: moe.config.n_routed_experts // world] += skew


def toy_rank(rank: int, world_size: int) -> dict:
    """Two ranks, four tokens each, experts 0–1 on rank 0 and 2–3 on rank 1. Token ``t`` of rank ``r`` is the
    row ``[10·r + t]`` and chooses expert ``(t + r) % 4`` (top-1). Returns what this rank sent and received."""
    if world_size != 2:
        raise ValueError(f"world_size = {world_size}; allowed: 2 (the toy has four experts on two ranks)")
    device = rank_device()
    tokens = torch.tensor([[10.0 * rank + t] for t in range(4)], device=device)
    expert = torch.tensor([(t + rank) % 4 for t in range(4)], device=device)
    order = torch.argsort(expert, stable=True)                 # rows for rank 0's experts first, then rank 1's
    send = torch.bincount(expert // 2, minlength=2)            # rows for each rank
    recv = exchange_counts(send)
    rows = all_to_all(tokens[order], send.tolist(), recv.tolist())
    print(f"sends {tokens[order, 0].int().tolist()} split {send.tolist()}; receives {rows[:, 0].int().tolist()}")
    return {"expert": expert.tolist(), "send": send.tolist(), "recv": recv.tolist(),
            "sent": tokens[order, 0].int().tolist(), "received": rows[:, 0].int().tolist()}


def equivalence_rank(rank: int, world_size: int, config: ModelConfig, tokens: int, skew: float = 0.0,
                     shard: dict | None = None) -> dict:
    """The same MoE layer (same seed) in one process on all ranks' tokens, and expert-parallel on this rank's
    ``tokens`` (sharded by :func:`moelab.ep.shard` with the keyword arguments ``shard``): returns ``{name: (expert
    parallel, one process)}`` for the output, the input's gradient, the router's gradient (summed over ranks, as it
    is replicated) and this rank's experts' gradients, and ``received``, the rows this rank's experts got."""
    torch.manual_seed(0)
    moe = MoE(config)
    skew_towards_rank0(moe, skew, world_size)
    x_all = torch.randn(world_size * tokens, config.d_model)
    g_all = torch.randn_like(x_all)
    device = rank_device()
    moe, x_all, g_all = moe.to(device), x_all.to(device), g_all.to(device)
    x_ref = x_all.clone().requires_grad_()
    y_ref = moe(x_ref)                                          # one process: all tokens, all experts
    (y_ref * g_all).sum().backward()
    E_local = config.n_routed_experts // world_size
    mine = slice(rank * E_local, (rank + 1) * E_local)
    ref = {"x_grad": x_ref.grad, "router": moe.router.weight.grad.clone(),
           **{n: p.grad[mine].clone() for n, p in moe.experts.named_parameters()}}
    sharded = copy.deepcopy(moe)
    sharded.zero_grad()
    ep.shard(sharded, **(shard or {}))
    rows = slice(rank * tokens, (rank + 1) * tokens)
    x = x_all[rows].clone().requires_grad_()
    y = sharded(x)
    (y * g_all[rows]).sum().backward()
    router_grad = sharded.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    return {"output": (y.detach(), y_ref.detach()[rows]), "x_grad": (x.grad, ref["x_grad"][rows]),
            "router": (router_grad, ref["router"]),
            **{n: (p.grad, ref[n]) for n, p in sharded.experts.named_parameters()},
            "received": int(((moe.router(x_all).indices // E_local) == rank).sum())}


def layer_rank(rank: int, world_size: int, config: ModelConfig, tokens: int, steps: int, warmup: int = 2,
               skew: float = 0.0, seed: int = 0, wire: str = "fp32") -> dict:
    """``warmup + steps`` forward and backward passes of an expert-parallel MoE layer on ``tokens`` rows per rank.
    Every step starts on a fresh timeline with the same time zero on all ranks (:func:`start_together`). Returns,
    for the last ``steps`` steps, this rank's ``events`` (a list per step), ``seconds`` (from time zero to the
    end of this rank's backward) and the last step's ``output``. ``wire`` is what the exchanges send
    (:data:`moelab.wire.WIRES`)."""
    torch.manual_seed(seed)
    device = rank_device()
    moe = MoE(config)
    skew_towards_rank0(moe, skew, world_size)
    timeline = Timeline(cuda=device.type == "cuda")
    ep.shard(moe.to(device), wire=wire, timeline=timeline)
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(tokens, config.d_model, generator=g).to(device).requires_grad_()
    grad = torch.randn(tokens, config.d_model, generator=g).to(device)
    events, seconds = [], []
    for step in range(warmup + steps):
        start_together(timeline)
        y = moe(x)
        (y * grad).sum().backward()
        if step >= warmup:
            seconds.append(timeline.now())
            events.append(timeline.to_list())
    return {"tokens": tokens, "events": events, "seconds": seconds, "output": y.detach()}


def train_rank(rank: int, world_size: int, config: ModelConfig, cfg: train.TrainConfig) -> dict:
    """Train ``config`` on the course corpus with data + expert parallelism, ``cfg.batch_size`` sequences per rank.
    Returns the loss per step (mean over ranks), the validation loss at the end, and the last step's timeline."""
    data = load_corpus()
    torch.manual_seed(cfg.seed)
    model = Transformer(config).to(rank_device())
    for moe in model.moe_layers:
        ep.shard(moe)
    opt = train.make_optimizer(model, cfg)
    timeline = Timeline(cuda=model.device.type == "cuda")
    losses = []
    for step in range(cfg.max_steps):
        last = step == cfg.max_steps - 1
        for moe in model.moe_layers:
            moe.dispatcher.set_timeline(timeline if last else None)
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, cfg)
        x, y = rank_batch(data, step, rank, cfg.batch_size, config.block_size, cfg.seed)
        if last:
            start_together(timeline)
        loss, _ = train.train_step(model, opt, x, y, cfg.grad_clip, timeline=timeline if last else None)
        dist.all_reduce(loss)                       # for the record: the mean of the ranks' losses
        losses.append(loss.item() / world_size)
    for moe in model.moe_layers:
        moe.dispatcher.set_timeline(None)
    val = train.evaluate(model, data, "val", cfg.batch_size, cfg.eval_batches)
    return {"loss": losses, "val": val, "events": timeline.to_list()}


def reference_run(config: ModelConfig, cfg: train.TrainConfig, world_size: int, data: TextData) -> dict:
    """What :func:`train_rank` on ``world_size`` ranks computes, in one process: the same initial weights, and at
    every step all ranks' batches together."""
    torch.manual_seed(cfg.seed)
    model = Transformer(config)
    opt = train.make_optimizer(model, cfg)
    losses = []
    for step in range(cfg.max_steps):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, cfg)
        x, y = global_batch(data, step, world_size, cfg.batch_size, config.block_size, cfg.seed)
        losses.append(train.train_step(model, opt, x, y, cfg.grad_clip)[0].item())
    return {"loss": losses, "val": train.evaluate(model, data, "val", cfg.batch_size, cfg.eval_batches)}


def summary_rank(rank: int, world_size: int, tokens: str = "2048", steps: str = "5", skew: str = "0") -> str:
    """The command-line view of :func:`layer_rank` (arguments arrive as strings from ``torchrun``)::

        torchrun --standalone --nproc-per-node 4 -m moelab.dist moelab.experiments.expert_parallel:summary_rank 2048 5

    Returns, on every rank, one line: the step time (the slowest rank's median), the dispatch payload per token,
    and the rows each rank's experts processed."""
    result = layer_rank(rank, world_size, layer_config(), int(tokens), int(steps), skew=float(skew))
    first = {e["phase"]: e for e in result["events"][0]}
    mine = [sorted(result["seconds"])[len(result["seconds"]) // 2], first["expert"]["rows"],
            (first["dispatch"]["sent"] + first["dispatch"]["local"]) / result["tokens"]]
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, mine)
    step_ms = 1e3 * max(seconds for seconds, _, _ in everyone)
    return (f"{world_size} ranks × {tokens} tokens: {step_ms:.1f} ms per forward + backward (slowest rank); "
            f"dispatch payload {everyone[0][2]:.0f} B per token; expert rows per rank {[r for _, r, _ in everyone]}")
