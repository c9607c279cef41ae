"""Router semantics: renormalisation, a selection-only bias, group limiting, scaling, expert choice."""
import torch

from moelab.router import ExpertChoiceRouter, SigmoidRouter, SoftmaxRouter, limit_to_groups


def test_softmax_router_renormalises_only_when_asked():
    torch.manual_seed(0)
    x = torch.randn(20, 8)
    normed, raw = SoftmaxRouter(8, 6, 2), SoftmaxRouter(8, 6, 2, norm_topk_prob=False)
    raw.weight.data.copy_(normed.weight.data)
    a, b = normed(x), raw(x)
    torch.testing.assert_close(a.weights.sum(-1), torch.ones(20))
    probs = torch.softmax(x @ normed.weight.T, -1)
    torch.testing.assert_close(b.weights, probs.topk(2, -1).values)  # Qwen3 with norm_topk_prob = False
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.probs.sum(-1), torch.ones(20))


def test_sigmoid_bias_changes_the_selection_but_never_the_gate_values():
    torch.manual_seed(0)
    router = SigmoidRouter(8, 6, 2, norm_topk_prob=False)
    x = torch.randn(30, 8)
    before = router(x)
    router.bias[5] = 10.0  # expert 5 now wins every selection ...
    after = router(x)
    assert bool((after.indices == 5).any(-1).all()) and not bool((before.indices == 5).any(-1).all())
    scores = torch.sigmoid(x @ router.weight.T)
    torch.testing.assert_close(after.weights, scores.gather(-1, after.indices))  # ... with its unbiased score


def test_group_limiting_never_picks_outside_the_best_groups():
    torch.manual_seed(0)
    scores = torch.rand(50, 16)
    scores[:, 0] = 5.0  # the best single expert sits in group 0, whose second-best is then made poor
    scores[:, 1:4] = 0.0
    masked = limit_to_groups(scores, n_group=4, topk_group=2)
    group_score = scores.view(50, 4, 4).topk(2, -1).values.sum(-1)
    best_groups = group_score.topk(2, -1).indices
    chosen_groups = masked.topk(3, -1).indices // 4
    assert all(set(c.tolist()) <= set(g.tolist()) for c, g in zip(chosen_groups, best_groups))
    assert torch.isinf(masked).sum(-1).eq(8).all()  # exactly the two other groups are masked


def test_routed_scaling_factor_scales_the_renormalised_weights():
    router = SigmoidRouter(8, 16, 4, routed_scaling_factor=2.5, n_group=4, topk_group=2)
    out = router(torch.randn(10, 8))
    torch.testing.assert_close(out.weights.sum(-1), torch.full((10,), 2.5))
    assert bool(((out.indices // 4).unique(dim=-1).shape[-1] <= 4))


def test_expert_choice_balances_exactly_and_is_not_causal():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(8, 4, capacity_factor=1.0)
    x = torch.randn(12, 8)
    tokens, gates = router(x)
    assert tokens.shape == (4, 3) and gates.shape == (4, 3)  # every expert takes exactly ceil(12 / 4) tokens
    earlier = set(tokens.flatten().tolist()) & set(range(6))
    changed = x.clone()
    changed[6:] = 10 * router.weight[0]  # later tokens that expert 0 likes more than anything
    earlier_after = set(router(changed)[0].flatten().tolist()) & set(range(6))
    assert earlier != earlier_after  # which earlier tokens get an expert depended on later tokens


def test_routers_built_directly_validate_their_shape():
    import pytest

    from moelab.config import ConfigError
    with pytest.raises(ConfigError, match=r"SigmoidRouter.n_group = 3 .* n_experts = 8"):
        SigmoidRouter(8, 8, 2, n_group=3)
    with pytest.raises(ConfigError, match=r"SoftmaxRouter.top_k = 5 .* only topk_group · n_experts / n_group = 4"):
        SoftmaxRouter(8, 8, 5, n_group=4, topk_group=2)
