"""Checks for the exercises of notebooks/00_orientation.ipynb: sizing an MoE by hand.

Three checks: counting an MoE's parameters, the devices its weights need, and the bytes its tokens send between
nodes.

References: :func:`moelab.presets.analytic_counts` (the fact sheet's parameter formulas, §1.4),
:func:`moelab.sizing.memory_per_device` and :func:`moelab.sizing.moe_traffic` (node-limited dispatch in FP8 with
1×128 scales, combine in BF16: DeepSeek-V3 report, arXiv:2412.19437 §3.2.2 and §3.3).
"""
from __future__ import annotations

import math

import torch

from .. import presets, sizing, wire
from ..config import ModelConfig
from .core import Case, Verdict, case, describe, run_check, seeded

__all__ = ["check_moe_params", "check_devices_for_weights", "check_inter_node_bytes"]


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """One integer in ``[low, high)`` from a check's generator."""
    return int(torch.randint(low, high, (1,), generator=g))


def _moe_params(d_model: int, d_expert: int, n_routed: int, n_shared: int, top_k: int,
                n_moe_layers: int) -> tuple[int, int]:
    """moelab's ``(total, active)`` restricted to the MoE parts (routed and shared experts, routers) of a model
    whose every layer is this MoE layer (one attention head, so any even ``d_model`` is a valid config)."""
    config = ModelConfig(vocab_size=2, n_layer=n_moe_layers, n_head=1, d_model=d_model, n_routed_experts=n_routed,
                         n_shared_experts=n_shared, top_k=top_k, d_expert=d_expert)
    counts = presets.analytic_counts(config)
    total = counts["routed_experts"] + counts["shared_experts"] + counts["routers"]
    return total, total - (counts["total"] - counts["active"])


def _shared_not_active(**kw) -> tuple[int, int]:
    total, active = _moe_params(**kw)
    return total, active - kw["n_moe_layers"] * kw["n_shared"] * 3 * kw["d_model"] * kw["d_expert"]


def _two_matrix_experts(**kw) -> tuple[int, int]:
    total, active = _moe_params(**kw)
    matrix = kw["n_moe_layers"] * kw["d_model"] * kw["d_expert"]
    return total - (kw["n_routed"] + kw["n_shared"]) * matrix, active - (kw["top_k"] + kw["n_shared"]) * matrix


def _no_routers(**kw) -> tuple[int, int]:
    routers = kw["n_moe_layers"] * kw["n_routed"] * kw["d_model"]
    total, active = _moe_params(**kw)
    return total - routers, active - routers


def check_moe_params(fn) -> Verdict:
    """Exercise 00.1: ``fn(d_model, d_expert, n_routed, n_shared, top_k, n_moe_layers) -> (total, active)``, the
    parameters of a model's MoE parts — routed experts, shared experts, routers — and how many one token uses.

    A SwiGLU expert has ``3 · d_model · d_expert`` parameters; a router one ``d_model`` vector per routed expert
    (its selection bias is a buffer). Against :func:`moelab.presets.analytic_counts`; the first input is Kimi K2
    (``moonshotai/Kimi-K2-Instruct`` config.json) with ``top_k = 16``.
    """
    g = seeded(1000)
    cases = [case(d_model=7168, d_expert=2048, n_routed=384, n_shared=1, top_k=16, n_moe_layers=60),
             case(d_model=4096, d_expert=1536, n_routed=128, n_shared=0, top_k=8, n_moe_layers=94),
             case(d_model=64, d_expert=32, n_routed=8, n_shared=2, top_k=1, n_moe_layers=1)]
    for _ in range(5):
        n_routed = _randint(g, 2, 65)
        cases.append(case(d_model=2 * _randint(g, 4, 513), d_expert=_randint(g, 8, 1025), n_routed=n_routed,
                          n_shared=_randint(g, 0, 3), top_k=_randint(g, 1, n_routed + 1),
                          n_moe_layers=_randint(g, 1, 61)))
    hints = [(_shared_not_active, "every token also runs the shared experts, so they are active."),
             (_two_matrix_experts, "a SwiGLU expert has three matrices (gate, up, down): 3 · d_model · d_expert."),
             (_no_routers, "count the routers: n_routed vectors of d_model per layer, all active (a token is "
                           "scored against every expert).")]
    return run_check("check_moe_params", fn, _moe_params, cases, against="moelab.presets.analytic_counts",
                     hints=hints)


def _devices(config: ModelConfig, dtype: str, device_gb: float) -> int:
    """Devices of ``device_gb`` GB that the weights alone fill: moelab's weight bytes, rounded up."""
    weights = sizing.memory_per_device(config, sizing.Layout(), weights=dtype, grads="none")["weights"]
    return math.ceil(weights / (device_gb * 1e9))


def _devices_floor(config: ModelConfig, dtype: str, device_gb: float) -> int:
    return presets.analytic_counts(config)["total"] * wire.VALUE_BYTES[dtype] // int(device_gb * 1e9)


