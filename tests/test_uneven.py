"""A batch split by speed, gradients weighted by share: one process's gradient; and a slow rank's clock."""
import time

import pytest
import torch

from moelab.config import ModelConfig
from moelab.dist import launch
from moelab.model import Transformer
from moelab.network import Network, Topology
from moelab.uneven import slowdowns, split_by_speed, straggler_slowdown, weighted_average_gradients

CONFIG = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64)
SPEEDS = [1.0, 2.0, 3.0]


def whole_batch() -> torch.Tensor:
    return torch.randint(50, (12, 16), generator=torch.Generator().manual_seed(3))


def uneven_rank(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    shares = split_by_speed(12, SPEEDS)
    start = sum(shares[:rank])
    idx = whole_batch()[start:start + shares[rank]]
    model(idx, idx)[1].backward()                        # this rank's mean loss
    total = weighted_average_gradients(model.parameters(), shares[rank])
    return {"total": total, "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.slow
def test_a_speed_aware_step_is_one_process_on_the_whole_batch():
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    idx = whole_batch()
    model(idx, idx)[1].backward()
    for r in launch(uneven_rank, 3, timeout=60):
        assert r["total"] == 12
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_split_by_speed():
    assert split_by_speed(12, SPEEDS) == [2, 4, 6]
    assert split_by_speed(16, [1, 1, 1, 0.5]) == [5, 5, 4, 2]
    assert split_by_speed(4, [1, 100, 1, 1]) == [1, 1, 1, 1]             # one each at least
    assert sum(split_by_speed(101, [0.3, 0.7, 1.1])) == 101


@pytest.mark.parametrize("call, message", [
    (lambda: split_by_speed(8, [1, 0]), r"speeds = \[1, 0\] is not allowed; allowed: one number > 0 per rank"),
    (lambda: split_by_speed(8, [1, -2.0]), "speeds = .* is not allowed"),
    (lambda: split_by_speed(2, [1, 1, 1]), "total = 2 is not allowed; allowed: an integer >= 3"),
    (lambda: Network(Topology(1, 1), virtual=True, speed=0), "speed = 0 is not allowed; allowed: a number > 0"),
    (lambda: Network(Topology(1, 1), speed=0.5), "speed != 1 is not allowed with virtual = False"),
])
def test_bad_input_names_the_field(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_slow_rank_counts_its_computation_longer():
    for speed in (0.5, 1.0, 2.0):
        net = Network(Topology(1, 1), virtual=True, speed=speed)
        start = net.now()
        time.sleep(0.1)                                  # on the wall clock, sleeping is computing
        assert net.now() - start == pytest.approx(0.1 / speed, rel=0.2)


def test_slowdowns_are_seeded_and_as_frequent_as_asked():
    speeds = slowdowns(2000, 4, probability=0.1, factor=4.0, seed=0)
    assert speeds == slowdowns(2000, 4, probability=0.1, factor=4.0, seed=0)
    slow = sum(s == 0.25 for row in speeds for s in row)
    assert {s for row in speeds for s in row} == {1.0, 0.25}
    assert abs(slow / 8000 - 0.1) < 0.01


def test_a_synchronous_step_is_slow_when_any_rank_is():
    assert straggler_slowdown(0.1, 4.0, 1) == pytest.approx(1.3)
    assert straggler_slowdown(0.1, 4.0, 4) == pytest.approx(1 + 3 * (1 - 0.9 ** 4))
    slow = torch.rand(100_000, 8, generator=torch.Generator().manual_seed(0)) < 0.1      # by sampling
    assert torch.where(slow, 4.0, 1.0).max(-1).values.mean().item() == pytest.approx(
        straggler_slowdown(0.1, 4.0, 8), rel=0.01)


def test_set_speed_scales_what_follows_and_the_clock_does_not_jump():
    net = Network(Topology(1, 1), virtual=True, cpu_time=True)
    net.reset()
    before = net.now()
    net.set_speed(0.25)
    assert abs(net.now() - before) < 1e-3
    start, cpu = net.now(), time.thread_time()
    sum(i * i for i in range(300_000))                  # a little computation
    assert net.now() - start == pytest.approx(4 * (time.thread_time() - cpu), rel=0.05)


@pytest.mark.parametrize("call, message", [
    (lambda: slowdowns(10, 4, probability=1.5, factor=2.0), "probability = 1.5 is not allowed"),
    (lambda: slowdowns(10, 4, probability=0.1, factor=0.5), "factor = 0.5 is not allowed; allowed: a number >= 1"),
    (lambda: Network(Topology(1, 1), virtual=True).set_speed(-1), "speed = -1 is not allowed"),
    (lambda: Network(Topology(1, 1)).set_speed(0.5), "virtual = False is not allowed"),
])
def test_bad_straggler_input_names_the_field(call, message):
    with pytest.raises(ValueError, match=message):
        call()
