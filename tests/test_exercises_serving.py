"""The checks of notebook 12's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import functools

import pytest
import torch
from solutions import load

from moelab import exercises, presets
from moelab.config import ModelConfig
from moelab.decode import mla_absorbed_step
from moelab.exercises.serving import _absorbed, _naive_attention
from moelab.expert_cache import lru_hit_rate
from moelab.model import Transformer
from moelab.roofline import expected_distinct_experts

NS = load("12_serving.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_distinct_experts(NS["distinct_experts"])
    assert exercises.check_lru_loads(NS["lru_loads"])
    assert exercises.check_absorbed_attention(NS["absorbed_attention"])


def test_the_predictions_are_what_the_library_says():
    assert round(expected_distinct_experts(256, 8, 64), 1) == 222.4
    small = torch.tensor([[0], [1], [0], [2], [0]])[:, None, :]
    cycle = (torch.arange(100) % 5)[:, None, None]
    assert [lru_hit_rate(small, 2, 3).loads, lru_hit_rate(cycle, 4, 5).loads, lru_hit_rate(cycle, 5, 5).loads] \
        == [3, 100, 5]
    v3 = presets.PRESETS["DeepSeek-V3"]()
    naive = v3.n_head * (v3.qk_nope_head_dim + v3.qk_rope_head_dim + v3.v_head_dim)
    assert (2 * v3.kv_cache_elements(), 2 * naive, 2 * v3.kv_cache_elements() * v3.n_layer) == (1152, 81920, 70272)


@pytest.mark.parametrize("n_experts, top_k, batch", [(256, 8, 64), (64, 6, 8), (16, 2, 1), (32, 4, 24)])
def test_the_distinct_experts_formula_is_what_uniform_routing_samples(n_experts, top_k, batch):
    trials = 400
    scores = torch.rand(trials, batch, n_experts, generator=torch.Generator().manual_seed(n_experts + batch))
    picked = torch.zeros(trials, n_experts, dtype=torch.bool)
    picked.scatter_(1, scores.topk(top_k, dim=-1).indices.flatten(1), True)     # k distinct experts per token
    counts = picked.sum(1).double()
    error = 4 * counts.std().item() / trials ** 0.5 + 1e-6        # 4 standard errors
    assert abs(counts.mean().item() - NS["distinct_experts"](n_experts, top_k, batch)) <= error


def test_experts_without_sharing_fail_with_a_hint():
    def every_use_a_new_expert(n_experts, top_k, batch):
        return min(n_experts, batch * top_k)

    verdict = repr(exercises.check_distinct_experts(every_use_a_new_expert))
    assert verdict == ("✗ check_distinct_experts: on input 1 of 14 (n_experts=256, top_k=8, batch=64) the result is "
                       "256, expected 222.442. Hint: tokens share experts: expert e is untouched only when every "
                       "token misses it, with probability (1 − k/E)^B; sum 1 − that over the E experts.")


def test_k_independent_draws_per_token_fail_with_a_hint():
    def with_replacement(n_experts, top_k, batch):
        return n_experts * (1 - (1 - 1 / n_experts) ** (batch * top_k))

    verdict = repr(exercises.check_distinct_experts(with_replacement))
    assert "on input 1 of 14 (n_experts=256, top_k=8, batch=64) the result is 221.49, expected 222.442" in verdict
    assert "Hint: a token's k experts are distinct, not k independent draws" in verdict


def test_fifo_instead_of_lru_fails_with_a_hint():
    def fifo_loads(trace, capacity):
        cache, loads = [], 0
        for step in trace:
            for expert in step:
                if expert not in cache:            # a hit leaves the expert where it was: first in, first out
                    cache = cache[1:] if len(cache) == capacity else cache
                    cache.append(expert)
                    loads += 1
        return loads

    verdict = repr(exercises.check_lru_loads(fifo_loads))
    assert verdict == ("✗ check_lru_loads: on input 1 of 11 (trace=[[0], [1], [0], [2], [0]], capacity=2) the result "
                       "is 4, expected 3. Hint: on a hit, LRU makes the expert the most recently used again; "
                       "evicting in the order of loading (FIFO) throws out experts that are still in use.")


def test_counting_only_the_evictions_fails_with_a_hint():
    def evictions(trace, capacity):
        return NS["lru_loads"](trace, capacity) - min(capacity, len({e for step in trace for e in step}))

    verdict = repr(exercises.check_lru_loads(evictions))
    assert "the result is 1, expected 3. Hint: every load counts, the first ones into the empty cache too" in verdict


def test_the_absorbed_attention_reference_is_moelabs_absorbed_decode_step():
    config = ModelConfig(vocab_size=40, block_size=32, n_layer=1, n_head=4, d_model=32, n_routed_experts=4, top_k=2,
                         d_expert=16, attention="mla", q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8,
                         qk_rope_head_dim=4, v_head_dim=6)
    torch.manual_seed(0)
    model = Transformer(config).double().eval()
    attn, (B, S), H, r = model.layers[0].attn, (2, 9), config.n_head, config.kv_lora_rank
    x = torch.randn(B, S, config.d_model, dtype=torch.float64)
    cos, sin = model.rope_cos, model.rope_sin
    cache = (torch.zeros(B, S, r, dtype=torch.float64), torch.zeros(B, S, config.qk_rope_head_dim,
                                                                     dtype=torch.float64))
    with torch.no_grad():
        mla_absorbed_step(attn, x[:, :-1], cos[:S - 1], sin[:S - 1], cache, 0)                  # the prefill
        expected = mla_absorbed_step(attn, x[:, -1:], cos[S - 1:S], sin[S - 1:S], cache, S - 1)
        q_nope, q_pe = attn.queries(x[:, -1:], cos[S - 1:S], sin[S - 1:S])
        w_uk, w_uv = attn.wkv_b.weight.view(H, attn.nope + attn.v_dim, r).split([attn.nope, attn.v_dim], 1)
        inputs = dict(q_nope=q_nope, q_pe=q_pe, c_kv=cache[0], k_pe=cache[1], w_uk=w_uk, w_uv=w_uv,
                      scale=attn.scale)
        for fn in (NS["absorbed_attention"], _naive_attention):
            torch.testing.assert_close(attn.wo(fn(**inputs).reshape(B, 1, H * attn.v_dim)), expected)


@pytest.mark.parametrize("wrong, hint", [
    (functools.partial(_absorbed, rope=False), "add the position part q_pe · k_pe to every score"),
    (functools.partial(_absorbed, scaled=False), "multiply the scores by scale before the softmax."),
    (functools.partial(_absorbed, softmax_dim=1), "the softmax runs over the S cached positions, for each head"),
], ids=["no-rope-scores", "unscaled", "softmax-over-heads"])
def test_absorbed_attention_mistakes_fail_with_a_hint(wrong, hint):
    verdict = repr(exercises.check_absorbed_attention(wrong))
    assert verdict.startswith("✗ check_absorbed_attention: on input 1 of 6 (q_nope=tensor(2, 4, 1, 16) float64, ")
    assert f"Hint: {hint}" in verdict


def test_absorbed_attention_in_the_heads_first_layout_is_named():
    def heads_first(**inputs):
        return NS["absorbed_attention"](**inputs).transpose(1, 2)

    verdict = repr(exercises.check_absorbed_attention(heads_first))
    assert verdict.endswith("the result has shape (2, 4, 1, 16), expected (2, 1, 4, 16).")


def test_an_unfilled_stub_reaches_the_learner():
    def stub(trace, capacity):
        raise NotImplementedError("exercise 12.2: write lru_loads")

    with pytest.raises(NotImplementedError, match="exercise 12.2"):
        exercises.check_lru_loads(stub)
