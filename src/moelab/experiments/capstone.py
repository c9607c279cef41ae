"""The capstone: a small MoE language model trained on 2 nodes × 2 devices, from plain EP + DDP to everything at once.

Every rank holds a quarter of each MoE layer's experts (expert parallelism over all four ranks, across the slow
link) and a replica of everything else. :data:`SETUPS` is a ladder; each rung adds one idea of the course to the
one before, so that the bytes on each link class, the simulated time and the validation loss show what each buys:

- ``naive``: plain EP + DDP. Every (token, expert) choice travels on its own (:func:`moelab.ep.expert_parallel`),
  fp32; the replicated gradients are ring-all-reduced over all four ranks every step (DDP's flat ring).
- ``two_hop``: one copy of a token per node it needs (:func:`moelab.twohop.two_hop_expert_parallel`).
- ``node_limited``: each token's experts on one node (``n_group = nodes``, ``topk_group = 1``: DeepSeek-V3's
  node-limited routing with M = 1), so at most one copy crosses the slow link.
- ``fp8``: moelab's FP8 wire (:data:`moelab.wire.WIRES`): the forward dispatch in FP8 E4M3 with 1×128 scales, the
  combine and both backward trips in BF16. DeepSeek-V3 (§3.3.3) also sends the activation gradient before the
  down-projection in FP8; only its combines stay BF16.
- ``diloco``: DiLoCo across the nodes (Douillard et al. 2023) for the replicated weights — all-reduced inside a
  node every step, over the fast links, and across the nodes only every ``H`` steps, by an outer Nesterov step on
  the pseudo-gradients (:func:`moelab.diloco.outer_step` over a hierarchical all-reduce). The experts are not
  replicated, so they are not averaged: they learn every step from every rank's tokens, as in all the rungs.

Every exchange goes over one virtual :class:`~moelab.network.Network` (time simulated, nothing slept), and
:func:`analytic_bytes` counts what each rung must send from the routing alone; the two agree exactly
(tests/test_capstone.py). Notebook 14 runs the ladder briefly; benchmarks/capstone.py runs it long.

Shapes: ``T`` tokens on a rank per step, ``k`` choices per token.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import ep, train
from ..collectives import hierarchical_all_reduce, ring_all_reduce
from ..config import ModelConfig, check
from ..data import load_corpus, rank_batch
from ..diloco import outer_step
from ..dist import rank_device
from ..model import Transformer
from ..network import Network, add_by_class, chunk_sizes, ring_bytes
from ..presets import lm_config
from ..wire import round_trip_bytes
from .two_tier import TwoTierRun

SETUPS = {
    "naive": "plain EP + DDP: every choice its own fp32 row; all-reduce every step over all ranks",
    "two_hop": "+ two-hop dispatch: one copy of a token per node",
    "node_limited": "+ node-limited routing: every token's experts on one node",
    "fp8": "+ FP8 dispatch; combine and backward rows in BF16",
    "diloco": "+ DiLoCo across the nodes: all-reduce inside a node, across every H steps",
}
RUNGS = list(SETUPS)


def has(setup: str, rung: str) -> bool:
    """Whether ``setup`` includes ``rung`` (the ladder is cumulative)."""
    return RUNGS.index(setup) >= RUNGS.index(rung)


@dataclass(frozen=True)
class CapstoneConfig(TwoTierRun):
    """One comparison of notebook 14: the settings of :class:`~moelab.experiments.two_tier.TwoTierRun` (DiLoCo's
    outer step as in notebook 10), with shorter defaults."""

    steps: int = 40
    batch_size: int = 8
    warmup_steps: int = 5
    H: int = 10
    eval_every: int = 20
    eval_batches: int = 4


def model_config(setup: str, vocab_size: int, run: CapstoneConfig) -> ModelConfig:
    """Notebook 05's small MoE LM (8 experts, top-2), node-limited from the ``node_limited`` rung on."""
    config = lm_config(vocab_size)
    return dataclasses.replace(config, n_group=run.nodes, topk_group=1) if has(setup, "node_limited") else config


