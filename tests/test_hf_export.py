"""moelab.hf_export: transformers loads the exported checkpoint and computes the same logits as moelab.

Tolerance: both run in fp32, so the logits differ only by rounding in another order (eager attention against
SDPA, a per-expert loop against grouped matmuls, RoPE angles from fp32 frequencies against fp64 ones). The
largest difference measured was 9.5e-6 (the trained model, logits up to 22; the small random models 1.2e-6 to
2.2e-6); ``1e-4`` absolute and relative leaves a tenfold margin, while leaving out the RoPE reordering alone
makes the logits differ by 2 to 13.
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moelab.config import ModelConfig
from moelab.experiments.moe_vs_dense import load_trained
from moelab.ffn import SwiGLU
from moelab.hf_export import architecture_for, export
from moelab.layers import RMSNorm
from moelab.model import Transformer, evaluating

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
SMALL = dict(vocab_size=97, block_size=64, n_layer=3, d_model=64, n_head=4, init_std=0.1, n_routed_experts=8)
MLA = dict(attention="mla", q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, router="sigmoid", n_shared_experts=1, d_expert=16, norm_eps=1e-6)
CONFIGS = {   # name: (fields, architecture)
    "glm_qk_norm_groups": (dict(n_kv_head=2, head_dim=32, qk_norm=True, router="sigmoid", n_shared_experts=2,
                                top_k=3, d_expert=16, d_ff=96, first_k_dense=1, n_group=4, topk_group=2,
                                routed_scaling_factor=2.5), "Glm4MoeForCausalLM"),
    "deepseek_v3": (dict(MLA, top_k=2, first_k_dense=1, n_group=4, topk_group=2, routed_scaling_factor=2.5),
                    "DeepseekV3ForCausalLM"),
    "deepseek_v3_no_q_lora": (dict(MLA, q_lora_rank=0, top_k=3, norm_topk_prob=False), "DeepseekV3ForCausalLM"),
    "qwen3_moe_capacity": (dict(n_kv_head=2, qk_norm=True, top_k=2, d_expert=32, first_k_dense=1,
                                norm_topk_prob=False, dispatch="capacity"), "Qwen3MoeForCausalLM"),
    "mixtral_tied": (dict(n_kv_head=1, n_routed_experts=4, top_k=2, d_expert=48, tie_embeddings=True),
                     "MixtralForCausalLM"),
}


def random_model(**fields) -> Transformer:
    """A small model with random weights, RMSNorm weights and sigmoid selection biases (all exported)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SMALL, **fields}))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.normal_(1.0, 0.2)
        for moe in model.moe_layers:
            if moe.config.router == "sigmoid":
                moe.router.bias.uniform_(-0.1, 0.1)
    return model.eval()


def assert_same_logits(model: Transformer, directory) -> float:
    """Load ``directory`` with transformers (fp32, eager attention) and compare logits on 2 × 32 tokens."""
    hf, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                                    output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with evaluating(model), torch.no_grad():
        expected, actual = model(idx)[0], hf.eval()(idx).logits
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    return (actual - expected).abs().max().item()


def test_the_trained_course_model_loads_as_glm4_moe_with_the_same_logits(tmp_path):
    model = load_trained()
    assert architecture_for(model.config) == "Glm4MoeForCausalLM"
    assert export(model, tmp_path) == tmp_path
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["n_routed_experts"] == 31
    assert config["partial_rotary_factor"] == 1.0 and config["num_experts_per_tok"] == 7
    assert assert_same_logits(model, tmp_path) < TOLERANCE["atol"]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_small_random_model_loads_as_its_architecture_with_the_same_logits(tmp_path, name):
    fields, architecture = CONFIGS[name]
    model = random_model(**fields)
    assert architecture_for(model.config) == architecture
    export(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))["architectures"] == [architecture]
    assert_same_logits(model, tmp_path)


REFUSED = [  # (fields, architecture passed to export, the field the message names)
    (dict(n_routed_experts=0), None, "n_routed_experts"),
    (dict(n_shared_experts=1), None, "n_shared_experts"),                      # softmax: Qwen3 / Mixtral
    (dict(routed_scaling_factor=2.0), None, "routed_scaling_factor"),
    (dict(n_group=2, topk_group=1), None, "n_group"),
    (dict(norm_topk_prob=False), None, "norm_topk_prob"),                      # Mixtral always renormalises
    (dict(first_k_dense=1), None, "first_k_dense"),                            # Mixtral has no dense layers
    (dict(qk_norm=True), "MixtralForCausalLM", "qk_norm"),
    (dict(), "Qwen3MoeForCausalLM", "qk_norm"),                                # Qwen3 always has QK-norm
    (dict(router="sigmoid"), None, "n_shared_experts"),                        # GLM always has shared experts
    (dict(router="sigmoid", n_shared_experts=1, n_group=8, topk_group=4), None, "n_group"),   # 1 expert a group
    (dict(router="sigmoid", n_shared_experts=1), "DeepseekV3ForCausalLM", "attention"),
    (dict(MLA, router="softmax", n_shared_experts=0), None, "router"),
    (dict(MLA, norm_eps=1e-5), None, "norm_eps"),
]


@pytest.mark.parametrize("fields, architecture, field", REFUSED, ids=[f for *_, f in REFUSED])
def test_what_the_target_cannot_express_is_refused_naming_the_field_before_writing(tmp_path, fields, architecture,
                                                                                   field):
    model = random_model(**fields)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} = "):
        export(model, tmp_path / "out", architecture)
    assert not (tmp_path / "out").exists()


def test_a_softmax_router_with_a_selection_bias_an_unknown_architecture_and_a_custom_ffn_are_refused(tmp_path):
    model = random_model(bias_update_speed=1e-3)
    model.moe_layers[0].router.bias[0] = 0.1
    with pytest.raises(ValueError, match=r"ModelConfig\.bias_update_speed = 0\.001"):
        export(model, tmp_path)
    with pytest.raises(ValueError, match="architecture = 'LlamaForCausalLM' is not allowed"):
        export(random_model(), tmp_path, "LlamaForCausalLM")
    dense_slot = Transformer(ModelConfig(**SMALL), make_ffn=lambda c, i: SwiGLU(c.d_model, c.d_ff))
    with pytest.raises(ValueError, match="layer 0's FFN is a SwiGLU"):
        export(dense_slot, tmp_path)
    assert not list(tmp_path.iterdir())
