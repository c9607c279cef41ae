"""The decode bytes model counts what a cached decode step reads: dense weights, the touched experts, the cache."""
import math

import pytest
import torch

from moelab.config import ConfigError, ModelConfig
from moelab.model import Transformer
from moelab.presets import deepseek_v3, meta_model
from moelab.roofline import decode_step_bytes, expected_distinct_experts, stream

MOE = ModelConfig(vocab_size=50, n_layer=3, n_head=4, n_kv_head=2, d_model=32, n_routed_experts=8, top_k=2,
                  d_expert=16, n_shared_experts=1, first_k_dense=1)


def test_expected_distinct_experts_matches_sampling():
    gen = torch.Generator().manual_seed(0)
    for E, k, B in [(8, 2, 1), (8, 2, 4), (64, 6, 16), (256, 8, 64)]:
        draws = [len(set(torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(B)]).flatten().tolist()))
                 for _ in range(400)]
        assert math.isclose(sum(draws) / len(draws), expected_distinct_experts(E, k, B), rel_tol=0.03)
    assert expected_distinct_experts(8, 2, 1) == 2 and expected_distinct_experts(8, 2, 0) == 0


def test_decode_bytes_count_each_part():
    m = Transformer(MOE)
    c, size = MOE, 4
    per_expert = 3 * c.d_model * c.d_expert
    n_moe = c.n_layer - c.first_k_dense
    b = decode_step_bytes(m, batch=1, context=10)
    all_params = sum(p.numel() for p in m.parameters())
    routed = n_moe * c.n_routed_experts * per_expert
    dense = all_params - routed - c.vocab_size * c.d_model + c.d_model       # one embedding row looked up
    assert b["weights"] == dense * size
    assert b["experts"] == n_moe * c.top_k * per_expert * size                # batch 1 touches exactly k
    assert b["kv_cache"] == 10 * c.n_layer * 2 * c.n_kv_head * c.head_dim * size
    many = decode_step_bytes(m, batch=10_000, context=0)
    assert math.isclose(many["experts"], routed * size, rel_tol=1e-9)           # a big batch touches all of them
    assert decode_step_bytes(m, 4, 0, distinct_experts=3)["experts"] == n_moe * 3 * per_expert * size


def test_deepseek_v3_at_batch_one_reads_its_active_parameters():
    m = meta_model(deepseek_v3())
    b = decode_step_bytes(m, batch=1, context=0, weight_bytes=1)
    # DeepSeek's 36.7 B activated excludes the input embedding, as the bytes a step reads do (plus one row).
    assert 36.5e9 < b["weights"] + b["experts"] < 36.8e9


def test_stream_measures_a_plausible_bandwidth():
    bw = stream(n_bytes=8 * 2**20, repeats=2)
    assert set(bw) == {"copy", "triad", "read"} and all(1e8 < v < 1e13 for v in bw.values())


def test_bad_input_names_the_field():
    m = Transformer(MOE)
    with pytest.raises(ConfigError, match="top_k"):
        expected_distinct_experts(8, 9, 1)
    with pytest.raises(ConfigError, match="batch"):
        decode_step_bytes(m, 0, 1)
    with pytest.raises(ConfigError, match="n_bytes"):
        stream(n_bytes=10)
