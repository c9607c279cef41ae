"""Data parallelism over a slow link: every method of notebooks/10_slow_link_training.ipynb on the same ranks.

:func:`compare_rank` trains the small MoE language model of notebook 05 (:func:`lm_config`) data-parallel on every
rank, once per method, over a virtual :class:`~moelab.network.Network` (two-level: fast links inside a node, slow
ones between nodes; time simulated, nothing slept), and records the validation loss against the bytes sent and
the simulated wall-clock. Methods (:data:`METHODS`):

- ``ddp``: torch's DistributedDataParallel with its ``allreduce_hook`` — every step, every gradient, fp32;
- ``fp16``, ``powersgd``: torch's ``fp16_compress_hook`` and ``powerSGD_hook``;
- ``int8``: :func:`moelab.ddp_hooks.int8_hook`, the INT8 all-reduce with error feedback;
- ``local_sgd``: ``H`` AdamW steps alone, then the parameters averaged (an outer SGD step, lr 1, no momentum);
- ``diloco``: ``H`` inner AdamW steps, then an outer Nesterov SGD step on the averaged pseudo-gradient;
- ``diloco_int8``: the same with the INT8 all-reduce of the pseudo-gradients (INTELLECT-1's choice).

Every DDP hook runs over :class:`~moelab.ddp_hooks.LinkGroup`, every outer step over the same ring, so all bytes
cross the emulated links and are counted per link class. Each method is also counted analytically from what it
was asked to send (:func:`analytic_bytes`); the two agree exactly (tests/test_slowlink.py). The short runs of
notebook 10 and the long runs of benchmarks/slow_link.py both come from here.

Simulated time is this laptop's compute, measured, plus the emulated links' α-β time instead of loopback's.
Two things make it pessimistic for DDP: the simulation does not overlap a bucket's all-reduce with the rest of
the backward pass (real DDP does), and four ranks share two cores, so the measured compute is about twice a
dedicated core's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from .. import train
from ..collectives import ring_all_reduce
from ..compression import int8_all_reduce, int8_message_bytes
from ..config import check, check_int
from ..data import load_corpus, rank_batch
from ..ddp_hooks import BucketLog, Int8HookState, LinkGroup, int8_hook, logged, powersgd_sizes
from ..diloco import outer_step
from ..dist import rank_device
from ..model import Transformer
from ..network import Network, add_by_class, ring_bytes
from ..presets import lm_config
from .two_tier import TwoTierRun

METHODS = {
    "ddp": "DDP, fp32 all-reduce of every gradient every step",
    "fp16": "DDP + torch's fp16 compression hook",
    "powersgd": "DDP + torch's PowerSGD hook",
    "int8": "DDP + INT8 all-reduce with error feedback",
    "local_sgd": "local AdamW steps, parameters averaged every H",
    "diloco": "DiLoCo: H inner AdamW steps, outer Nesterov SGD",
    "diloco_int8": "DiLoCo with an INT8 pseudo-gradient all-reduce",
}
HOOKS = ("ddp", "fp16", "powersgd", "int8")
BUCKET_MB = 25                      # DDP's default bucket size, given explicitly: one bucket for these models


@dataclass(frozen=True)
class SlowLinkConfig(TwoTierRun):
    """One comparison of notebook 10 (see :class:`TwoTierRun`), and PowerSGD's rank and the step it starts at
    (vanilla all-reduce before)."""

    powersgd_rank: int = 2
    powersgd_start: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(type(self).__name__, "powersgd_rank", self.powersgd_rank)
        check_int(type(self).__name__, "powersgd_start", self.powersgd_start, minimum=2)   # torch's needs >= 2


def analytic_bytes(method: str, run: SlowLinkConfig, rank: int, n_params: int, log: BucketLog) -> int:
    """What ``rank`` must send for ``method``, counted from the buckets DDP handed the hook (``log``) or from the
    number of outer steps: a ring all-reduce of each bucket or of all ``n_params`` pseudo-gradients, at 4 bytes
    a value (fp32), 2 (fp16) or 1 plus an fp32 scale per 128 (INT8); PowerSGD's vanilla steps, then its three
    all-reduces (uncompressed tensors, P, Q) per bucket."""
    p = run.world_size
    outer_steps = run.steps // run.H
    if method == "local_sgd" or method == "diloco":
        return outer_steps * ring_bytes(n_params, p, rank)
    if method == "diloco_int8":
        return outer_steps * ring_bytes(n_params, p, rank, int8_message_bytes)
    if method == "fp16":
        return sum(ring_bytes(n, p, rank, lambda k: 2 * k) for n, _ in log.calls)
    if method == "int8":
        return sum(ring_bytes(n, p, rank, int8_message_bytes) for n, _ in log.calls)
    if method == "powersgd":
        buckets_per_step = len(log.calls) // run.steps
        vanilla = log.calls[:run.powersgd_start * buckets_per_step]
        compressed = log.calls[run.powersgd_start * buckets_per_step:]
        return sum(ring_bytes(n, p, rank) for n, _ in vanilla) + sum(
            ring_bytes(size, p, rank) for _, shapes in compressed
            for size in powersgd_sizes(shapes, run.powersgd_rank))
    return sum(ring_bytes(n, p, rank) for n, _ in log.calls)


@dataclass
class MethodState:
    """One method's model, optimizers and hook on one rank (:func:`build`)."""

    model: Transformer
    opt: torch.optim.Optimizer
    ddp: DistributedDataParallel | None = None
    global_params: list[torch.Tensor] = field(default_factory=list)
    outer_opt: torch.optim.Optimizer | None = None
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None


