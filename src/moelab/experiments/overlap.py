"""The overlap chapter's measurements on an emulated cluster: an EP block, a DP step and pipeline schedules.

All three run on real gloo ranks and time computation in each rank's CPU time (``Network(cpu_time=True)``,
``time.thread_time``), as if every rank had a core of its own: four ranks share the laptop's two cores, and the
wall clock would charge each rank for the others' work. Communication takes its α-β time on the emulated links
(:class:`~moelab.network.Network`, virtual), in flight while the rank computes.

- :func:`ep_rank`: two blocks with expert-parallel MoEs (the capstone's two nodes of two ranks, fast links inside
  a node, slow between), a step (forward and backward) as one batch, as two micro-batches in turn, as two
  micro-batches overlapped, and as DeepSeek-V3's forward-and-backward pairs (:func:`moelab.overlap.block_step`).
- :func:`dp_rank`: a data-parallel step of a small LM on two nodes over the slow link: one all-reduce after
  backward, buckets launched from backward hooks (:class:`moelab.buckets.BucketedAllReduce`), and torch's DDP
  with its own buckets, whose launch times a comm hook records and the same link model turns into a time.
- :func:`pipeline_timelines`: one step of each pipeline schedule on four ranks, every action's CPU time
  measured, the actions then placed as soon as their inputs are there (:func:`moelab.schedules.replay`).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import overlap, pipeline
from ..buckets import BucketedAllReduce
from ..config import ModelConfig
from ..dist import launch
from ..ep import shard
from ..model import Transformer
from ..network import FAST, SLOW, Network, Topology, cost
from ..presets import BALANCE
from ..schedules import measured_bubbles, replay, schedule

# Experts wide enough that computation and communication take about as long on the emulated links (DeepSeek-V3
# §3.2.1: cross-node expert parallelism at a computation-to-communication ratio of about 1:1).
EP_BLOCKS = ModelConfig(vocab_size=64, block_size=128, n_layer=2, n_head=4, n_kv_head=4, d_model=128,
                        n_routed_experts=8, top_k=2, d_expert=2048, **BALANCE)
DP_LM = ModelConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_kv_head=4, d_model=128, d_ff=512)
PIPELINE_LM = ModelConfig(vocab_size=256, block_size=64, n_layer=8, n_head=4, n_kv_head=4, d_model=256,
                          n_routed_experts=8, top_k=2, d_expert=256, **BALANCE)
EP_VARIANTS = {"one batch": (1, "in turn"), "two micro-batches in turn": (2, "in turn"),
               "two micro-batches overlapped": (2, "overlapped"),
               "two micro-batches, F&B pairs": (2, "F&B pairs")}        # name: (micro-batches, order of the pieces)


def ep_rank(rank: int, world: int, config: ModelConfig = EP_BLOCKS, batch: int = 16, steps: int = 3) -> dict:
    """Per variant of :data:`EP_VARIANTS`: each step's ``(seconds, compute, comm)`` on this rank after a warm-up
    step, the variants in a turning order, and the last step's :class:`~moelab.overlap.StepTimes`; whether the
    outputs of the three variants agree (``same``)."""
    torch.manual_seed(0)
    model = Transformer(config)
    net = Network(Topology(2, world // 2), FAST, SLOW, virtual=True, cpu_time=True)
    blocks = []
    for block in model.layers:
        shard(block.ffn)
        blocks.append(overlap.OverlappedBlock(block, model.rope_cos, model.rope_sin, net))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, config.block_size, config.d_model, generator=g)
    grad_y = torch.randn(x.shape, generator=g)
    out, ys = {}, {}
    names = list(EP_VARIANTS)
    for step in range(steps + 1):                       # the first step warms up; the order turns every step
        for name in names[step % len(names):] + names[:step % len(names)]:
            m, order = EP_VARIANTS[name]
            dist.barrier()
            net.reset()
            y, _, times = overlap.block_step(blocks, list(x.chunk(m)), list(grad_y.chunk(m)), order)
            model.zero_grad()
            ys[name] = torch.cat(y)
            if step:
                record = out.setdefault(name, {"steps": []})
                record["steps"].append((times.seconds, sum(e - s for _, s, e in times.compute),
                                        sum(e - s for _, s, e in times.comm)))
                record["timeline"] = times
    out["same"] = all(torch.allclose(y, ys["one batch"], rtol=1e-4, atol=1e-5) for y in ys.values())
    return out


def dp_rank(rank: int, world: int, config: ModelConfig = DP_LM, batch: int = 56, bucket_bytes: int = 1_000_000,
            steps: int = 3) -> dict:
    """Per way (``"after backward"``, ``"buckets"``, ``"ddp"``): each step's ``(seconds, link, backward)`` on the
    emulated slow link — the forward, backward and all-reduce; the all-reduce's α-β seconds; when backward
    returned — the buckets' sizes, and whether the three ways' gradients agree (``same``)."""
    torch.manual_seed(0)
    model = Transformer(config)
    net = Network(Topology(world, 1), FAST, SLOW, virtual=True, cpu_time=True)
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(config.vocab_size, (batch, config.block_size), generator=g)
    ddp_times: list[tuple[float, int]] = []

    def record(state, bucket):                          # DDP calls this as each of its buckets is ready
        ddp_times.append((net.now(), bucket.buffer().numel() * bucket.buffer().element_size()))
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world)

    twin = copy.deepcopy(model)                         # DDP's hooks stay on a model of their own
    ddp = DistributedDataParallel(twin, bucket_cap_mb=bucket_bytes / 2**20)
    ddp.register_comm_hook(None, record)
    out: dict = {}
    grads = {}
    for step in range(steps + 1):                       # the first step warms up (DDP builds its buckets in it)
        for way in ("after backward", "buckets", "ddp"):
            used = twin if way == "ddp" else model
            used.zero_grad(set_to_none=True)
            dist.barrier()
            net.reset()
            start = net.now()
            if way == "ddp":
                ddp_times.clear()
                ddp(idx, idx)[1].backward()
                backward = net.now() - start
                seconds = _ddp_time(ddp_times, backward + start, world, net) - start
                link = sum(cost("ring_all_reduce", n, world, net.inter) for _, n in ddp_times)
                buckets_sizes = [n for _, n in ddp_times]
            else:
                buckets = BucketedAllReduce(model.parameters(), bucket_bytes, net, overlap=way == "buckets")
                model(idx, idx)[1].backward()
                backward = net.now() - start
                buckets.finish()
                buckets.remove()
                seconds = net.now() - start
                link = sum(s for _, _, s in buckets.launched)
                buckets_sizes = [b.nbytes for b in buckets.buckets]
            if step:
                out.setdefault(way, {"steps": []})["steps"].append((seconds, link, backward))
                out[way]["buckets"] = buckets_sizes
            grads[way] = torch.cat([p.grad.flatten() for p in used.parameters()])
    out["same"] = all(torch.allclose(v, grads["after backward"], rtol=1e-5, atol=1e-7) for v in grads.values())
    return out


def _ddp_time(ready: list[tuple[float, int]], backward_end: float, world: int, net: Network) -> float:
    """When DDP's step ends on the emulated link: each bucket's ring all-reduce begins when the last rank had it
    ready and the link is free, and the step ends after the last bucket or backward, whichever is later."""
    stamps = torch.tensor([t for t, _ in ready] + [backward_end], dtype=torch.float64)
    dist.all_reduce(stamps, op=dist.ReduceOp.MAX)
    free = -float("inf")
    for t, (_, n) in zip(stamps[:-1].tolist(), ready):
        free = max(free, t) + cost("ring_all_reduce", n, world, net.inter)
    return max(free, float(stamps[-1]))


def ep_summary(results: list[dict]) -> dict:
    """Per variant, the median over steps of the slowest rank's step, compute and comm seconds."""
    out = {}
    for name in EP_VARIANTS:
        steps = len(results[0][name]["steps"])
        per_step = [max(r[name]["steps"][k] for r in results) for k in range(steps)]
        out[name] = {key: statistics.median(s[i] for s in per_step) for i, key in
                     enumerate(("seconds", "compute", "comm"))}
    return out


