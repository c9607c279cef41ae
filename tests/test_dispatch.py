"""Every dispatch path computes the same outputs and gradients; capacity dispatch drops what it should."""
import pytest
import torch

from moelab.dispatch import (
    DROPLESS,
    capacity_dispatch,
    capacity_mask,
    capacity_report,
    expert_capacity,
    grouped_mm_available,
    grouped_mm_supported,
    loop_dispatch,
)
from moelab.ffn import Experts
from moelab.router import Routing, SigmoidRouter, SoftmaxRouter, skewed_routing


def setup_layer(T, E, k, router_cls=SoftmaxRouter, d=16, f=24, seed=0, **router_kw):
    torch.manual_seed(seed)
    experts, router = Experts(E, d, f), router_cls(d, E, k, **router_kw)
    x = torch.randn(T, d, requires_grad=True)
    return x, router, experts


def run(impl, x, router, experts, grad):
    for p in (x, router.weight, *experts.parameters()):
        p.grad = None
    routing = router(x)
    if impl == "capacity":
        y, kept = capacity_dispatch(x, routing, experts, capacity_factor=1e6)  # so large that nothing drops
    else:
        y, kept = DROPLESS[impl](x, routing, experts)
    y.backward(grad)
    assert bool(kept.all())
    return [y.detach()] + [p.grad.clone() for p in (x, router.weight, *experts.parameters())]


CASES = {
    "typical": dict(T=10, E=4, k=2),
    "experts with no tokens": dict(T=3, E=16, k=2),
    "a single token": dict(T=1, E=4, k=1),
    "k = E": dict(T=7, E=4, k=4),
    "sigmoid, groups, scale": dict(T=12, E=8, k=3, router_cls=SigmoidRouter, n_group=4, topk_group=2,
                                   routed_scaling_factor=2.5),
    "rows grouped_mm cannot take (d_expert 10)": dict(T=9, E=4, k=2, f=10),
}


@pytest.mark.parametrize("impl", ["sorted", "grouped", "capacity"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_every_path_matches_the_loop_in_outputs_and_gradients(impl, case):
    x, router, experts = setup_layer(**CASES[case])
    grad = torch.randn(x.shape[0], x.shape[1])
    expected = run("loop", x, router, experts, grad)
    got = run(impl, x, router, experts, grad)
    names = ["output", "grad x", "grad router", "grad w_gate", "grad w_up", "grad w_down"]
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{impl}, {case}: {name}")


def test_no_token_reaches_an_unused_expert():
    x, router, experts = setup_layer(T=3, E=16, k=2)
    routing = router(x)
    loop_dispatch(x, routing, experts)[0].sum().backward()
    unused = sorted(set(range(16)) - set(routing.indices.flatten().tolist()))
    assert unused and all(experts.w_down.grad[e].abs().sum() == 0 for e in unused)


def test_this_torch_has_grouped_mm_on_cpu():
    assert grouped_mm_available()  # torch 2.13 has the CPU kernel; older versions fall back to the sorted loop


def test_capacity_follows_the_formula():
    assert expert_capacity(4096, 2, 8, 1.25) == 1280 and expert_capacity(5, 2, 4, 0.8) == 2
    assert expert_capacity(10, 1, 3, 1.0) == 4  # ceil(10/3)
    assert expert_capacity(2048, 2, 8, 1.25 + 0.25 + 2e-16) == 768   # a slider's 1.5000000000000002, not 769


def test_capacity_drops_first_choices_last_and_counts_match_a_hand_computation():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [1, 0]])  # five tokens, two choices each, E = 4
    # capacity 2. First choices in token order: t0→0 ✓, t1→0 ✓, t2→0 ✗, t3→0 ✗, t4→1 ✓;
    # then second choices: t0→1 ✓, t1→2 ✓, t2→1 ✗ (1 is full: t4, t0), t3→3 ✓, t4→0 ✗.
    expected = torch.tensor([[True, True], [True, True], [False, False], [False, True], [True, False]])
    assert torch.equal(capacity_mask(indices, 4, capacity=2), expected)


def test_capacity_dispatch_equals_the_loop_without_the_dropped_assignments():
    x, router, experts = setup_layer(T=40, E=4, k=2)
    with torch.no_grad():
        router.weight[0] *= 8  # skew the router so that expert 0 overflows
    routing = router(x)
    y, kept = capacity_dispatch(x, routing, experts, capacity_factor=1.0)
    assert 0 < 1 - kept.float().mean().item() < 1
    pruned = Routing(routing.weights * kept, routing.indices, routing.logits, routing.probs)
    torch.testing.assert_close(y, loop_dispatch(x, pruned, experts)[0], atol=1e-5, rtol=1e-4)
    per_expert = torch.bincount(routing.indices[kept], minlength=4)
    assert int(per_expert.max()) <= expert_capacity(40, 2, 4, 1.0)


def test_capacity_report_matches_the_mask():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [1, 0]])
    report = capacity_report(indices, 4, capacity_factor=0.8)
    assert report["capacity"] == 2 and report["dropped"] == pytest.approx(0.4)
    assert report["requested"].tolist() == [5, 3, 1, 1] and report["kept"].tolist() == [2, 2, 1, 1]


def test_skewed_routing_prefers_low_experts_only_when_skewed():
    flat = skewed_routing(4000, 8, 2, skew=0.0).flatten()
    assert torch.bincount(flat, minlength=8).float().std() / 1000 < 0.1  # uniform within noise
    skewed = torch.bincount(skewed_routing(4000, 8, 2, skew=3.0).flatten(), minlength=8)
    assert skewed[0] > 3 * skewed[7] and torch.equal(skewed_routing(50, 8, 2, 3.0), skewed_routing(50, 8, 2, 3.0))


def test_grouped_path_accepts_an_expanded_gradient():
    # torch._grouped_mm's backward rejects a gradient with zero strides (from y.sum().backward()); the combine
    # step's index_select hands it a contiguous one, so the layer trains with any loss.
    x, router, experts = setup_layer(T=9, E=4, k=2)
    y, _ = DROPLESS["grouped"](x, router(x), experts)
    y.sum().backward()
    assert x.grad is not None and experts.w_down.grad.abs().sum() > 0


def test_grouped_falls_back_where_the_kernel_cannot_take_the_tensors():
    assert grouped_mm_supported(torch.zeros(3, 16), Experts(4, 16, 24))
    assert not grouped_mm_supported(torch.zeros(3, 16), Experts(4, 16, 10))      # 40-byte rows
    assert not grouped_mm_supported(torch.zeros(3, 16, dtype=torch.float64), Experts(4, 16, 24).double())
