"""Expert offloading: the LRU simulation on hand-computed traces, the trained router's trace and its prefetch."""
import pytest
import torch

from moelab.data import load_corpus
from moelab.experiments.moe_vs_dense import load_trained
from moelab.expert_cache import (
    CacheStats,
    bytes_per_expert,
    guess_accuracy,
    lru_hit_rate,
    lru_with_prefetch,
    offload_tokens_per_s,
    prefetch_guesses,
    routing_trace,
)


@pytest.fixture(scope="module")
def trained():
    """The trained model, 4 validation windows of 64 tokens, their routing trace and the prefetch guesses."""
    model, data = load_trained(), load_corpus()
    idx, _ = data.batch("val", 4, 64, seed=0, balanced=True)
    return model, idx, routing_trace(model, idx), prefetch_guesses(model, idx)


def one_sequence(steps):
    """A hand-made trace ``(T, 1, k)`` from a list of each step's experts."""
    return torch.tensor(steps)[:, None, :]


def test_lru_on_hand_made_traces_gives_the_hand_computed_hits():
    # capacity 2, one expert a step: 0 miss, 1 miss, 0 hit, 2 miss (evicts 1), 1 miss (evicts 0), 0 miss (evicts 2)
    assert lru_hit_rate(one_sequence([[0], [1], [0], [2], [1], [0]]), 2, 3) == CacheStats(6, 6, 1, 5)
    # two a step: {0,1} 2 misses; 1 hit, 2 miss (evicts 0); 0 miss (evicts 1), 2 hit
    stats = lru_hit_rate(one_sequence([[0, 1], [1, 2], [0, 2]]), 2, 3)
    assert stats == CacheStats(tokens=3, uses=6, hits=2, loads=4) and stats.hit_rate == pytest.approx(1 / 3)
    assert stats.misses_per_token == pytest.approx(4 / 3) and stats.prefetched_per_token == 0
    # two sequences decode separately: each starts cold, and their hits add up
    both = torch.cat([one_sequence([[0], [1], [0], [2], [1], [0]]), one_sequence([[2], [2], [2], [2], [2], [2]])], 1)
    assert lru_hit_rate(both, 2, 3) == CacheStats(tokens=12, uses=12, hits=1 + 5, loads=5 + 1)


def test_prefetch_on_a_hand_made_trace():
    # capacity 2; used 0, 1, 0, 1; guessed 0, 0, 1, 2 (one right guess in four)
    trace, guesses = one_sequence([[0], [1], [0], [1]]), one_sequence([[0], [0], [1], [2]])
    # step 0: load 0 (prefetch), hit 0; step 1: 0 resident, 1 miss; step 2: 1 resident, 0 hit;
    # step 3: load 2 evicting 1 (least recent), 1 miss evicting 0
    assert lru_with_prefetch(trace, guesses, 2, 3) == CacheStats(tokens=4, uses=4, hits=2, loads=4)
    assert guess_accuracy(guesses, trace) == 0.25


def test_a_cache_of_every_expert_misses_only_the_first_use_of_each(trained):
    model, _, trace, _ = trained
    E = model.config.n_routed_experts
    for layer in trace:
        distinct = sum(len(set(layer[:, b].flatten().tolist())) for b in range(layer.shape[1]))
        stats = lru_hit_rate(layer, E, E)
        assert stats.hit_rate == pytest.approx(1 - distinct / layer.numel())
        assert stats.loads == distinct and stats.uses == layer.numel()


def test_hit_rate_grows_with_capacity_on_the_trained_router(trained):
    model, _, trace, _ = trained
    E, k = model.config.n_routed_experts, model.config.top_k
    g = torch.Generator().manual_seed(0)
    for layer in trace[::2]:
        rates = [lru_hit_rate(layer, c, E).hit_rate for c in range(1, E + 1)]
        assert all(a <= b for a, b in zip(rates, rates[1:]))     # LRU's inclusion property: no Belady anomaly
        # the trained router favours some experts: more hits than a router choosing k experts uniformly at random
        uniform = torch.rand(*layer.shape[:2], E, generator=g).topk(k, dim=-1).indices
        assert all(rates[c - 1] > lru_hit_rate(uniform, c, E).hit_rate + 0.03 for c in (8, 16))


def test_the_one_pass_trace_is_the_routing_of_a_token_by_token_recomputation(trained):
    model, idx, trace, _ = trained
    assert [t.shape for t in trace] == [(64, 4, model.config.top_k)] * 4
    with torch.no_grad():
        for t in range(8):
            model(idx[:, :t + 1])
            for moe, layer in zip(model.moe_layers, trace):
                assert torch.equal(moe.indices[:, -1].sort(-1).values, layer[t].sort(-1).values)