def build(method: str, run: SlowLinkConfig, net: Network, log: BucketLog, vocab_size: int) -> MethodState:
    """The model (seeded alike on every rank, on :func:`~moelab.dist.rank_device`) and, for ``method``: DDP with
    its hook over ``LinkGroup(net)`` (buckets logged in ``log``), or the global parameters, the outer SGD and the
    all-reduce over ``net``."""
    torch.manual_seed(run.seed)
    model = Transformer(lm_config(vocab_size)).to(rank_device())
    state = MethodState(model, train.make_optimizer(model, run.train_config()))
    if method in HOOKS:
        state.ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
        hook, hook_state = {
            "ddp": (default_hooks.allreduce_hook, LinkGroup(net)),
            "fp16": (default_hooks.fp16_compress_hook, LinkGroup(net)),
            "powersgd": (powerSGD_hook.powerSGD_hook, powerSGD_hook.PowerSGDState(
                process_group=LinkGroup(net), matrix_approximation_rank=run.powersgd_rank,
                start_powerSGD_iter=run.powersgd_start, random_seed=run.seed)),
            "int8": (int8_hook, Int8HookState(net)),
        }[method]
        state.ddp.register_comm_hook(hook_state, logged(hook, log))
        return state
    state.global_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    lr, momentum = (1.0, 0.0) if method == "local_sgd" else (run.outer_lr, run.outer_momentum)
    state.outer_opt = torch.optim.SGD(state.global_params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    reduce = int8_all_reduce if method == "diloco_int8" else ring_all_reduce
    state.all_reduce = lambda t: reduce(t, net)
    return state


def method_step(state: MethodState, step: int, run: SlowLinkConfig, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on this rank's batch: through DDP (its hook averages the gradients), or alone, with
    an outer step after every ``H``-th. Returns this rank's loss."""
    cfg = run.train_config()
    for group in state.opt.param_groups:
        group["lr"] = train.lr_at(step, cfg)
    loss, _ = train.train_step(state.model, state.opt, x, y, cfg.grad_clip, forward=state.ddp)
    if state.ddp is None and (step + 1) % run.H == 0:
        outer_step(state.global_params, list(state.model.parameters()), state.outer_opt, state.all_reduce)
    return loss.item()


def run_method(rank: int, method: str, run: SlowLinkConfig, data) -> dict:
    """Train with ``method`` on this rank; rank 0 evaluates. Returns the evaluations (rank 0's: step, validation
    loss, bytes this rank sent, simulated seconds, seconds on the links), and this rank's bytes per link class,
    messages, and sent bytes measured and counted analytically."""
    if method not in METHODS:
        raise ValueError(f"method = {method!r} is not allowed; allowed: {', '.join(METHODS)}")
    net = Network(run.topology, run.intra, run.inter, virtual=True)
    log = BucketLog()
    state = build(method, run, net, log, data.tokenizer.vocab_size)
    evals = []

    def evaluate(step: int) -> None:
        if rank == 0:
            with net.paused():
                val = train.evaluate(state.model, data, "val", run.batch_size, run.eval_batches)
            evals.append({"step": step, "val": val, "sent": sum(net.sent_bytes.values()),
                          "seconds": net.now() - start, "link_seconds": net.link_seconds})

    dist.barrier()
    net.reset()
    start = net.now()
    evaluate(0)
    for step in range(run.steps):
        x, y = rank_batch(data, step, rank, run.batch_size, state.model.config.block_size, run.seed)
        method_step(state, step, run, x, y)
        if (step + 1) % run.eval_every == 0:
            evaluate(step + 1)
    n_params = sum(p.numel() for p in state.model.parameters())
    return {"evals": evals, "sent_bytes": dict(net.sent_bytes), "messages": dict(net.messages),
            "sent": sum(net.sent_bytes.values()), "analytic": analytic_bytes(method, run, rank, n_params, log),
            "n_params": n_params}


def compare_rank(rank: int, world_size: int, methods: tuple[str, ...], run: SlowLinkConfig) -> dict | None:
    """Every method in turn on this rank (launch it on ``run.world_size`` ranks). Rank 0 returns, per method: its
    evaluations, the final validation loss, the simulated seconds, and every rank's bytes (per link class, sent,
    analytic); the other ranks return ``None``."""
    check(world_size == run.world_size, "compare_rank", "world_size", world_size,
          f"allowed: run.nodes × run.per_node = {run.world_size}")
    data = load_corpus()
    results = {}
    for method in methods:
        mine = run_method(rank, method, run, data)
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, {k: mine[k] for k in ("sent_bytes", "messages", "sent", "analytic")})
        if rank == 0:
            by_class = add_by_class(r["sent_bytes"] for r in everyone)
            results[method] = {"evals": mine["evals"], "val": mine["evals"][-1]["val"],
                               "seconds": mine["evals"][-1]["seconds"], "n_params": mine["n_params"],
                               "sent_by_class": by_class, "sent": [r["sent"] for r in everyone],
                               "analytic": [r["analytic"] for r in everyone],
                               "messages": [sum(r["messages"].values()) for r in everyone]}
    return results if rank == 0 else None
