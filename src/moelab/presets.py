"""Real MoE models as moelab configs, with their parameters counted exactly.

The counts come two ways: analytically from the config, and by building moelab's own model at full size on
PyTorch's meta device (shapes without memory).

Field values are the Hugging Face ``config.json`` ones (sources in each preset's docstring; the course's fact
sheet ``../shared/reference/moe-architectures.md`` §1 lists them side by side). What the course's model leaves
out does not change the counts: YaRN's long-context factors, DeepSeek's multi-token-prediction (MTP) module
(outside the 671 B, as DeepSeek counts it), and the routers' selection bias, a buffer of ``n_routed_experts``
values per layer here (a parameter in Hugging Face's code: 14,848 values in all of DeepSeek-V3).

**Conventions.** ``total`` counts every parameter once. ``active`` counts what one token uses: everything except
the routed experts it does not pick — the input embedding and the output head included. Publishers differ:
DeepSeek's "36.7 B activated" (README_WEIGHTS; "37 B" in the report) matches ``active`` *without* the input
embedding (a table lookup, no arithmetic: 36.63 B; with it, 37.55 B) — though README_WEIGHTS says it includes
0.9 B of embedding and 0.9 B of head; Qwen's and Mistral's figures match ``active`` *with* both
(:data:`PUBLISHED`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from .config import ModelConfig
from .model import Transformer, parameter_counts

MLA_V3 = dict(attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
              v_head_dim=128)


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (arXiv:2412.19437; ``deepseek-ai/DeepSeek-V3`` config.json and ``inference/configs/
    config_671B.json``): hidden 7168, 61 layers of which the first 3 dense (FFN 18432), MLA with 128 heads,
    256 routed experts of width 2048 and 1 shared, top-8 within 4 of 8 groups, sigmoid scores, scale 2.5."""
    return ModelConfig(vocab_size=129280, block_size=4096, n_layer=61, n_head=128, d_model=7168, d_ff=18432,
                       norm_eps=1e-6, **MLA_V3, n_routed_experts=256, n_shared_experts=1, top_k=8, d_expert=2048,
                       first_k_dense=3, router="sigmoid", routed_scaling_factor=2.5, n_group=8, topk_group=4,
                       bias_update_speed=0.001)


def kimi_k2() -> ModelConfig:
    """Kimi K2 (``moonshotai/Kimi-K2-Instruct`` config.json, architecture DeepseekV3ForCausalLM; README: "1T total,
    32B activated"): DeepSeek-V3's shape with 384 routed experts, 64 heads, one dense layer, no expert groups,
    scale 2.827, vocabulary 163840, RoPE θ 50000."""
    return ModelConfig(vocab_size=163840, block_size=4096, n_layer=61, n_head=64, d_model=7168, d_ff=18432,
                       norm_eps=1e-6, rope_theta=50_000.0, **MLA_V3, n_routed_experts=384, n_shared_experts=1,
                       top_k=8, d_expert=2048, first_k_dense=1, router="sigmoid", routed_scaling_factor=2.827,
                       bias_update_speed=0.001)


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite (``deepseek-ai/DeepSeek-V2-Lite`` config.json; ``config_16B.json``): hidden 2048, 27 layers
    (first dense, FFN 10944), MLA without a query bottleneck, 16 heads, 64 routed experts of 1408 and 2 shared,
    top-6, softmax scores not renormalised."""
    return ModelConfig(vocab_size=102400, block_size=4096, n_layer=27, n_head=16, d_model=2048, d_ff=10944,
                       norm_eps=1e-6, **{**MLA_V3, "q_lora_rank": 0}, n_routed_experts=64, n_shared_experts=2,
                       top_k=6, d_expert=1408, first_k_dense=1, norm_topk_prob=False)


def qwen3_235b_a22b() -> ModelConfig:
    """Qwen3-235B-A22B (Qwen3 technical report Table 2; ``Qwen/Qwen3-235B-A22B`` config.json): hidden 4096, 94
    layers, all MoE, 128 experts of width 1536, top-8, no shared expert; 64 query and 4 KV heads of 128 (so
    ``n_head · head_dim = 8192 ≠ hidden``), QK-norm, RoPE θ 10⁶."""
    return ModelConfig(vocab_size=151936, block_size=4096, n_layer=94, n_head=64, n_kv_head=4, head_dim=128,
                       d_model=4096, d_ff=12288, norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
                       n_routed_experts=128, top_k=8, d_expert=1536)


def qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B (``Qwen/Qwen3-30B-A3B`` config.json): hidden 2048, 48 layers, 128 experts of 768, top-8;
    32 query and 4 KV heads of 128, QK-norm."""
    return ModelConfig(vocab_size=151936, block_size=4096, n_layer=48, n_head=32, n_kv_head=4, head_dim=128,
                       d_model=2048, d_ff=6144, norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
                       n_routed_experts=128, top_k=8, d_expert=768)


