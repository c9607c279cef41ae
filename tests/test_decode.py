"""Cached decoding gives the logits of the full forward pass, for every attention layout, and reads what it says."""
import pytest
import torch

from moelab.config import ConfigError, ModelConfig
from moelab.decode import KVCache, forward_cached, greedy_decode
from moelab.model import Transformer

BASE = dict(vocab_size=40, block_size=32, n_layer=2, n_head=4, d_model=32, n_routed_experts=4, top_k=2, d_expert=16)
MLA = dict(attention="mla", q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
           router="sigmoid", n_shared_experts=1)
CONFIGS = {"mha": ModelConfig(**BASE), "gqa-qknorm": ModelConfig(**BASE, n_kv_head=2, qk_norm=True),
           "mla": ModelConfig(**BASE, **MLA), "mla-no-qlora": ModelConfig(**{**BASE, **MLA, "q_lora_rank": 0})}


def model(name: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIGS[name]).eval()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("absorb", [True, False])
def test_prefill_chunks_and_steps_equal_the_full_forward(name, absorb):
    m = model(name)
    idx = torch.randint(0, 40, (3, 20), generator=torch.Generator().manual_seed(1))
    full, _ = m(idx)
    cache = KVCache(m, 3, 20, absorb)
    parts = [forward_cached(m, idx[:, :7], cache), forward_cached(m, idx[:, 7:10], cache)]
    parts += [forward_cached(m, idx[:, t:t + 1], cache) for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 20


def test_absorbed_mla_equals_naive_and_caches_the_latent_only():
    m, c = model("mla"), CONFIGS["mla"]
    idx = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    caches = {absorb: KVCache(m, 2, 12, absorb) for absorb in (True, False)}
    out = {absorb: forward_cached(m, idx, cache) for absorb, cache in caches.items()}
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-6)
    per_token_layer = {absorb: cache.nbytes() / (2 * 12 * c.n_layer * 4) for absorb, cache in caches.items()}
    assert per_token_layer[True] == c.kv_lora_rank + c.qk_rope_head_dim == c.kv_cache_elements()
    assert per_token_layer[False] == c.n_head * (c.head_dim + c.v_head_dim)


def test_gqa_cache_holds_two_values_per_kv_head_dimension():
    m, c = model("gqa-qknorm"), CONFIGS["gqa-qknorm"]
    cache = KVCache(m, 2, 16)
    forward_cached(m, torch.zeros(2, 5, dtype=torch.long), cache)
    assert cache.nbytes() == 2 * 5 * c.n_layer * 2 * c.n_kv_head * c.head_dim * 4


@pytest.mark.parametrize("name", ["gqa-qknorm", "mla"])
def test_greedy_decode_writes_what_generate_writes(name):
    m = model(name)
    prompt = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy_decode(m, prompt, 12), m.generate(prompt, 12, temperature=0))
    assert torch.equal(greedy_decode(m, prompt, 0), prompt)


def test_bad_input_names_the_field():
    m = model("mha")
    with pytest.raises(ConfigError, match="max_len"):
        KVCache(m, 1, 33)
    cache = KVCache(m, 2, 8)
    with pytest.raises(ConfigError, match="at most 8 new"):
        forward_cached(m, torch.zeros(2, 9, dtype=torch.long), cache)
    with pytest.raises(ConfigError, match="batch of 2"):
        forward_cached(m, torch.zeros(3, 1, dtype=torch.long), cache)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        greedy_decode(m, torch.zeros(1, 2, dtype=torch.long), -1)
