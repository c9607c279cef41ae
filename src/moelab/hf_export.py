"""Export a moelab model as a Hugging Face ``transformers`` checkpoint: ``config.json`` and ``model.safetensors``.

Serving stacks (vLLM, SGLang, llama.cpp's ``convert_hf_to_gguf.py``) and ``transformers`` itself load a checkpoint
of an architecture they know, so :func:`export` writes the course's model as the released model it computes the
same function as (:func:`architecture_for`):

- grouped-query attention, sigmoid router, shared experts → ``Glm4MoeForCausalLM`` (GLM-4.5), full rotary dims;
- multi-head latent attention (sigmoid router, shared experts) → ``DeepseekV3ForCausalLM``;
- softmax router, no shared experts → ``Qwen3MoeForCausalLM`` with ``qk_norm`` (Qwen3 always has it), else
  ``MixtralForCausalLM``.

Whatever a target cannot express raises :class:`~moelab.config.ConfigError` (a ``ValueError``) naming the field,
before anything is written. Training-only fields do not matter: dropout, the balancing losses, and ``dispatch``
(``"capacity"`` drops tokens in training only; in eval every dispatch is dropless, as Hugging Face's is).

Weights use the layout of the released checkpoints, one tensor per expert (``experts.{e}.gate_proj``, Mixtral's
``w1``/``w3``/``w2``), which the serving stacks read and ``transformers`` >= 5 fuses on load (its
``conversion_mapping.py``). moelab's RoPE rotates interleaved pairs ``(x[2i], x[2i+1])``; GLM, Qwen3 and Mixtral
rotate halves ``(x[i], x[i+hd/2])``, so each head's query and key rows (and QK-norm weights) are reordered evens
first, then odds: the same scores, by the permutation of Llama's ``convert_llama_weights_to_hf.py``.
DeepSeek-V3 rotates interleaved pairs itself (``rope_interleave = True``), so MLA weights keep their order.

The routing was checked against ``transformers`` 5.25's ``Glm4MoeTopkRouter`` / ``DeepseekV3TopkRouter`` (sigmoid,
``e_score_correction_bias`` for selection only, groups ranked by their top-2 sum, renormalise + 1e-20, scale) and
``Qwen3MoeTopKRouter`` / ``MixtralTopKRouter`` (softmax, top-k, renormalise — Mixtral always — and no bias, groups
or scaling factor); :mod:`moelab.router` computes the same.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, check
from .ffn import SwiGLU
from .mla import MultiHeadLatentAttention
from .model import CausalSelfAttention, Transformer
from .moe import MoE

MODEL_TYPES = {"Glm4MoeForCausalLM": "glm4_moe", "DeepseekV3ForCausalLM": "deepseek_v3",
               "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}
SIGMOID_TARGETS = ("Glm4MoeForCausalLM", "DeepseekV3ForCausalLM")
MLA_NAMES = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
             "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
DEEPSEEK_LATENT_EPS = 1e-6      # DeepseekV3Attention builds q_a_layernorm and kv_a_layernorm with RMSNorm's default


def architecture_for(config: ModelConfig) -> str:
    """The Hugging Face architecture that ``config`` maps to (the list in the module docstring)."""
    if config.attention == "mla":
        return "DeepseekV3ForCausalLM"
    if config.router == "sigmoid":
        return "Glm4MoeForCausalLM"
    return "Qwen3MoeForCausalLM" if config.qk_norm else "MixtralForCausalLM"


def check_exportable(config: ModelConfig, architecture: str) -> None:
    """Raise :class:`~moelab.config.ConfigError` naming the first field of ``config`` that ``architecture``
    cannot express; a ``ValueError`` for an architecture this module does not write."""
    if architecture not in MODEL_TYPES:
        raise ValueError(f"architecture = {architecture!r} is not allowed; allowed: None, {', '.join(MODEL_TYPES)}")
    c, sigmoid, a = config, architecture in SIGMOID_TARGETS, architecture

    def need(ok: bool, field: str, allowed: str) -> None:
        check(ok, "ModelConfig", field, getattr(c, field), f"{a} needs {allowed}")

    need(c.n_routed_experts > 0, "n_routed_experts", ">= 1 (the targets are mixtures of experts)")
    need((c.attention == "mla") == (a == "DeepseekV3ForCausalLM"), "attention",
         "'mla'" if a == "DeepseekV3ForCausalLM" else "'gqa'")
    need((c.router == "sigmoid") == sigmoid, "router", "'sigmoid'" if sigmoid else "'softmax'")
    if sigmoid:
        need(c.n_shared_experts >= 1, "n_shared_experts", ">= 1 (its MoE layer always adds shared experts)")
        need(c.n_routed_experts // c.n_group >= 2, "n_group",
             "at least 2 experts per group (it ranks groups by their 2 best experts)")
    else:
        need(c.n_shared_experts == 0, "n_shared_experts", "0 (it has no shared experts)")
        need(c.routed_scaling_factor == 1.0, "routed_scaling_factor", "1.0 (it does not scale the gates)")
        need(c.n_group == 1, "n_group", "1 (it has no group-limited routing)")
        need(c.qk_norm == (a == "Qwen3MoeForCausalLM"), "qk_norm", str(a == "Qwen3MoeForCausalLM"))
    if a == "MixtralForCausalLM":
        need(c.norm_topk_prob, "norm_topk_prob", "True (it always renormalises the top-k gates)")
        need(c.first_k_dense == 0, "first_k_dense", "0 (every layer is a mixture of experts)")
    if a == "DeepseekV3ForCausalLM":
        need(c.norm_eps == DEEPSEEK_LATENT_EPS, "norm_eps",
             f"{DEEPSEEK_LATENT_EPS:g} (its q_a_layernorm and kv_a_layernorm use it whatever rms_norm_eps is)")


def check_model(model: Transformer) -> None:
    """The layers must be the ones the config builds: MoE layers with all their experts (no expert-parallel shard,
    no custom ``make_ffn``) and a softmax router's selection bias still zero (Qwen3 and Mixtral have none)."""
    c = model.config
    for i, layer in enumerate(model.layers):
        moe = bool(c.n_routed_experts) and i >= c.first_k_dense
        if not isinstance(layer.ffn, MoE if moe else SwiGLU) or (moe and layer.ffn.experts.n_experts
                                                                != c.n_routed_experts):
            raise ValueError(f"layer {i}'s FFN is a {type(layer.ffn).__name__} that ModelConfig does not build "
                             f"(an expert-parallel shard or a custom make_ffn); export the whole default model")
        if moe and c.router == "softmax":
            check(not layer.ffn.router.bias.any(), "ModelConfig", "bias_update_speed", c.bias_update_speed,
                  "a softmax router exports only with its selection bias at zero (Qwen3 and Mixtral have none)")