def mixtral_8x7b() -> ModelConfig:
    """Mixtral-8x7B (arXiv:2401.04088; ``mistralai/Mixtral-8x7B-v0.1`` config.json): hidden 4096, 32 layers, 8
    experts of width 14336, top-2 (softmax over the two chosen), 32 query and 8 KV heads, RoPE θ 10⁶."""
    return ModelConfig(vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
                       d_ff=14336, rope_theta=1e6, n_routed_experts=8, top_k=2, d_expert=14336)


COURSE_VOCAB = 120                   # characters in the course corpus (moelab.data.load_corpus)
COURSE_BASE = dict(block_size=128, n_layer=4, n_head=4, n_kv_head=2, d_model=64)   # notebook 04's models
DENSE_WIDTH = 256                    # the active FFN width notebook 04's three matched models share
BALANCE = dict(router="sigmoid", bias_update_speed=0.001, seq_aux_coef=1e-4)


def matched_configs(vocab_size: int = COURSE_VOCAB) -> dict[str, ModelConfig]:
    """Notebook 04's dense, coarse and fine-grained models, with equal active parameters (within 0.2%).

    The fine-grained MoE is fixed first; its active FFN parameters per layer (8 experts of width ``F/8`` and a
    router of 31 ``d_model``-vectors) set the target that the coarse experts' width and the dense width meet.
    Both MoEs balance their load DeepSeek-V3's way (a sigmoid router with the aux-loss-free bias and a small
    sequence-wise loss).
    """
    F, d = DENSE_WIDTH, COURSE_BASE["d_model"]
    fine = ModelConfig(vocab_size=vocab_size, **COURSE_BASE, d_ff=F, n_routed_experts=31, n_shared_experts=1,
                       top_k=7, d_expert=F // 8, **BALANCE)
    active_ffn = (fine.top_k + fine.n_shared_experts) * 3 * d * fine.d_expert + fine.n_routed_experts * d
    coarse = ModelConfig(vocab_size=vocab_size, **COURSE_BASE, d_ff=F, n_routed_experts=8, top_k=2,
                         d_expert=round((active_ffn - 8 * d) / (2 * 3 * d)), **BALANCE)
    dense = ModelConfig(vocab_size=vocab_size, **COURSE_BASE, d_ff=round(active_ffn / (3 * d)))
    return {"dense": dense, "coarse": coarse, "fine": fine}


def course_fine_moe() -> ModelConfig:
    """The course's fine-grained MoE of notebook 04 (31 routed experts of width 32 + 1 shared, top-7)."""
    return matched_configs(COURSE_VOCAB)["fine"]


def lm_config(vocab_size: int = COURSE_VOCAB, n_experts: int = 8) -> ModelConfig:
    """The course's expert-parallel language model of notebooks 05, 10 and 14: 2 layers, ``n_experts`` experts of
    width 64, top-2, one shared expert, DeepSeek-V3's sigmoid router balanced by the sequence-wise loss alone.

    No aux-loss-free bias here: its update is ``γ · sign(mean load − load)``, a discrete function of the counts,
    so a last-bit rounding difference between two parallel layouts that flips one token's choice can flip an
    update and send the two runs apart; the comparison with one process is then no longer exact."""
    return ModelConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       n_routed_experts=n_experts, n_shared_experts=1, top_k=2, d_expert=64, router="sigmoid",
                       seq_aux_coef=1e-3)


