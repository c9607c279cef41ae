"""The checks of notebook 13's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import dataclasses

import pytest
from solutions import load

from moelab import exercises, presets

NS = load("13_trillion_scale.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_kv_cache_elements(NS["kv_cache_elements"])
    assert exercises.check_mla_parameters(NS["mla_parameters"])
    assert exercises.check_training_memory(NS["training_memory"])
    assert exercises.check_serving_memory(NS["serving_memory"])


def test_kv_cache_of_every_head_fails_with_a_hint():
    def every_head(config):
        if config.attention == "mla":
            return config.n_head * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
        return 2 * config.n_kv_head * config.head_dim

    verdict = repr(exercises.check_kv_cache_elements(every_head))
    assert verdict.startswith("✗ check_kv_cache_elements: on input 1 of 7 (config=DeepSeek-V3) the result is 40,960, "
                              "expected 576.")
    assert "not every head's keys and values" in verdict


def test_kv_cache_without_the_rope_key_fails_with_a_hint():
    def latent_only(config):
        return config.kv_lora_rank if config.attention == "mla" else 2 * config.n_kv_head * config.head_dim

    verdict = repr(exercises.check_kv_cache_elements(latent_only))
    assert "on input 1 of 7 (config=DeepSeek-V3) the result is 512, expected 576" in verdict
    assert "RoPE key" in verdict


def test_kv_cache_of_all_query_heads_fails_on_a_grouped_query_model():
    def query_heads(config):
        return NS["kv_cache_elements"](config) if config.attention == "mla" else 2 * config.n_head * config.head_dim

    verdict = repr(exercises.check_kv_cache_elements(query_heads))
    assert verdict == ("✗ check_kv_cache_elements: on input 5 of 7 (config=Qwen3-235B-A22B) the result is 16,384, "
                       "expected 1,024. Hint: grouped-query attention caches n_kv_head heads, not n_head.")


def test_mla_parameters_without_the_norms_fails_with_a_hint():
    def without_norms(config):
        return NS["mla_parameters"](config) - config.q_lora_rank - config.kv_lora_rank

    verdict = repr(exercises.check_mla_parameters(without_norms))
    assert verdict.startswith("✗ check_mla_parameters: on input 1 of 6 (config=DeepSeek-V3) the result is "
                              "187,105,280, expected 187,107,328.")
    assert "RMSNorm weights" in verdict


def test_mla_parameters_without_the_rope_key_fails_with_a_hint():
    def without_rope_key(config):
        return NS["mla_parameters"](config) - config.d_model * config.qk_rope_head_dim

    verdict = repr(exercises.check_mla_parameters(without_rope_key))
    assert "the result is 186,648,576, expected 187,107,328" in verdict and "shared RoPE key" in verdict


def test_mla_parameters_label_names_the_changed_field():
    def wrong_when_halved(config):
        return NS["mla_parameters"](config) + (config.kv_lora_rank == 256)

    verdict = repr(exercises.check_mla_parameters(wrong_when_halved))
    assert verdict.startswith("✗ check_mla_parameters: on input 2 of 6 (config=DeepSeek-V3 with kv_lora_rank=256)")


def test_training_memory_with_zero1_over_all_replicas_fails_with_a_hint():
    def over_dp(config, layout):
        m = NS["training_memory"](config, dataclasses.replace(layout, zero1=False))
        return {**m, "optimizer": m["optimizer"] / layout.dp if layout.zero1 else m["optimizer"]}

    verdict = repr(exercises.check_training_memory(over_dp))
    assert verdict.startswith("✗ check_training_memory: on input 1 of 7 (config=DeepSeek-V3, layout=Layout(dp=128, "
                              "tp=1, pp=16, ep=64, zero1=True)) the result['optimizer'] is 1.60166e+08, expected "
                              "3.9318e+09.")
    assert "dp / ep replicas" in verdict


def test_training_memory_without_the_master_copy_fails_with_a_hint():
    def no_master(config, layout):
        m = NS["training_memory"](config, layout)
        return {**m, "optimizer": m["optimizer"] * 8 / 12}

    verdict = repr(exercises.check_training_memory(no_master))
    assert "the result['optimizer'] is 2.6212e+09, expected 3.9318e+09" in verdict and "fp32 master copy" in verdict


def test_training_memory_with_tp_splitting_the_experts_fails_with_a_hint():
    def tp_splits_all(config, layout):
        counts = presets.analytic_counts(config)
        experts = counts["routed_experts"] / (layout.ep * layout.tp * layout.pp)
        rest = (counts["total"] - counts["routed_experts"]) / (layout.tp * layout.pp)
        sharded = experts / (layout.dp // layout.ep) + rest / layout.dp if layout.zero1 else experts + rest
        return {"weights": 2 * (experts + rest), "gradients": 2 * (experts + rest), "optimizer": 12 * sharded}

    verdict = repr(exercises.check_training_memory(tp_splits_all))
    assert "on input 4 of 7 (config=DeepSeek-V3, layout=Layout(dp=64, tp=8, pp=4, ep=64, zero1=True)) the " \
           "result['weights'] is 1.70843e+09, expected 6.17851e+09" in verdict
    assert "does not split the routed experts" in verdict


def test_serving_memory_with_every_expert_fails_with_a_hint():
    def every_expert(config, layout, kv_tokens):
        return NS["serving_memory"](config, dataclasses.replace(layout, dp=1, ep=1), kv_tokens)

    verdict = repr(exercises.check_serving_memory(every_expert))
    assert verdict.startswith("✗ check_serving_memory: on input 1 of 6 (config=Kimi K2, layout=Layout(dp=8, tp=1, "
                              "pp=1, ep=8, zero1=False), kv_tokens=131072) the result['weights'] is 1.02641e+12")
    assert "n_routed_experts / ep" in verdict


def test_serving_memory_with_the_cache_of_every_layer_fails_with_a_hint():
    def every_layer(config, layout, kv_tokens):
        m = NS["serving_memory"](config, layout, kv_tokens)
        return {**m, "kv_cache": m["kv_cache"] * layout.pp}

    verdict = repr(exercises.check_serving_memory(every_layer))
    assert "on input 3 of 6 (config=Kimi K2, layout=Layout(dp=8, tp=1, pp=2, ep=8, zero1=False)" in verdict
    assert "its own n_layer / pp layers" in verdict


def test_serving_memory_with_the_latent_split_by_tp_fails_with_a_hint():
    def split_latent(config, layout, kv_tokens):
        m = NS["serving_memory"](config, layout, kv_tokens)
        return {**m, "kv_cache": m["kv_cache"] / layout.tp if config.attention == "mla" else m["kv_cache"]}

    verdict = repr(exercises.check_serving_memory(split_latent))
    assert "on input 4 of 6 (config=DeepSeek-V3, layout=Layout(dp=4, tp=2, pp=1, ep=4, zero1=False), " \
           "kv_tokens=32768) the result['kv_cache'] is 1.15134e+09, expected 2.30267e+09" in verdict
    assert "tensor parallelism does not split it" in verdict


def test_an_unfilled_stub_raises_not_implemented_error():
    def stub(config):
        raise NotImplementedError("exercise 12.1: write kv_cache_elements")

    with pytest.raises(NotImplementedError, match="exercise 12.1"):
        exercises.check_kv_cache_elements(stub)
