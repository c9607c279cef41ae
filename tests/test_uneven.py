"""A batch split by speed, gradients weighted by share: one process's gradient; and a slow rank's clock."""
import time

import pytest
import torch

from moelab.config import ModelConfig
from moelab.dist import launch
from moelab.model import Transformer
from moelab.network import Network, Topology
from moelab.uneven import split_by_speed, weighted_average_gradients

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