def rope_halves_order(head_dim: int) -> torch.Tensor:
    """Indices that take a head's interleaved-pair layout to the rotate-half one: evens, then odds."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_heads(weight: torch.Tensor, n_heads: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the output rows of each head of a projection ``(n_heads · head_dim, d_in)`` by ``order``."""
    return weight.view(n_heads, -1, weight.shape[-1])[:, order].reshape(weight.shape)


def gqa_weights(attn: CausalSelfAttention) -> dict[str, torch.Tensor]:
    """Llama-family attention weights, queries and keys reordered for rotate-half RoPE."""
    order = rope_halves_order(attn.head_dim)
    weights = {"q_proj.weight": permute_heads(attn.wq.weight, attn.n_head, order),
               "k_proj.weight": permute_heads(attn.wk.weight, attn.n_kv_head, order),
               "v_proj.weight": attn.wv.weight, "o_proj.weight": attn.wo.weight}
    if hasattr(attn, "q_norm"):
        weights |= {"q_norm.weight": attn.q_norm.weight[order], "k_norm.weight": attn.k_norm.weight[order]}
    return weights


def mla_weights(attn: MultiHeadLatentAttention) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 attention weights under Hugging Face's names, in their interleaved-RoPE order."""
    return {f"{MLA_NAMES[name.split('.')[0]]}.weight": p for name, p in attn.named_parameters()}


def swiglu_weights(ffn: SwiGLU) -> dict[str, torch.Tensor]:
    """A dense SwiGLU (a dense layer's FFN, or the shared experts) under Hugging Face's MLP names."""
    return {"gate_proj.weight": ffn.w_gate.weight, "up_proj.weight": ffn.w_up.weight,
            "down_proj.weight": ffn.w_down.weight}