def dp_summary(results: list[dict]) -> dict:
    """Per way, medians over steps of the slowest rank's step, the all-reduce's link seconds and the share of it
    hidden behind backward: ``1 − (step − backward) / link``, what the step lasted after the slowest rank's
    backward returned."""
    out = {}
    for way in ("after backward", "buckets", "ddp"):
        steps = len(results[0][way]["steps"])
        per_step = [[max(r[way]["steps"][k][i] for r in results) for i in range(3)] for k in range(steps)]
        out[way] = {"seconds": statistics.median(s[0] for s in per_step),
                    "link": statistics.median(s[1] for s in per_step),
                    "hidden": statistics.median(1 - (s[0] - s[2]) / s[1] for s in per_step),
                    "buckets": len(results[0][way]["buckets"])}
    return out


def pipeline_rank(rank: int, world: int, config: ModelConfig, name: str, microbatches: int, batch: int,
                  steps: int = 4) -> dict:
    """Steps of schedule ``name`` on this rank's stages (:func:`moelab.pipeline.stages_for`), every action timed
    in this rank's CPU time. Returns each action's least time over the steps after the first (which touches
    fresh memory; the least is the one the other processes on the cores disturbed least), the loss share, the
    most micro-batches held and the parameters held."""
    torch.manual_seed(0)
    model = Transformer(config)
    stages = pipeline.stages_for(model, name, rank, world)
    idx, targets = pipeline.random_batch(config, batch, seed=0)
    seconds: dict[str, float] = {}
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        record = pipeline.run_schedule(stages, schedule(name, world, microbatches)[rank], idx, targets,
                                       microbatches, clock=time.thread_time)
        for label, start, end in record.events if step else ():
            seconds[label] = min(seconds.get(label, float("inf")), end - start)
    params = sum(q.numel() for stage in ((stages,) if isinstance(stages, pipeline.Stage) else stages)
                 for q in stage.parameters())
    return {"seconds": seconds, "loss": record.loss, "held": record.held, "parameters": params}


def pipeline_timelines(name: str, stages: int = 4, microbatches: int = 8, config: ModelConfig = PIPELINE_LM,
                       batch: int = 16) -> dict:
    """One step of schedule ``name`` on ``stages`` ranks: each action's measured CPU seconds, the timeline they
    make when each starts as soon as its input is there, each rank's idle share of it, and the most
    micro-batches each rank held."""
    results = launch(pipeline_rank, stages, args=(config, name, microbatches, batch), timeout=300)
    plan = schedule(name, stages, microbatches)
    seconds = [r["seconds"] for r in results]
    timeline = replay(plan, lambda r, a: seconds[r][repr(a)])
    return {"seconds": seconds, "timeline": timeline, "bubbles": measured_bubbles(timeline),
            "held": [r["held"] for r in results], "parameters": [r["parameters"] for r in results],
            "loss": sum(r["loss"] for r in results)}