def run_setup(rank: int, setup: str, run: CapstoneConfig, data) -> dict:
    """Train with ``setup`` on this rank (all ranks evaluate together: the experts are sharded). Returns the
    evaluations (step, validation loss, this rank's bytes per link class so far, simulated seconds), this rank's
    bytes per link class, every MoE layer's routing at every step (for :func:`analytic_bytes`), and a fingerprint
    of its replicated weights (``replica``: equal on all ranks when the replicas agree)."""
    if setup not in SETUPS:
        raise ValueError(f"setup = {setup!r} is not allowed; allowed: {', '.join(SETUPS)}")
    topology = run.topology
    net = Network(topology, run.intra, run.inter, virtual=True)
    torch.manual_seed(run.seed)
    config = model_config(setup, data.tokenizer.vocab_size, run)
    model = Transformer(config).to(rank_device())
    wire = "fp8" if has(setup, "fp8") else "fp32"
    for moe in model.moe_layers:
        ep.shard(moe, wire=wire, net=net, two_hop=topology if has(setup, "two_hop") else None)
    cfg = run.train_config()
    opt = train.make_optimizer(model, cfg)
    node = topology.node_ranks(topology.node(rank))
    if has(setup, "diloco"):
        local_params = ep.replicated_parameters(model)
        global_params = [p.detach().clone().requires_grad_() for p in local_params]
        outer_opt = torch.optim.SGD(global_params, lr=run.outer_lr, momentum=run.outer_momentum,
                                    nesterov=run.outer_momentum > 0)
        sync, replicas = (lambda t: ring_all_reduce(t, net, ranks=node)), len(node)
    else:
        sync, replicas = (lambda t: ring_all_reduce(t, net)), topology.world
    evals, routing = [], []

    def evaluate(step: int) -> None:
        with net.paused():
            val = train.evaluate(model, data, "val", run.batch_size, run.eval_batches)
        evals.append({"step": step, "val": val, "sent_bytes": dict(net.sent_bytes), "seconds": net.now() - start,
                      "link_seconds": net.link_seconds})

    dist.barrier()
    net.reset()
    start = net.now()
    evaluate(0)
    for step in range(run.steps):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, cfg)
        x, y = rank_batch(data, step, rank, run.batch_size, config.block_size, run.seed)
        train.train_step(model, opt, x, y, cfg.grad_clip, all_reduce=sync, replicas=replicas)
        routing.append([moe.indices.reshape(-1, config.top_k).cpu() for moe in model.moe_layers])
        if has(setup, "diloco") and (step + 1) % run.H == 0:
            outer_step(global_params, local_params, outer_opt, lambda t: hierarchical_all_reduce(t, topology, net))
        if (step + 1) % run.eval_every == 0:
            evaluate(step + 1)
    copy = torch.cat([p.detach().flatten() for p in ep.replicated_parameters(model)]).double()
    return {"evals": evals, "sent_bytes": dict(net.sent_bytes), "routing": routing,
            "n_replicated": copy.numel(), "replica": float((copy * torch.arange(1.0, copy.numel() + 1)).sum())}