def moe_weights(moe: MoE, mixtral: bool) -> dict[str, torch.Tensor]:
    """Router, one ``(out, in)`` matrix per expert and matrix (``x @ W`` stacks transposed), shared experts."""
    weights = {"gate.weight": moe.router.weight}
    if moe.config.router == "sigmoid":
        weights["gate.e_score_correction_bias"] = moe.router.bias
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    ex = moe.experts
    for e in range(ex.n_experts):
        for name, stacked in zip(names, (ex.w_gate, ex.w_up, ex.w_down)):
            weights[f"experts.{e}.{name}.weight"] = stacked[e].t()
    if moe.shared is not None:
        weights |= {f"shared_experts.{k}": v for k, v in swiglu_weights(moe.shared).items()}
    return weights


def hf_state_dict(model: Transformer, architecture: str) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``architecture``'s checkpoint names, contiguous on the CPU."""
    c, mixtral = model.config, architecture == "MixtralForCausalLM"
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        out["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        out[prefix + "input_layernorm.weight"] = layer.attn_norm.weight
        out[prefix + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
        attn = mla_weights(layer.attn) if c.attention == "mla" else gqa_weights(layer.attn)
        ffn = moe_weights(layer.ffn, mixtral) if isinstance(layer.ffn, MoE) else swiglu_weights(layer.ffn)
        out |= {f"{prefix}self_attn.{k}": v for k, v in attn.items()}
        out |= {f"{prefix}{'block_sparse_moe' if mixtral else 'mlp'}.{k}": v for k, v in ffn.items()}
    return {name: t.detach().cpu().contiguous() for name, t in out.items()}


def hf_config(config: ModelConfig, architecture: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` for ``architecture``: its field names, RoPE both as ``transformers`` 5 writes it
    (``rope_parameters``) and as the released checkpoints and older readers do (top-level ``rope_theta``)."""
    c, a = config, architecture
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    out = {"architectures": [a], "model_type": MODEL_TYPES[a], "torch_dtype": str(dtype).removeprefix("torch."),
           "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "hidden_act": "silu", "max_position_embeddings": c.block_size,
           "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings, "rope_theta": c.rope_theta,
           "rope_parameters": rope, "attention_bias": False, "attention_dropout": 0.0,
           "num_experts_per_tok": c.top_k, "norm_topk_prob": c.norm_topk_prob}
    if a == "DeepseekV3ForCausalLM":
        out |= {"num_key_value_heads": c.n_head, "q_lora_rank": c.q_lora_rank or None, "rope_interleave": True}
        out |= {name: getattr(c, name) for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                    "v_head_dim")}
    else:
        out |= {"num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim}
    if a in SIGMOID_TARGETS:
        out |= {"intermediate_size": c.d_ff, "moe_intermediate_size": c.d_expert,
                "n_routed_experts": c.n_routed_experts, "n_shared_experts": c.n_shared_experts,
                "routed_scaling_factor": c.routed_scaling_factor, "n_group": c.n_group, "topk_group": c.topk_group,
                "first_k_dense_replace": c.first_k_dense, "num_nextn_predict_layers": 0}
    if a == "Glm4MoeForCausalLM":
        out |= {"use_qk_norm": c.qk_norm, "partial_rotary_factor": 1.0}
        rope["partial_rotary_factor"] = 1.0
    elif a == "Qwen3MoeForCausalLM":
        out |= {"intermediate_size": c.d_ff, "moe_intermediate_size": c.d_expert, "num_experts": c.n_routed_experts,
                "decoder_sparse_step": 1, "mlp_only_layers": list(range(c.first_k_dense)), "use_sliding_window": False}
    elif a == "MixtralForCausalLM":
        out |= {"intermediate_size": c.d_expert, "num_local_experts": c.n_routed_experts, "sliding_window": None,
                "router_jitter_noise": 0.0}
    return out


def export(model: Transformer, directory: str | Path, architecture: str | None = None) -> Path:
    """Write ``model`` to ``directory`` as a ``transformers`` checkpoint of ``architecture`` (default:
    :func:`architecture_for` its config); returns the directory. Refuses, before writing, what the target cannot
    express. ``AutoModelForCausalLM.from_pretrained(directory)`` then gives moelab's eval-mode logits."""
    from safetensors.torch import save_file  # the `lab` extra pins it; transformers depends on it too

    architecture = architecture or architecture_for(model.config)
    check_exportable(model.config, architecture)
    check_model(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model, architecture), directory / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(model.config, architecture, model.output.weight.dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory
