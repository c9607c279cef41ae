"""Sizing a model before buying hardware: bytes per device for a parallel layout, and MoE traffic per token.

**Memory** (:func:`memory_per_device`). A layout splits ``devices = dp · tp · pp`` ways (:class:`Layout`):
``tp``-way tensor parallelism inside each layer and ``pp`` pipeline stages split every parameter; the routed
experts are instead sharded ``ep`` ways across data-parallel replicas (expert parallelism, ``ep`` dividing ``dp``)
and not split by ``tp`` — each of the ``tp`` ranks holds its experts whole (DeepSeek-V3 uses no ``tp``); ZeRO-1
(Rajbhandari et al. 2020) shards the optimizer states over the replicas that hold the same parameters — ``dp``
of them for the rest of the model, ``dp / ep`` for an expert. Per parameter: its weight in the weight dtype, its
gradient in the gradient dtype, and AdamW's two moments (fp32 by default), plus an fp32 master copy when the
weights are not fp32 (mixed-precision training, Micikevicius et al. 2018) — 16 bytes a parameter in all for BF16
training without ZeRO. Activations for training follow Korthikanti et al. 2022 (Table 2, 16-bit, sequence
parallelism, selective recomputation): ``34 · d_model`` bytes per token per layer, divided by ``tp`` — a
dense-transformer estimate that an MoE's wider FFN activations exceed. All figures are averages over pipeline
stages. The KV cache for inference is :meth:`~moelab.config.ModelConfig.kv_cache_elements` per token and layer
(split by ``tp`` for grouped-query heads; MLA's latent is one per token and is not).

**Traffic** (:func:`moe_traffic`): the rows an MoE layer sends per token — ``top_k`` copies of the hidden state
out (dispatch) and back (combine) — in a wire format (fp32, bf16, or fp8 with one fp32 scale per 128 values, as
:mod:`moelab.wire` counts it), and how many copies at most cross between nodes when each token may reach at most
``node_limit`` nodes and a copy crosses once per node (DeepSeek-V3 §3.2.2).

**Step time** (:func:`moe_step_time`): a training step of a :class:`Cluster` from stated assumptions — compute
``6 · N_active · tokens`` at the devices' FLOP/s times an MFU, and the expert-parallel all-to-alls of every MoE
layer, forward and backward, with the experts spread evenly over the ``nodes`` of the expert-parallel group and
routing uniform: of a token's copies, ``(nodes − 1)/nodes`` cross the network (at most ``node_limit`` per token,
each node once) and ``(G − 1)/G`` of the rest move over NVLink inside the node; NVLink and the network work
at the same time, so a layer's exchange takes the slower of the two. Reported without overlap (compute +
communication) and with perfect overlap (the larger of the two), the bounds between which a real schedule such as
DualPipe falls.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, check, check_int
from .network import Link, cost
from .presets import analytic_counts
from .wire import VALUE_BYTES as DTYPE_BYTES
from .wire import row_bytes

ACTIVATION_BYTES = 34                # per token, layer and hidden unit (Korthikanti et al. 2022, Table 2)


@dataclass(frozen=True)
class Layout:
    """``dp`` data-parallel replicas × ``tp`` tensor-parallel ranks × ``pp`` pipeline stages; the routed experts
    sharded over ``ep`` of the replicas; ``zero1``: optimizer states sharded over the replicas."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero1: bool = False

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep"):
            check_int("Layout", name, getattr(self, name))
        check(self.dp % self.ep == 0, "Layout", "ep", self.ep, f"allowed: a divisor of dp = {self.dp}")

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp


