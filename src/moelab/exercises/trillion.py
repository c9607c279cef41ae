"""Checks for notebook 13 (trillion scale): MLA's KV cache and parameters, and memory per device.

Four checks: MLA's KV cache and parameters per layer, and the bytes per device of a parallel layout for training
and for serving. Each compares the learner's function with :mod:`moelab.config`, :mod:`moelab.presets` and
:mod:`moelab.sizing` on real models and variants of them.
"""
from __future__ import annotations

import dataclasses

from .. import presets, sizing
from ..config import ModelConfig
from ..sizing import Layout
from .core import Case, Verdict, run_check

__all__ = ["check_kv_cache_elements", "check_mla_parameters", "check_training_memory", "check_serving_memory"]


def _model(name: str, **changes) -> tuple[str, ModelConfig]:
    """A preset by name, with fields changed (MLA's ``head_dim`` follows its parts), and its label for a verdict."""
    config = presets.PRESETS[name]()
    derived = {"head_dim": None} if config.attention == "mla" and changes else {}
    config = dataclasses.replace(config, **derived, **changes)
    return name + "".join(f" with {k}={v}" for k, v in changes.items()), config


def _cases(models: list[tuple[str, ModelConfig]], **more) -> list[Case]:
    """One case per model (labelled by name, not by the config's long repr), with the same further arguments."""
    extra = "".join(f", {k}={v!r}" for k, v in more.items())
    return [Case({"config": config, **more}, f"config={label}{extra}") for label, config in models]


def _kv_cache_full_heads(config: ModelConfig) -> int:
    if config.attention == "mla":
        return config.n_head * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    return config.kv_cache_elements()


def _kv_cache_latent_only(config: ModelConfig) -> int:
    return config.kv_lora_rank if config.attention == "mla" else config.kv_cache_elements()


def _kv_cache_all_heads(config: ModelConfig) -> int:
    return config.kv_cache_elements() if config.attention == "mla" else 2 * config.n_head * config.head_dim


def check_kv_cache_elements(fn) -> Verdict:
    """Notebook 13, exercise 1: ``fn(config) -> int``, the values a decoder caches per token and layer:
    ``kv_lora_rank + qk_rope_head_dim`` for MLA (the latent ``c_kv`` and the shared RoPE key: DeepSeek-V2,
    arXiv:2405.04434, §2.1.2–2.1.3), ``2 · n_kv_head · head_dim`` for grouped-query attention (Ainslie et al.
    2023). As :meth:`moelab.config.ModelConfig.kv_cache_elements`."""
    models = [_model("DeepSeek-V3"), _model("DeepSeek-V3", kv_lora_rank=256), _model("Kimi K2"),
              _model("DeepSeek-V2-Lite", qk_rope_head_dim=32), _model("Qwen3-235B-A22B"), _model("Mixtral-8x7B"),
              _model("course LM")]
    return run_check("check_kv_cache_elements", fn, lambda config: config.kv_cache_elements(), _cases(models),
                     against="moelab.config.ModelConfig.kv_cache_elements",
                     hints=[(_kv_cache_full_heads, "MLA caches the latent and the RoPE key, not every head's keys "
                                                   "and values (those are rebuilt from the latent)."),
                            (_kv_cache_latent_only, "the decoupled RoPE key (qk_rope_head_dim values, shared by "
                                                    "the heads) is cached next to the latent."),
                            (_kv_cache_all_heads, "grouped-query attention caches n_kv_head heads, not n_head.")])


def _mla_reference(config: ModelConfig) -> int:
    return presets.analytic_counts(config)["attention"] // config.n_layer


def _mla_without_norms(config: ModelConfig) -> int:
    return _mla_reference(config) - config.kv_lora_rank - config.q_lora_rank


def _mla_without_rope_key(config: ModelConfig) -> int:
    return _mla_reference(config) - config.d_model * config.qk_rope_head_dim