def test_an_oracle_prefetch_hits_every_time(trained):
    model, _, trace, _ = trained
    E, k = model.config.n_routed_experts, model.config.top_k
    for layer in trace:
        stats = lru_with_prefetch(layer, layer, k, E)
        assert stats.hit_rate == 1 and stats.misses_per_token == 0
        assert stats.loads == lru_hit_rate(layer, k, E).loads      # the same experts load, only earlier
        assert guess_accuracy(layer, layer) == 1


def test_the_next_layers_gate_guesses_well_above_chance(trained):
    model, idx, trace, guesses = trained
    E, k = model.config.n_routed_experts, model.config.top_k
    assert len(guesses) == 3 and all(g.shape == (64, 4, k) for g in guesses)
    accuracy = [guess_accuracy(g, t) for g, t in zip(guesses, trace[1:])]
    assert all(a > 2 * k / E for a in accuracy)                     # chance is k / E
    wider = prefetch_guesses(model, idx, 2 * k)
    assert all(guess_accuracy(g, t) >= a for g, t, a in zip(wider, trace[1:], accuracy))
    assert all(guess_accuracy(g, t) == 1 for g, t in zip(prefetch_guesses(model, idx, E), trace[1:]))
    for g, t in zip(guesses, trace[1:]):
        assert lru_with_prefetch(t, g, 16, E).hit_rate > lru_hit_rate(t, 16, E).hit_rate


def test_the_throughput_model_on_a_hand_example():
    # 1 GB read at 1 TB/s (1 ms) plus 2 misses of 1 MB at 10 GB/s (0.2 ms): 1.2 ms a token
    assert offload_tokens_per_s(1e6, 2, 1e9, 1e12, 1e10) == pytest.approx(1 / 1.2e-3)
    # 200 prefetched experts make the link the bottleneck: 202 MB at 10 GB/s = 20.2 ms
    assert offload_tokens_per_s(1e6, 2, 1e9, 1e12, 1e10, prefetched_per_token=200) == pytest.approx(1 / 20.2e-3)
    assert offload_tokens_per_s(1e6, 0, 1e9, 1e12, 1e10) == pytest.approx(1000)


def test_bytes_per_expert_counts_one_experts_three_matrices(trained):
    model = trained[0]
    c = model.config
    assert bytes_per_expert(model.moe_layers[0]) == 3 * c.d_model * c.d_expert * 4


@pytest.mark.parametrize("call, match", [
    (lambda t: lru_hit_rate(t, 0, 3), r"lru_hit_rate.capacity = 0 is not allowed; allowed: an integer >= 1"),
    (lambda t: lru_hit_rate(t, 4, 3), r"lru_hit_rate.capacity = 4 is not allowed; allowed: 1..n_experts = 3"),
    (lambda t: lru_hit_rate(t, 2.0, 3), r"capacity = 2.0 is not allowed"),
    (lambda t: lru_hit_rate(t[:, 0], 2, 3), r"lru_hit_rate.trace = \(3, 2\) is not allowed; allowed: a non-empty "
                                            r"\(T, B, k\) torch.long"),
    (lambda t: lru_hit_rate(t.float(), 2, 3), r"trace = \(3, 1, 2\) is not allowed"),
    (lambda t: lru_hit_rate(t[:0], 2, 3), r"trace = \(0, 1, 2\) is not allowed"),
    (lambda t: lru_hit_rate(t + 2, 2, 3), r"trace = 'ids 2..4' is not allowed; allowed: expert ids 0..n_experts - 1"),
    (lambda t: lru_with_prefetch(t, t[:2], 2, 3), r"guesses = \(2, 1, 2\) is not allowed; .* with \(T, B\) = \(3, 1\)"),
    (lambda t: guess_accuracy(t[:, :, None], t), r"guess_accuracy.guesses = \(3, 1, 1, 2\) is not allowed"),
    (lambda t: offload_tokens_per_s(1e6, -1, 1e9, 1e12, 1e10), r"misses_per_token = -1 is not allowed"),
    (lambda t: offload_tokens_per_s(1e6, 1, 1e9, 0, 1e10), r"fast_bw = 0 is not allowed; allowed: a number in \(0"),
    (lambda t: offload_tokens_per_s(1e6, 0, 0, 1e12, 1e10), r"resident_bytes_per_token = 0 is not allowed"),
])
def test_bad_inputs_name_the_argument_and_what_is_allowed(call, match):
    with pytest.raises(ValueError, match=match):
        call(one_sequence([[0, 1], [1, 2], [0, 2]]))


def test_bad_n_guess_is_refused(trained):
    model, idx, _, _ = trained
    for n in (0, 32):
        with pytest.raises(ValueError, match=rf"prefetch_guesses.n_guess = {n} is not allowed"):
            prefetch_guesses(model, idx, n)
