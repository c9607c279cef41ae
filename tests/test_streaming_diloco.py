"""Streaming DiLoCo: DiLoCo itself with one fragment and no delay; staggered fragments at 1/F of the peak bytes."""
import pytest
import torch

from moelab.collectives import ring_all_reduce
from moelab.config import ModelConfig
from moelab.diloco import outer_step
from moelab.dist import launch
from moelab.model import Transformer
from moelab.network import SLOW, Network, Topology
from moelab.rounds import in_flight
from moelab.streaming_diloco import StreamingDiLoCo, fragments

CONFIG = ModelConfig(vocab_size=50, block_size=16, n_layer=4, n_head=4, n_kv_head=2, d_model=32, d_ff=64)


def train(rank: int, outer, model, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        idx = torch.randint(50, (4, 16), generator=torch.Generator().manual_seed(100 * rank + step))
        opt.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
        outer(step)


def diloco_rank(rank: int, world: int, F: int, delay: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    if F == 0:                                            # DiLoCo as chapter 10 runs it
        global_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        opt = torch.optim.SGD(global_params, lr=0.7, momentum=0.9, nesterov=True)

        def outer(step):
            if (step + 1) % 4 == 0:
                outer_step(global_params, list(model.parameters()), opt, lambda t: ring_all_reduce(t))
        train(rank, outer, model, 12)
        return {"local": [p.detach() for p in model.parameters()], "global": global_params}
    net = Network(Topology(world, 1), virtual=True)
    streaming = StreamingDiLoCo(model, F, 4, delay=delay, outer_lr=0.7, outer_momentum=0.9, net=net)
    train(rank, streaming.step, model, 12)
    return {"local": [p.detach() for p in model.parameters()], "syncs": streaming.syncs,
            "global": [g for part in streaming.global_params for g in part], "sizes": [
                sum(p.numel() for p in part) for part in streaming.fragments]}


@pytest.mark.slow
def test_one_fragment_without_delay_is_diloco_value_for_value():
    diloco = launch(diloco_rank, 2, args=(0, 0), timeout=120)
    streaming = launch(diloco_rank, 2, args=(1, 0), timeout=120)
    for d, s in zip(diloco, streaming):
        for a, b in zip(d["local"] + d["global"], s["local"] + s["global"]):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_fragments_sync_staggered_in_flight_at_a_fraction_of_the_bytes():
    one = launch(diloco_rank, 2, args=(1, 0), timeout=120)[0]
    two = launch(diloco_rank, 2, args=(2, 1), timeout=120)
    syncs = two[0]["syncs"]
    assert [(p, started, landed) for p, started, landed, _ in syncs] == [
        (0, 0, 1), (1, 2, 3), (0, 4, 5), (1, 6, 7), (0, 8, 9), (1, 10, 11)]
    peak, diloco_peak = max(b for *_, b in syncs), max(b for *_, b in one["syncs"])
    sizes = two[0]["sizes"]
    assert peak / diloco_peak == pytest.approx(max(sizes) / sum(sizes), rel=1e-3)
    assert sum(b for *_, b in syncs[:4]) == pytest.approx(sum(b for *_, b in one["syncs"][:2]), rel=1e-3)
    for a, b in zip(two[0]["global"], two[1]["global"]):   # the global copies agree across ranks
        assert torch.equal(a, b)


def in_flight_rank(rank: int, world: int, compute: float) -> tuple[float, float]:
    net = Network(Topology(2, 1), inter=SLOW, virtual=True, cpu_time=True)
    net.reset()
    pending = in_flight(lambda n: ring_all_reduce(torch.ones(250_000), n), net)
    after_launch = net.now()
    net.offset += compute                                 # computing meanwhile
    total = pending.wait()
    assert torch.equal(total, torch.full((250_000,), 2.0))
    return after_launch, net.now()


@pytest.mark.slow
def test_a_collective_in_flight_costs_only_what_is_left_of_it():
    transfer = 2 * SLOW.time(500_000)                   # a ring of 2: reduce-scatter and all-gather, half each
    for compute in (0.05, 0.5):
        after_launch, end = launch(in_flight_rank, 2, args=(compute,), timeout=60)[0]
        assert after_launch < 0.005                     # the rank went straight on
        assert end == pytest.approx(max(compute, transfer), abs=0.005)


def test_fragments_are_strided_blocks_with_the_embedding_first_and_the_head_last():
    model = Transformer(CONFIG)
    parts = fragments(model, 2)
    names = {id(p): n for n, p in model.named_parameters()}
    first = {names[id(p)].split(".")[0] + ("." + names[id(p)].split(".")[1] if "layers" in names[id(p)] else "")
             for p in parts[0]}
    assert first == {"tok_embeddings", "layers.0", "layers.2"}
    assert {names[id(p)] for p in parts[1]} >= {"norm.weight", "output.weight"}
    assert sum(len(p) for p in parts) == len(list(model.parameters()))


@pytest.mark.parametrize("kwargs, message", [
    ({"F": 3, "H": 6}, "fragments = 3 is not allowed for a model of 4 blocks; allowed: a divisor of 4"),
    ({"F": 2, "H": 5}, "H = 5 is not allowed with 2 fragments; allowed: a multiple of 2"),
    ({"F": 2, "H": 4, "delay": 2}, "delay = 2 is not allowed; allowed: an integer from 0 to 1"),
    ({"F": 2, "H": 4, "alpha": 1.5}, "alpha = 1.5 is not allowed; allowed: 0 <= alpha <= 1"),
])
def test_bad_input_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamingDiLoCo(Transformer(CONFIG), **kwargs)