def _devices_gib(config: ModelConfig, dtype: str, device_gb: float) -> int:
    return math.ceil(presets.analytic_counts(config)["total"] * wire.VALUE_BYTES[dtype] / (device_gb * 2**30))


def _preset_case(model: str, dtype: str, device_gb: float) -> Case:
    """A case with a preset's config, labelled by the preset's name rather than the config's long repr."""
    return Case(dict(config=presets.PRESETS[model](), dtype=dtype, device_gb=device_gb),
                f"config={model}, dtype={dtype!r}, device_gb={describe(device_gb)}")


def check_devices_for_weights(fn) -> Verdict:
    """Exercise 00.2: ``fn(config, dtype, device_gb) -> int``, how many devices of ``device_gb`` GB (10⁹ bytes)
    the weights of ``config`` (a :class:`~moelab.config.ModelConfig`) fill in ``dtype`` — ``"fp32"``, ``"bf16"``
    or ``"fp8"`` (4, 2, 1 bytes a parameter). Against :func:`moelab.sizing.memory_per_device` without gradients
    on one device (``Layout()``, ``grads="none"``); 80 GB is an H100 SXM, 141 GB an H200 (NVIDIA datasheets)."""
    cases = [_preset_case("Kimi K2", "bf16", 24.0), _preset_case("Kimi K2", "fp8", 80.0),
             _preset_case("DeepSeek-V3", "fp8", 80.0), _preset_case("DeepSeek-V3", "fp32", 141.0),
             _preset_case("Qwen3-235B-A22B", "bf16", 80.0), _preset_case("Mixtral-8x7B", "bf16", 24.0),
             _preset_case("Mixtral-8x7B", "fp8", 192.0), _preset_case("DeepSeek-V2-Lite", "fp32", 16.0)]
    hints = [(_devices_floor, "round up: the last device holds the remainder (math.ceil)."),
             (_devices_gib, "a GB here is 10⁹ bytes, not 2³⁰ (a GiB).")]
    return run_check("check_devices_for_weights", fn, _devices, cases,
                     against="moelab.sizing.memory_per_device", hints=hints)


def _inter_node_bytes(d_model: int, top_k: int, node_limit: int, dispatch: str, combine: str) -> int:
    config = ModelConfig(vocab_size=2, n_head=1, d_model=d_model, top_k=top_k)
    return sizing.moe_traffic(config, dispatch, combine, node_limit)["inter_node_max"]


def _fp8_without_scales(d_model: int, top_k: int, node_limit: int, dispatch: str, combine: str) -> int:
    width = {"fp32": 4, "bf16": 2, "fp8": 1}
    return min(top_k, node_limit) * d_model * (width[dispatch] + width[combine])


def _no_node_limit(d_model: int, top_k: int, node_limit: int, dispatch: str, combine: str) -> int:
    return _inter_node_bytes(d_model, top_k, top_k, dispatch, combine)


def _dispatch_only(d_model: int, top_k: int, node_limit: int, dispatch: str, combine: str) -> int:
    return min(top_k, node_limit) * wire.row_bytes(d_model, dispatch)


def check_inter_node_bytes(fn) -> Verdict:
    """Exercise 00.3: ``fn(d_model, top_k, node_limit, dispatch, combine) -> int``, the most bytes one token can
    send between nodes in one MoE layer: one copy of its hidden state per node it reaches (at most
    ``min(top_k, node_limit)``), out in the ``dispatch`` format and back in the ``combine`` format (``"fp32"``,
    ``"bf16"``, or ``"fp8"``: one byte a value plus one fp32 scale per 128 values). Against
    :func:`moelab.sizing.moe_traffic` (node-limited routing, DeepSeek-V3 report §3.2.2)."""
    g = seeded(1002)
    cases = [case(d_model=7168, top_k=8, node_limit=4, dispatch="fp8", combine="bf16"),
             case(d_model=7168, top_k=8, node_limit=8, dispatch="bf16", combine="bf16"),
             case(d_model=4096, top_k=2, node_limit=4, dispatch="fp32", combine="fp32"),
             case(d_model=200, top_k=1, node_limit=1, dispatch="fp8", combine="fp8")]
    wires = wire.FORMATS
    for _ in range(6):
        cases.append(case(d_model=2 * _randint(g, 32, 4097), top_k=_randint(g, 1, 17), node_limit=_randint(g, 1, 9),
                          dispatch=wires[_randint(g, 0, 3)], combine=wires[_randint(g, 0, 3)]))
    hints = [(_fp8_without_scales, "an fp8 row also carries its scales: 4 bytes (fp32) per 128 values."),
             (_no_node_limit, "a token reaches at most node_limit nodes, and one copy per node crosses."),
             (_dispatch_only, "the results come back too: add the combine bytes.")]
    return run_check("check_inter_node_bytes", fn, _inter_node_bytes, cases, against="moelab.sizing.moe_traffic",
                     hints=hints)
