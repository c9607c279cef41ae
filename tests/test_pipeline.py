"""Pipeline schedules as data, and a pipelined step on real ranks equal to one process in loss and gradients."""
import time

import pytest
import torch

from moelab import pipeline
from moelab.config import ModelConfig
from moelab.dist import RankError, launch
from moelab.experiments.dualpipe_peer import dualpipe_order
from moelab.model import Transformer
from moelab.pipeline import split_layers
from moelab.presets import BALANCE
from moelab.schedules import (
    SCHEDULES,
    Action,
    bubble_fraction,
    dualpipe,
    dualpipe_bubble,
    durations,
    gpipe,
    in_flight,
    measured_bubbles,
    one_f_one_b,
    replay,
    schedule,
)


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
    (lambda: schedule("zb-v", 4, 8), "schedule = 'zb-v' is not allowed; allowed: 'gpipe', '1f1b', 'dualpipe'"),
    (lambda: schedule("dualpipe", 3, 8), "stages = 3 is not allowed for DualPipe; allowed: an even number"),
    (lambda: schedule("dualpipe", 4, 6), "microbatches = 6 is not allowed for DualPipe with 4 stages; allowed: an "
                                         "even number >= 2 · stages = 8"),
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
@pytest.mark.parametrize("name", SCHEDULES)
def test_a_pipelined_step_equals_one_process(name):
    config, m, batch = small_lm(), 8, 8
    results = launch(pipeline.step_rank, 4, args=(config, name, m, batch), timeout=120)
    loss, grads = one_process(config, m, batch)
    assert sum(r["loss"] for r in results) == pytest.approx(loss, rel=1e-5)
    got: dict[str, torch.Tensor] = {}
    for r in results:                                     # DualPipe: each parameter's two copies add up
        for n, g in r["grads"].items():
            got[n] = got[n] + g if n in got else g
    assert set(got) == set(grads)
    for n, g in grads.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert [r["held"] for r in results] == [in_flight(a) for a in schedule(name, 4, m)]


@pytest.mark.slow
def test_a_bad_schedule_fails_on_its_rank_without_a_hang():
    config = small_lm()
    with pytest.raises(Exception, match="not allowed for a batch of 8"):
        launch(pipeline.step_rank, 2, args=(config, "1f1b", 3, 8), timeout=60)


def test_an_ideal_1f1b_timeline_idles_as_the_formula_says():
    """F and B take 1 and 2 time units, actions start as soon as their inputs exist: the idle share of every rank
    is (p − 1) / (m + p − 1)."""
    for p, m in ((4, 8), (2, 5), (8, 8)):
        timeline = replay(one_f_one_b(p, m), durations(1.0, 2.0))
        assert measured_bubbles(timeline) == pytest.approx([bubble_fraction(p, m)] * p)


def test_an_ideal_dualpipe_timeline_idles_as_the_report_says_when_b_is_2f_and_w_is_f():
    """The report's (p/2 − 1)(F&B + B − 3W) is exact on every rank when B = 2F and W = F (F&B = F + B)."""
    for p, m in ((4, 8), (4, 16), (8, 16), (8, 20)):
        for F in (1.0, 2.0):
            timeline = replay(dualpipe(p, m), durations(F, 2 * F, F))
            step = max(end for rank in timeline for _, _, end in rank)
            idle = [step - sum(end - start for _, start, end in rank) for rank in timeline]
            assert idle == pytest.approx([dualpipe_bubble(p, F, 2 * F, F)] * p)
            assert dualpipe_bubble(p, F, 2 * F, F) < (p - 1) * (F + 2 * F)      # less than 1F1B's


def test_a_schedule_that_deadlocks_is_refused():
    plan = one_f_one_b(2, 2)
    plan[1] = [Action("B", 0), Action("F", 0)]
    with pytest.raises(ValueError, match="the schedule deadlocks"):
        replay(plan, durations(1.0, 2.0))


def test_dualpipe_holds_p_plus_1_microbatches_as_the_report_says():
    assert [in_flight(a) for a in dualpipe(4, 8)] == [5, 5, 5, 5]
    assert [in_flight(a) for a in dualpipe(8, 16)] == [9] * 8


def test_our_dualpipe_is_deepseeks_order():
    """The order of F, B and W chunks on every rank, as dualpipe 1.0.0's own step runs it."""
    for p, m in ((2, 4), (4, 8), (4, 10), (6, 12), (8, 16), (8, 20)):
        assert [[repr(a) for a in rank] for rank in dualpipe(p, m)] == dualpipe_order(p, m)


def failing_rank(rank: int, world: int, config: ModelConfig) -> None:
    """DualPipe on 4 ranks, rank 2 failing at its fourth action: the others are left waiting for its messages."""
    torch.manual_seed(0)
    model = Transformer(config)
    stages = pipeline.stages_for(model, "dualpipe", rank, world)
    plan = schedule("dualpipe", world, 8)[rank]
    if rank == 2:
        plan = plan[:3] + [Action("X", 0, 0)]                     # an action it cannot run
    idx = torch.randint(config.vocab_size, (8, config.block_size))
    pipeline.run_schedule(stages, plan, idx, idx, 8)


@pytest.mark.slow
def test_a_rank_that_fails_mid_schedule_ends_the_run_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 2 failed") as failure:
        launch(failing_rank, 4, args=(small_lm(),), timeout=60)
    assert "action X0.0 is not allowed" in str(failure.value)
    assert time.monotonic() - start < 30                        # the others stopped at once, not at the timeout
