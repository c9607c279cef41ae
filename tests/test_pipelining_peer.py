"""Torch's pipelining (ScheduleGPipe, Schedule1F1B) on our stages equals one process and moelab.pipeline."""
import dataclasses

import pytest
import torch
from test_pipeline import one_process, small_lm

from moelab import pipeline
from moelab.dist import launch
from moelab.experiments.pipelining_peer import SCHEDULES, torch_pipeline_rank


def moe_without_balancing_losses():
    """The small MoE of test_pipeline with its sequence-wise loss off: torch's schedule backpropagates only the
    last stage's loss. The experts still route, and the aux-loss-free bias still counts loads."""
    return dataclasses.replace(small_lm(), seq_aux_coef=0.0)


def gathered(results):
    return {n: g for r in results for n, g in r["grads"].items()}


def assert_same_step(results, loss, grads):
    assert results[-1]["loss"] == pytest.approx(loss, rel=1e-5)
    assert [r["loss"] for r in results[:-1]] == [0.0] * (len(results) - 1)
    got = gathered(results)
    assert set(got) == set(grads)
    for n, g in grads.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [8, 4])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_torch_pipelining_equals_one_process(name, microbatches):
    config, batch = moe_without_balancing_losses(), 8
    results = launch(torch_pipeline_rank, 4, args=(config, name, microbatches, batch), timeout=60)
    assert_same_step(results, *one_process(config, microbatches, batch))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_torch_pipelining_equals_our_pipeline(name):
    config, microbatches, batch = moe_without_balancing_losses(), 8, 8
    ours = launch(pipeline.step_rank, 4, args=(config, name, microbatches, batch), timeout=60)
    theirs = launch(torch_pipeline_rank, 4, args=(config, name, microbatches, batch), timeout=60)
    assert_same_step(theirs, ours[-1]["loss"], gathered(ours))


def test_a_config_with_balancing_losses_is_refused_before_any_rank_waits():
    with pytest.raises(ValueError, match="ModelConfig.seq_aux_coef = 0.0001 is not allowed"):
        torch_pipeline_rank(0, 4, small_lm(), "gpipe", 8, 8)