def analytic_bytes(setup: str, run: CapstoneConfig, config: ModelConfig, n_replicated: int,
                   routing: list[list[list[torch.Tensor]]]) -> dict[str, int]:
    """Bytes all ranks must send per link class for ``setup``, from ``routing[rank][step][layer]`` (each rank's
    chosen experts ``(T, k)``) and the sizes alone:

    - expert parallelism, per layer and step: the row counts (int64) to every peer; every row that leaves its rank
      (a (token, expert) choice, or with two hops a (token, node) copy across and a (copy, expert) row inside,
      plus the copy's ``k`` expert ids and gates in fp32, and their gradients) at :func:`moelab.wire.round_trip_bytes`;
    - the replicated gradients and the experts' squared norm, ring-all-reduced every step over all ranks or, with
      DiLoCo, inside the node, plus every ``H`` steps the pseudo-gradients' hierarchical all-reduce.
    """
    topology, net = run.topology, Network(run.topology, run.intra, run.inter)
    p, G, k, d = topology.world, topology.per_node, config.top_k, config.d_model
    E_local = config.n_routed_experts // p
    wire = "fp8" if has(setup, "fp8") else "fp32"
    total: dict[str, int] = {}

    def send(a: int, b: int, n: int) -> None:
        if a != b and n:
            name = net.link(a, b).name
            total[name] = total.get(name, 0) + n

    for r, steps in enumerate(routing):
        for layers in steps:
            for indices in layers:
                owner = indices // E_local                                        # rank of each choice's expert
                if not has(setup, "two_hop"):
                    for j in range(p):
                        send(r, j, 8 * E_local)
                        send(r, j, int((owner == j).sum()) * round_trip_bytes(d, wire))
                    continue
                node, local = topology.node(r), topology.local(r)
                for m in range(topology.nodes):
                    peer = topology.rank(m, local)
                    send(r, peer, 8)
                    chose = (owner // G == m)                                        # (T, k): choices on node m
                    copies = int(chose.any(1).sum())
                    send(r, peer, copies * (round_trip_bytes(d, wire) + 2 * 4 * 2 * k))
                    for j in topology.node_ranks(m):              # forwarded inside node m, a row per choice
                        send(peer, j, int((owner == j).sum()) * round_trip_bytes(d, wire))
                for j in topology.node_ranks(node):
                    send(r, j, 8 * E_local)
    n = n_replicated + 1                                                             # + the experts' squared norm
    for r in range(p):
        ring = topology.node_ranks(topology.node(r)) if has(setup, "diloco") else list(range(p))
        right = ring[(ring.index(r) + 1) % len(ring)]
        send(r, right, run.steps * ring_bytes(n, len(ring), ring.index(r)))
        if has(setup, "diloco"):
            outer = run.steps // run.H
            local, node = topology.local(r), topology.node(r)
            inside = topology.node_ranks(node)
            send(r, inside[(local + 1) % G], outer * ring_bytes(n_replicated, G, local))
            across = topology.peers(local)
            send(r, across[(node + 1) % len(across)],
                 outer * ring_bytes(chunk_sizes(n_replicated, G)[local], len(across), node))
    return total


def compare_rank(rank: int, world_size: int, setups: tuple[str, ...], run: CapstoneConfig) -> dict | None:
    """Every setup in turn (launch on ``run.nodes × run.per_node`` ranks). Rank 0 returns, per setup: its
    evaluations with the bytes all ranks had sent per link class by then, the final validation loss and simulated
    seconds, and the bytes per link class measured and counted by :func:`analytic_bytes`."""
    check(world_size == run.topology.world, "compare_rank", "world_size", world_size,
          f"allowed: run.nodes × run.per_node = {run.topology.world}")
    data = load_corpus()
    results = {}
    for setup in setups:
        mine = run_setup(rank, setup, run, data)
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            config = model_config(setup, data.tokenizer.vocab_size, run)
            measured = add_by_class(r["sent_bytes"] for r in everyone)
            evals = [{"step": e["step"], "val": e["val"], "seconds": e["seconds"], "link_seconds": e["link_seconds"],
                      "sent_by_class": add_by_class(r["evals"][i]["sent_bytes"] for r in everyone)}
                     for i, e in enumerate(mine["evals"])]
            results[setup] = {
                "evals": evals, "val": evals[-1]["val"], "seconds": evals[-1]["seconds"],
                "link_seconds": evals[-1]["link_seconds"],
                "sent_by_class": measured, "replicas": [r["replica"] for r in everyone],
                "analytic_by_class": analytic_bytes(setup, run, config, mine["n_replicated"],
                                                    [r["routing"] for r in everyone])}
    return results if rank == 0 else None