def course_lm() -> ModelConfig:
    """The course's expert-parallel language model (:func:`lm_config` on the course corpus)."""
    return lm_config(COURSE_VOCAB)


PRESETS = {"DeepSeek-V3": deepseek_v3, "Kimi K2": kimi_k2, "DeepSeek-V2-Lite": deepseek_v2_lite,
           "Qwen3-235B-A22B": qwen3_235b_a22b, "Qwen3-30B-A3B": qwen3_30b_a3b, "Mixtral-8x7B": mixtral_8x7b,
           "course fine MoE": course_fine_moe, "course LM": course_lm}

# What each publisher states (total, active), and whether its "active" includes the input embedding.
PUBLISHED = {"DeepSeek-V3": (671e9, 36.7e9, False),        # README_WEIGHTS (MTP excluded); "37B" rounds it
             "DeepSeek-V2-Lite": (15.7e9, None, True),     # 16 B in the README; 15.7 B on the model card
             "Qwen3-235B-A22B": (235e9, 22e9, True),       # Qwen3 technical report
             "Mixtral-8x7B": (46.7e9, 12.9e9, True)}       # Mistral's announcement: 46.7 B total, 12.9 B per token


def analytic_counts(c: ModelConfig) -> dict[str, int]:
    """Parameters by part, from the config alone (the formulas of the fact sheet §1.4), with ``total`` and
    ``active`` (see the module docstring)."""
    d, H = c.d_model, c.n_head
    if c.attention == "mla":
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * qk if c.q_lora_rank else d * H * qk
        attention = (q + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
                     + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * d)
    else:
        attention = 2 * d * H * c.head_dim + 2 * d * c.n_kv_head * c.head_dim + (2 * c.head_dim if c.qk_norm else 0)
    moe_layers = c.n_layer - c.first_k_dense if c.n_routed_experts else 0
    expert = 3 * d * c.d_expert
    parts = {"embedding": c.vocab_size * d, "attention": c.n_layer * attention, "norms": 2 * c.n_layer * d + d,
             "dense_ffn": (c.n_layer - moe_layers) * 3 * d * c.d_ff,
             "routed_experts": moe_layers * c.n_routed_experts * expert,
             "shared_experts": moe_layers * c.n_shared_experts * expert,
             "routers": moe_layers * c.n_routed_experts * d,
             "head": 0 if c.tie_embeddings else c.vocab_size * d}
    total = sum(parts.values())
    return {**parts, "total": total, "active": total - moe_layers * (c.n_routed_experts - c.top_k) * expert}


INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_")       # what moelab's modules initialise with


@contextlib.contextmanager
def _skipping_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s functions return their tensor untouched (as transformers' ``no_init_weights``):
    a meta tensor has no values to draw, and torch's meta kernels for random numbers would import its compiler
    stack (about 80 MB, sympy included) just to skip the work."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    for name in INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def meta_model(config: ModelConfig) -> Transformer:
    """``config`` built by moelab's own :class:`~moelab.model.Transformer` on the meta device: every parameter
    with its full shape and no storage (and no initialisation)."""
    with torch.device("meta"), _skipping_init():
        return Transformer(config)


def meta_counts(config: ModelConfig) -> dict[str, int]:
    """``total`` and ``active`` parameters of the model built on the meta device (:func:`moelab.model.
    parameter_counts`), and ``embedding``, so that both conventions of "active" can be read off."""
    model = meta_model(config)
    return {**parameter_counts(model), "embedding": model.tok_embeddings.weight.numel()}