def check_mla_parameters(fn) -> Verdict:
    """Notebook 13, exercise 2: ``fn(config) -> int``, the parameters of one MLA layer: the query path
    (``W_DQ``, its norm, ``W_UQ`` with the RoPE queries, or one ``d × H·(nope + rope)`` matrix when
    ``q_lora_rank`` is 0), the joint ``W_DKV`` with the RoPE key, the latent's norm, ``W_UK`` and ``W_UV``, and
    the output projection (DeepSeek-V2, arXiv:2405.04434, §2.1; the fact sheet §1.4). As
    :func:`moelab.presets.analytic_counts` ``["attention"] / n_layer``."""
    models = [_model("DeepSeek-V3"), _model("DeepSeek-V3", kv_lora_rank=256), _model("Kimi K2"),
              _model("DeepSeek-V2-Lite"), _model("DeepSeek-V3", q_lora_rank=768, qk_rope_head_dim=32),
              _model("DeepSeek-V2-Lite", n_head=1, n_kv_head=1, v_head_dim=64)]
    return run_check("check_mla_parameters", fn, _mla_reference, _cases(models),
                     against="moelab.presets.analytic_counts",
                     hints=[(_mla_without_norms, "count the RMSNorm weights of the latents: q_lora_rank + "
                                                 "kv_lora_rank values (none for the query without a bottleneck)."),
                            (_mla_without_rope_key, "W_DKV also produces the shared RoPE key: d_model × "
                                                    "(kv_lora_rank + qk_rope_head_dim).")])


TRAINING_PARTS = ("weights", "gradients", "optimizer")


def _training_reference(config: ModelConfig, layout: Layout) -> dict[str, float]:
    m = sizing.memory_per_device(config, layout)
    return {k: m[k] for k in TRAINING_PARTS}


def _training_zero1_over_dp(config: ModelConfig, layout: Layout) -> dict[str, float]:
    m = _training_reference(config, dataclasses.replace(layout, zero1=False))
    return {**m, "optimizer": m["optimizer"] / layout.dp if layout.zero1 else m["optimizer"]}


def _training_no_master(config: ModelConfig, layout: Layout) -> dict[str, float]:
    m = _training_reference(config, layout)
    return {**m, "optimizer": m["optimizer"] * 8 / 12}