def memory_per_device(config: ModelConfig, layout: Layout, weights: str = "bf16", grads: str | None = None,
                      tokens_per_device: int = 0, kv_tokens: int = 0, kv_dtype: str = "bf16",
                      moments: str = "fp32") -> dict[str, float]:
    """Bytes on one device (see the module docstring): ``weights``, ``gradients``, ``optimizer`` (AdamW's two
    ``moments`` and an fp32 master copy unless the weights are fp32; none if ``grads`` is ``"none"``, for
    inference), ``activations`` for ``tokens_per_device`` tokens in flight, the ``kv_cache`` of ``kv_tokens``
    tokens, and ``total``. ``grads`` defaults to the weights' dtype (bf16 for fp8 weights). DeepSeek-V3's recipe
    is ``weights="bf16", grads="fp32", moments="bf16"`` (its report, §3.3)."""
    for name, value in (("weights", weights), ("kv_dtype", kv_dtype), ("moments", moments)):
        check(value in DTYPE_BYTES, "memory_per_device", name, value, f"allowed: {', '.join(DTYPE_BYTES)}")
    grads = grads or ("bf16" if weights == "fp8" else weights)
    check(grads in (*DTYPE_BYTES, "none"), "memory_per_device", "grads", grads,
          f"allowed: {', '.join(DTYPE_BYTES)}, none")
    counts = analytic_counts(config)
    experts = counts["routed_experts"] / (layout.ep * layout.pp)
    rest = (counts["total"] - counts["routed_experts"]) / (layout.tp * layout.pp)
    params = experts + rest
    optimizer = 0.0
    if grads != "none":
        per_param = 2 * DTYPE_BYTES[moments] + (0 if weights == "fp32" else 4)
        optimizer = per_param * (experts / (layout.dp // layout.ep) + rest / layout.dp if layout.zero1 else params)
    layers = config.n_layer / layout.pp
    kv_split = 1 if config.attention == "mla" else layout.tp
    out = {"weights": params * DTYPE_BYTES[weights],
           "gradients": 0.0 if grads == "none" else params * DTYPE_BYTES[grads],
           "optimizer": optimizer,
           "activations": ACTIVATION_BYTES * config.d_model * layers * tokens_per_device / layout.tp,
           "kv_cache": kv_tokens * config.kv_cache_elements() * layers * DTYPE_BYTES[kv_dtype] / kv_split}
    return {**out, "total": sum(out.values())}


ZERO_STAGES = (0, 1, 2, 3)


def zero_state_per_device(params: float, dp: int, stage: int, weights: str = "fp32", grads: str | None = None,
                          moments: str = "fp32") -> dict[str, float]:
    """Bytes of training state on one of ``dp`` data-parallel ranks for ``params`` parameters under ZeRO
    ``stage`` (Rajbhandari et al. 2020, figure 1): stage 1 shards the optimizer state (AdamW's two ``moments``, and
    an fp32 master copy unless the weights are fp32) over the ranks, stage 2 the gradients too, stage 3 the
    weights too; stage 0 is plain data parallelism. :class:`moelab.zero.Zero` holds this, up to its shards'
    rounding (tests/test_zero.py)."""
    check(stage in ZERO_STAGES, "zero_state_per_device", "stage", stage, "allowed: 0, 1, 2, 3")
    check_int("zero_state_per_device", "dp", dp)
    grads = grads or weights
    for name, value in (("weights", weights), ("grads", grads), ("moments", moments)):
        check(value in DTYPE_BYTES, "zero_state_per_device", name, value, f"allowed: {', '.join(DTYPE_BYTES)}")
    optimizer = params * (2 * DTYPE_BYTES[moments] + (0 if weights == "fp32" else 4))
    return {"parameters": params * DTYPE_BYTES[weights] / (dp if stage >= 3 else 1),
            "gradients": params * DTYPE_BYTES[grads] / (dp if stage >= 2 else 1),
            "optimizer": optimizer / (dp if stage >= 1 else 1)}


def moe_traffic(config: ModelConfig, dispatch: str = "fp8", combine: str = "bf16",
                node_limit: int | None = None) -> dict[str, int]:
    """Bytes per token per MoE layer: ``dispatch`` (``top_k`` rows out) and ``combine`` (``top_k`` rows back),
    counting copies that stay on their rank too (the payload the expert-parallel layer moves), and the most that
    can cross between nodes when a token reaches at most ``node_limit`` nodes and each node once:
    ``min(top_k, node_limit)`` copies each way (``top_k`` without a limit)."""
    k, d = config.top_k, config.d_model
    crossing = k if node_limit is None else min(k, check_int("moe_traffic", "node_limit", node_limit))
    return {"dispatch": k * row_bytes(d, dispatch), "combine": k * row_bytes(d, combine),
            "inter_node_max": crossing * (row_bytes(d, dispatch) + row_bytes(d, combine))}


@dataclass(frozen=True)
class Cluster:
    """Nodes of ``gpus_per_node`` devices of ``flops`` (dense BF16 FLOP/s) reaching ``mfu`` of it; each device's
    ``nvlink`` inside its node and its share of the ``network`` between nodes."""

    name: str
    gpus_per_node: int
    flops: float
    mfu: float
    nvlink: Link
    network: Link


def moe_step_time(config: ModelConfig, cluster: Cluster, nodes: int, tokens_per_device: int, dispatch: str = "fp8",
                  combine: str = "bf16", node_limit: int | None = None) -> dict[str, float]:
    """Seconds of one training step (see the module docstring): ``compute``, ``network`` and ``nvlink`` (the
    all-to-all bytes of every MoE layer, forward and backward, over each), ``communication`` (per layer the
    slower of the two, summed), ``no_overlap`` and ``perfect_overlap``."""
    counts = analytic_counts(config)
    compute = 6 * (counts["active"] - counts["embedding"]) * tokens_per_device / (cluster.flops * cluster.mfu)
    traffic = moe_traffic(config, dispatch, combine)
    row_pair = traffic["dispatch"] / config.top_k + traffic["combine"] / config.top_k   # one copy out and back
    k, G = config.top_k, cluster.gpus_per_node
    crossing = (min(k, node_limit) if node_limit else k) * (nodes - 1) / nodes
    inside = k * (G - 1) / G                     # copies that reach another device of the node, directly or forwarded
    layers = config.n_layer - config.first_k_dense if config.n_routed_experts else 0
    per_layer = {"network": crossing * row_pair * tokens_per_device / cluster.network.beta + cluster.network.alpha,
                 "nvlink": inside * row_pair * tokens_per_device / cluster.nvlink.beta + cluster.nvlink.alpha}
    network, nvlink = (2 * layers * per_layer[link] for link in ("network", "nvlink"))   # forward and backward
    communication = 2 * layers * max(per_layer.values())
    return {"compute": compute, "network": network, "nvlink": nvlink, "communication": communication,
            "no_overlap": compute + communication, "perfect_overlap": max(compute, communication)}


def data_parallel_step(params: float, tokens: float, nodes: int, link: Link, flops: float,
                       H: int = 100) -> dict[str, float]:
    """Seconds per step of data parallelism across ``nodes`` nodes joined by ``link`` (each node's bandwidth to
    the others): ``compute``, ``6 · params · tokens`` FLOPs (Kaplan et al. 2020: forward 2, backward 4 per
    parameter per token) at ``flops`` per second for a node's ``tokens``; ``all_reduce``, the ring all-reduce of
    the fp32 gradients (:func:`moelab.network.cost`, not overlapped with the compute); and ``diloco_int8``, the
    ring all-reduce of INT8 pseudo-gradients (1 + 4/128 bytes a value) every
    ``H`` steps, per step."""
    return {"compute": 6 * params * tokens / flops,
            "all_reduce": cost("ring_all_reduce", 4 * params, nodes, link),
            "diloco_int8": cost("ring_all_reduce", params * (1 + 4 / 128), nodes, link) / H}
