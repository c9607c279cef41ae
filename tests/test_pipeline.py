"""Pipeline schedules as data, and a pipelined step on real ranks equal to one process in loss and gradients."""
import pytest
import torch

from moelab import pipeline
from moelab.config import ModelConfig
from moelab.dist import launch
from moelab.model import Transformer
from moelab.pipeline import Action, bubble_fraction, gpipe, in_flight, one_f_one_b, schedule, split_layers
from moelab.presets import BALANCE


def test_every_stage_runs_each_forward_then_its_backward_once():
    for make in (gpipe, one_f_one_b):
        for p, m in ((1, 1), (2, 3), (4, 8), (4, 2), (3, 7)):
            for actions in make(p, m):
                assert sorted(a.mb for a in actions if a.kind == "F") == list(range(m))
                assert sorted(a.mb for a in actions if a.kind == "B") == list(range(m))
                assert all(actions.index(Action("F", i)) < actions.index(Action("B", i)) for i in range(m))


def test_1f1b_holds_p_minus_s_microbatches_and_gpipe_all_of_them():
    assert [in_flight(a) for a in one_f_one_b(4, 8)] == [4, 3, 2, 1]
    assert [in_flight(a) for a in gpipe(4, 8)] == [8, 8, 8, 8]
    assert [in_flight(a) for a in one_f_one_b(4, 2)] == [2, 2, 2, 1]        # fewer micro-batches than stages


def test_1f1b_order_on_the_first_stage_of_four():
    assert repr(one_f_one_b(4, 5)[0]) == "[F0, F1, F2, F3, B0, F4, B1, B2, B3, B4]"
    assert repr(one_f_one_b(4, 5)[3]) == "[F0, B0, F1, B1, F2, B2, F3, B3, F4, B4]"


def test_the_bubble_formula():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 8) == 0.0


def test_layers_split_as_evenly_as_possible():
    assert split_layers(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]


@pytest.mark.parametrize("call, message", [
    (lambda: split_layers(2, 4), "stages = 4 is not allowed for a model of n_layer = 2"),
    (lambda: schedule("dualpipe", 4, 8), "schedule = 'dualpipe' is not allowed; allowed: 'gpipe', '1f1b'"),
    (lambda: gpipe(4, 0), "microbatches = 0 is not allowed"),
    (lambda: one_f_one_b(0, 4), "stages = 0 is not allowed"),
])
def test_bad_input_names_the_field(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def small_lm() -> ModelConfig:
    return ModelConfig(vocab_size=50, block_size=16, n_layer=4, n_head=4, n_kv_head=2, d_model=32,
                       n_routed_experts=4, top_k=2, d_expert=32, **BALANCE)


def one_process(config: ModelConfig, microbatches: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(config)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(config.vocab_size, (batch, config.block_size), generator=g)
    targets = torch.randint(config.vocab_size, (batch, config.block_size), generator=g)
    losses = []
    for rows in torch.arange(batch).chunk(microbatches):
        _, loss = model(idx[rows], targets[rows])
        ((loss + model.aux_loss) / microbatches).backward()
        losses.append(loss.item())
    return sum(losses) / microbatches, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name", pipeline.SCHEDULES)
def test_a_pipelined_step_equals_one_process(name):
    config, m, batch = small_lm(), 4, 8
    results = launch(pipeline.step_rank, 4, args=(config, name, m, batch), timeout=120)
    loss, grads = one_process(config, m, batch)
    assert results[-1]["loss"] == pytest.approx(loss, rel=1e-5)
    got = {n: g for r in results for n, g in r["grads"].items()}
    assert set(got) == set(grads)
    for n, g in grads.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert [r["held"] for r in results] == [in_flight(a) for a in schedule(name, 4, m)]


@pytest.mark.slow
def test_a_bad_schedule_fails_on_its_rank_without_a_hang():
    config = small_lm()
    with pytest.raises(Exception, match="not allowed for a batch of 8"):
        launch(pipeline.step_rank, 2, args=(config, "1f1b", 3, 8), timeout=60)


def test_measured_bubbles_of_an_ideal_1f1b_timeline_equal_the_formula():
    """Stages whose F and B take 1 and 2 time units, actions started as soon as their inputs exist: the idle
    share of every rank is (p − 1) / (m + p − 1)."""
    p, m, F, B = 4, 8, 1.0, 2.0
    plan = one_f_one_b(p, m)
    done: dict[tuple[int, str], float] = {}
    free = [0.0] * p
    timeline = [[] for _ in range(p)]
    position = [0] * p
    while any(position[s] < len(plan[s]) for s in range(p)):
        for s in range(p):
            if position[s] == len(plan[s]):
                continue
            a = plan[s][position[s]]
            needs = None                                  # the neighbour's action this one waits for
            if a.kind == "F" and s > 0:
                needs = (s - 1, f"F{a.mb}")
            elif a.kind == "B" and s < p - 1:
                needs = (s + 1, f"B{a.mb}")
            if needs is not None and needs not in done:
                continue
            start = max(free[s], done.get(needs, 0.0))
            end = start + (F if a.kind == "F" else B)
            timeline[s].append((repr(a), start, end))
            done[(s, repr(a))] = free[s] = end
            position[s] += 1
    assert pipeline.measured_bubbles(timeline) == pytest.approx([bubble_fraction(p, m)] * p)