def _training_tp_splits_experts(config: ModelConfig, layout: Layout) -> dict[str, float]:
    counts = presets.analytic_counts(config)
    experts = counts["routed_experts"] / (layout.ep * layout.tp * layout.pp)
    rest = (counts["total"] - counts["routed_experts"]) / (layout.tp * layout.pp)
    optimizer = 12 * (experts / (layout.dp // layout.ep) + rest / layout.dp if layout.zero1 else experts + rest)
    return {"weights": 2 * (experts + rest), "gradients": 2 * (experts + rest), "optimizer": optimizer}


def check_training_memory(fn) -> Verdict:
    """Notebook 13, exercise 3: ``fn(config, layout) -> {"weights", "gradients", "optimizer"}``, bytes on one device
    for BF16 mixed-precision training with AdamW (Micikevicius et al. 2018: BF16 weights and gradients, fp32
    master copy and two fp32 moments). Routed experts are split ``ep · pp`` ways, the rest ``tp · pp`` ways;
    ZeRO-1 (Rajbhandari et al. 2020) shards the optimizer states over the replicas holding the same parameters:
    ``dp / ep`` for an expert, ``dp`` for the rest. As :func:`moelab.sizing.memory_per_device`."""
    v3, k2 = _model("DeepSeek-V3"), _model("Kimi K2")
    cases = [Case({"config": c, "layout": layout}, f"config={label}, layout={layout}") for (label, c), layout in [
        (v3, Layout(dp=128, pp=16, ep=64, zero1=True)), (v3, Layout(dp=128, pp=16, ep=64, zero1=False)),
        (k2, Layout(dp=256, pp=8, ep=128, zero1=True)), (v3, Layout(dp=64, tp=8, pp=4, ep=64, zero1=True)),
        (_model("Mixtral-8x7B"), Layout(dp=8, tp=2, ep=8, zero1=True)), (_model("course LM"), Layout()),
        (v3, Layout(dp=2048, ep=256, zero1=True))]]
    return run_check("check_training_memory", fn, _training_reference, cases,
                     against="moelab.sizing.memory_per_device",
                     hints=[(_training_zero1_over_dp, "an expert's optimizer states are sharded only over the "
                                                      "dp / ep replicas that hold that expert, not over all dp."),
                            (_training_no_master, "with BF16 weights AdamW also keeps an fp32 master copy: "
                                                  "4 + 4 + 4 bytes per parameter."),
                            (_training_tp_splits_experts, "tensor parallelism does not split the routed experts: "
                                                          "each tp rank holds its experts whole.")])


SERVING_PARTS = ("weights", "kv_cache")


def _serving_reference(config: ModelConfig, layout: Layout, kv_tokens: int) -> dict[str, float]:
    m = sizing.memory_per_device(config, layout, weights="fp8", grads="none", kv_tokens=kv_tokens)
    return {k: m[k] for k in SERVING_PARTS}


def _serving_cache_split_by_tp(config: ModelConfig, layout: Layout, kv_tokens: int) -> dict[str, float]:
    m = _serving_reference(config, layout, kv_tokens)
    return {**m, "kv_cache": m["kv_cache"] / layout.tp}


def _serving_cache_all_layers(config: ModelConfig, layout: Layout, kv_tokens: int) -> dict[str, float]:
    m = _serving_reference(config, layout, kv_tokens)
    return {**m, "kv_cache": m["kv_cache"] * layout.pp}


def _serving_all_experts(config: ModelConfig, layout: Layout, kv_tokens: int) -> dict[str, float]:
    return _serving_reference(config, dataclasses.replace(layout, dp=layout.dp // layout.ep, ep=1), kv_tokens)


def check_serving_memory(fn) -> Verdict:
    """Notebook 13, exercise 4: ``fn(config, layout, kv_tokens) -> {"weights", "kv_cache"}``, bytes on one device
    serving with FP8 weights (1 byte a parameter, split as in training) and a BF16 KV cache of ``kv_tokens``
    tokens for the device's ``n_layer / pp`` layers: ``kv_cache_elements()`` values per token and layer, split by
    ``tp`` for grouped-query heads but not for MLA's one latent per token (DeepSeek-V3, arXiv:2412.19437, §3.4).
    As :func:`moelab.sizing.memory_per_device` with ``weights="fp8", grads="none"``."""
    k2, v3 = _model("Kimi K2"), _model("DeepSeek-V3")
    cases = [Case({"config": c, "layout": layout, "kv_tokens": tokens}, f"config={label}, layout={layout}, "
                  f"kv_tokens={tokens}") for (label, c), layout, tokens in [
        (k2, Layout(dp=8, ep=8), 131072), (k2, Layout(dp=16, ep=16), 131072), (k2, Layout(dp=8, ep=8, pp=2), 131072),
        (v3, Layout(dp=4, tp=2, ep=4), 32768), (_model("Qwen3-235B-A22B"), Layout(dp=2, tp=4, ep=2), 65536),
        (_model("Mixtral-8x7B"), Layout(), 1)]]
    return run_check("check_serving_memory", fn, _serving_reference, cases,
                     against="moelab.sizing.memory_per_device(..., weights='fp8', grads='none')",
                     hints=[(_serving_all_experts, "expert parallelism shards the routed experts: each device "
                                                   "holds n_routed_experts / ep of them."),
                            (_serving_cache_all_layers, "a pipeline stage caches only its own n_layer / pp layers."),
                            (_serving_cache_split_by_tp, "MLA's latent is one per token, shared by the heads: "
                                                         "tensor parallelism does not split it.")])
