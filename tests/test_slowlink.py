"""Slow-link data parallelism: the INT8 all-reduce, error feedback and DiLoCo's outer step."""
import pytest
import torch
import torch.distributed as dist

from moelab.dist import launch
from moelab.network import Link, Network, Topology
from moelab.slowlink import ErrorFeedback, int8_all_reduce, outer_step, pseudo_gradients


def int8_rank(rank, p, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(rank)) * (rank + 1)
    exact = x.clone()
    dist.all_reduce(exact)
    instant = Link("link", 0.0, 1e15)
    net = Network(Topology(1, p), instant, instant)
    got = int8_all_reduce(x, net)
    abs_sum = x.abs()
    dist.all_reduce(abs_sum)
    return got, exact, float(abs_sum.max()), net.sent_bytes.get("link", 0)


@pytest.mark.parametrize("p, n", [(2, 1024), (3, 3 * 256 + 7), (4, 4 * 512)])
def test_int8_all_reduce_is_the_sum_within_its_quantisation_bound_on_every_rank_alike(p, n):
    results = launch(int8_rank, p, args=(n,), backend="gloo", timeout=60)
    for got, exact, abs_max, sent in results:
        assert torch.equal(got, results[0][0])                               # the same numbers everywhere
        assert (got - exact).abs().max() <= p * abs_max / 127               # half a step per hop, p hops
        assert (got - exact).abs().max() > 0                                 # and it did quantise
    if n % (p * 128) == 0:                                                   # whole tiles: the exact ratio
        sent = results[0][3]
        fp32_ring = 2 * (p - 1) * n // p * 4
        assert sent / fp32_ring == pytest.approx((128 + 4) / 512) and sent / fp32_ring <= 0.26


def test_error_feedback_delays_what_rounding_drops_but_loses_nothing():
    ef, g = ErrorFeedback(), torch.Generator().manual_seed(0)
    grads = [torch.randn(300, generator=g) for _ in range(5)]
    sent = [ef.compress(0, grad) for grad in grads]
    torch.testing.assert_close(sum(sent) + ef.residual[0], sum(grads), rtol=0, atol=1e-5)
    assert all(not torch.equal(s, grad) for s, grad in zip(sent, grads))


def test_the_pseudo_gradient_points_so_that_an_sgd_step_moves_towards_the_workers():
    theta, local = torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([0.7, -1.0])
    (delta,) = pseudo_gradients([theta], [local])
    assert torch.equal(delta, torch.tensor([0.3, -1.0]))
    opt = torch.optim.SGD([theta], lr=1.0)
    theta.grad = delta
    opt.step()
    assert torch.allclose(theta.detach(), local)


def diloco_rank(rank, world_size, steps, lr):
    """DiLoCo with H = 1, inner SGD, outer SGD lr 1 without momentum, against one process doing data-parallel SGD
    on both ranks' batches."""
    torch.manual_seed(0)
    local, reference = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    reference.load_state_dict(local.state_dict())
    global_params = [p.detach().clone().requires_grad_() for p in local.parameters()]
    inner = torch.optim.SGD(local.parameters(), lr=lr)
    outer = torch.optim.SGD(global_params, lr=1.0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        xs, ys = torch.randn(world_size, 8, 4, generator=g), torch.randn(world_size, 8, 3, generator=g)
        inner.zero_grad()
        torch.nn.functional.mse_loss(local(xs[rank]), ys[rank]).backward()
        inner.step()
        outer_step(global_params, list(local.parameters()), outer)
        ref_opt.zero_grad()
        sum(torch.nn.functional.mse_loss(reference(x), y) for x, y in zip(xs, ys)).div(world_size).backward()
        ref_opt.step()
    return [p.detach() for p in local.parameters()], [p.detach() for p in reference.parameters()]


def test_diloco_with_one_inner_sgd_step_and_a_plain_outer_step_is_data_parallel_sgd():
    for got, expected in launch(diloco_rank, 2, args=(4, 0.1), backend="gloo", timeout=60):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
