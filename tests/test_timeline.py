"""Timelines record phases in order, with their bytes, and time backward passes through identity markers."""
import time

import pytest
import torch

from moelab.dist import launch
from moelab.timeline import Event, Timeline, backward_phase, collective, phase, start_together


def test_phases_are_recorded_in_order_with_their_counts_and_totals():
    tl = Timeline()
    with tl.phase("dispatch") as e:
        e.sent += 100
        with tl.collective(e):
            time.sleep(0.01)
    with tl.phase("expert") as e:
        e.rows = 7
    with tl.phase("dispatch") as e:
        e.sent += 20
    assert [e.phase for e in tl.events] == ["dispatch", "expert", "dispatch"]
    first, second, third = tl.events
    assert 0 <= first.start <= first.end <= second.start <= second.end <= third.start
    assert first.comm >= 0.009 and first.comm <= first.seconds and second.comm == 0
    totals = tl.totals()
    assert list(totals) == ["dispatch", "expert"]
    assert totals["dispatch"]["sent"] == 120 and totals["expert"]["rows"] == 7
    assert abs(totals["dispatch"]["seconds"] - first.seconds - third.seconds) < 1e-12
    assert tl.to_list()[1] == {"phase": "expert", "start": second.start, "end": second.end, "sent": 0,
                               "received": 0, "local": 0, "rows": 7, "comm": 0.0}
    tl.restart()
    assert tl.events == []


def test_without_a_timeline_the_body_runs_and_nothing_is_recorded():
    with phase(None, "dispatch") as e, collective(None, e):
        e.sent += 5
    assert isinstance(e, Event) and e.sent == 5


def test_backward_phase_times_the_backward_pass_between_its_markers():
    tl = Timeline()
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)

    def slow_matmul(rows):
        return rows @ w

    y = backward_phase(tl, Event("expert backward", rows=4), x, slow_matmul)
    torch.testing.assert_close(y, x @ w)
    assert tl.events == []                                   # nothing until backward runs
    before = time.perf_counter() - tl.t0
    y.sum().backward()
    (event,) = tl.events
    assert event.phase == "expert backward" and event.rows == 4 and before <= event.start <= event.end
    torch.testing.assert_close(x.grad, torch.ones(4, 3) @ w.T)
    with torch.no_grad():                                    # no graph: just the function
        backward_phase(tl, Event("expert backward"), x, slow_matmul)
    assert len(tl.events) == 1


def together_rank(rank, world_size):
    tl = Timeline()
    start_together(tl)
    with tl.phase("work"):
        pass
    return tl.t0, tl.events[0].start, tl.now()


@pytest.mark.slow
def test_start_together_gives_every_rank_on_one_machine_the_same_time_zero():
    results = launch(together_rank, 3, backend="gloo", timeout=60)
    assert len({t0 for t0, _, _ in results}) == 1
    assert all(0 <= start <= now for _, start, now in results)
