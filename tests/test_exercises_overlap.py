"""The checks of notebook 07's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import pytest
import torch
import torch.distributed as dist
from solutions import load

from moelab import exercises, schedules
from moelab.exercises import ranks

NS = load("07_overlap_and_pipelines.ipynb")
DUALPIPE_HALF_W = "on input 3 of 14 (dualpipe on 4 stages, 8 micro-batches, F=1, B=2, W=0.5)"


def test_the_published_solutions_pass():
    assert exercises.check_step_time(NS["step_time"])
    assert exercises.check_bucket_plan(NS["bucket_plan"])


def test_the_prediction_of_exercise_1_is_what_the_library_replays():
    def idle(W):
        timeline = schedules.replay(schedules.dualpipe(4, 8), schedules.durations(1.0, 2.0, W))
        return max(end for rank in timeline for *_, end in rank) - 8 * (1.0 + 2.0)

    assert (idle(0.5), idle(1.5)) == (3.0, 2.0)
    assert (schedules.dualpipe_bubble(4, 1.0, 2.0, 0.5), schedules.dualpipe_bubble(4, 1.0, 2.0, 1.5)) == (3.5, 0.5)
    assert NS["bucket_plan"]([400_000] * 6, 1_000_000) == [[5, 4], [3, 2], [1, 0]]
    assert NS["bucket_plan"]([500_000] * 6, 1_000_000) == [[5, 4], [3, 2], [1, 0]]


def durations(F, B, W, deferred_b):
    """Each action's length, a B with defer_w lasting ``deferred_b``."""
    return lambda a: F if a.kind == "F" else W if a.kind == "W" else deferred_b if a.defer_w else B


def replayed(plan, seconds):
    return max(end for rank in schedules.replay(plan, lambda r, a: seconds(a)) for *_, end in rank)


def test_adding_up_one_ranks_work_fails_with_a_hint():
    def busiest(plan, F, B, W):
        return max(sum(map(durations(F, B, W, B - W), rank)) for rank in plan)

    assert repr(exercises.check_step_time(busiest)) == (
        "✗ check_step_time: on input 1 of 14 (gpipe on 4 stages, 8 micro-batches, F=1, B=2, W=1) the result is 24, "
        "expected 33. Hint: a rank also waits for its input: the previous stage's forward, the next stage's "
        "backward; place the actions on a timeline rather than adding up one rank's work.")


def test_a_deferred_backward_as_long_as_a_full_one_fails_with_a_hint():
    def full_b(plan, F, B, W):
        return replayed(plan, durations(F, B, W, deferred_b=B))

    verdict = exercises.check_step_time(full_b)
    assert repr(verdict).startswith(f"✗ check_step_time: {DUALPIPE_HALF_W} the result is 28.5, expected 27.")
    assert repr(verdict).endswith("Hint: a B with defer_w computes only its input's gradient: it lasts B − W, and "
                                  "the W that comes later does the rest.")


def test_formulas_in_place_of_the_timeline_fail_with_hints():
    def one_f_one_b(plan, F, B, W):
        m = sum(a.kind == "F" for a in plan[0])
        return (len(plan) - 1 + m) * (F + B)

    def report(plan, F, B, W):
        m, p = sum(a.kind == "F" for a in plan[0]), len(plan)
        if plan[0][0].chunk is None:
            return (p - 1 + m) * (F + B)
        return m * (F + B) + (p // 2 - 1) * (F + 2 * B - 3 * W)

    verdict = exercises.check_step_time(one_f_one_b)
    assert repr(verdict).startswith(f"✗ check_step_time: {DUALPIPE_HALF_W} the result is 33, expected 27.")
    assert "Hint: (p − 1)(F + B) + m(F + B) is the step of GPipe and 1F1B" in repr(verdict)
    verdict = exercises.check_step_time(report)
    assert repr(verdict).startswith(f"✗ check_step_time: {DUALPIPE_HALF_W} the result is 27.5, expected 27.")
    assert "Hint: the report's (p/2 − 1)(F&B + B − 3W) holds for W = F and B = 2F (section 4)" in repr(verdict)


def test_the_idle_time_for_the_step_fails_with_a_hint():
    def idle(plan, F, B, W):
        return NS["step_time"](plan, F, B, W) - sum(a.kind == "F" for a in plan[0]) * (F + B)

    assert "the result is 9, expected 33. Hint: this is the idle time" in repr(exercises.check_step_time(idle))


def fill(order, sizes, cap, full):
    buckets, current = [], []
    for i in order:
        if current and full(sum(sizes[j] for j in current) + sizes[i], cap):
            buckets.append(current)
            current = []
        current.append(i)
    return buckets + [current]


def test_buckets_in_forward_order_or_closed_at_the_cap_fail_with_hints():
    forward = exercises.check_bucket_plan(lambda sizes, cap: fill(range(len(sizes)), sizes, cap, int.__gt__))
    assert repr(forward) == (
        "✗ check_bucket_plan: on input 1 of 12 (sizes=[400000, 400000, 400000, 400000, 400000, 400000], "
        "cap=1000000) the result[0][0] is 0, expected 5. Hint: backward produces the last parameters' gradients "
        "first: fill the buckets from the last parameter to the first.")
    at_cap = exercises.check_bucket_plan(lambda sizes, cap: fill(reversed(range(len(sizes))), sizes, cap, int.__ge__))
    assert repr(at_cap).startswith("✗ check_bucket_plan: on input 2 of 12 (sizes=[500000, 500000, 500000, 500000, "
                                   "500000, 500000], cap=1000000) the result should be a list of 3 items, got 6. "
                                   "Hint: a bucket may hold exactly cap bytes")


def test_buckets_sorted_or_an_empty_bucket_fail_with_hints():
    sorted_ = exercises.check_bucket_plan(lambda sizes, cap: [sorted(b) for b in NS["bucket_plan"](sizes, cap)])
    assert "the result[0][0] is 4, expected 5. Hint: within a bucket, too," in repr(sorted_)

    def empty_first(sizes, cap):
        buckets, current = [], []
        for i in reversed(range(len(sizes))):
            if sum(sizes[j] for j in current) + sizes[i] > cap:
                buckets.append(current)
                current = []
            current.append(i)
        return buckets + [current]

    assert repr(exercises.check_bucket_plan(empty_first)) == (
        "✗ check_bucket_plan: on input 4 of 12 (sizes=[12], cap=4) the result should be a list of 1 items, got 2. "
        "Hint: a parameter larger than the cap closes the current bucket only when it holds something: no bucket "
        "is empty.")


def test_the_bucket_check_leaves_no_process_group_and_the_checks_keep_the_random_state():
    state = torch.get_rng_state()
    assert exercises.check_bucket_plan(NS["bucket_plan"])
    assert not dist.is_initialized()
    assert torch.equal(torch.get_rng_state(), state)


def test_unfilled_stubs_raise_not_implemented():
    def step_time(plan, F, B, W):
        raise NotImplementedError("exercise 07.1: write step_time")

    def bucket_plan(sizes, cap):
        raise NotImplementedError("exercise 07.3: write bucket_plan")

    with pytest.raises(NotImplementedError, match="exercise 07.1"):
        exercises.check_step_time(step_time)
    with pytest.raises(NotImplementedError, match="exercise 07.3"):
        exercises.check_bucket_plan(bucket_plan)
    assert not dist.is_initialized()


def pipeline_step(divide_first=True, divide_last=True, aux_first=True, aux_last=True, loss_divided=True,
                  send="grad", blocking=False, raise_at=None):
    """A learner's 1F1B of two stages, with one of the known mistakes switched on."""
    def one_f_one_b_two_stages(stage, idx, targets, m):
        rank, rows = dist.get_rank(), idx.shape[0] // m
        if raise_at == m and rank == 1:
            raise ValueError("no such micro-batch")

        def send_to(tensor, peer, tag):
            if blocking:
                dist.send(tensor, peer, tag=tag)
            else:
                sends.append((dist.isend(tensor, peer, tag=tag), tensor))

        saved, sends, loss = {}, [], 0.0
        for a in schedules.one_f_one_b(2, m)[rank]:
            batch = slice(a.mb * rows, (a.mb + 1) * rows)
            if a.kind == "F":
                if stage.first:
                    x_in = None
                    out, aux = stage(idx[batch])
                    send_to(out.detach(), 1, a.mb)
                else:
                    x_in = torch.empty(rows, idx.shape[1], stage.width)
                    dist.recv(x_in, 0, tag=a.mb)
                    x_in.requires_grad_()
                    out, aux = stage(x_in, targets[batch])
                    loss += out.item() / (m if loss_divided else 1)
                saved[a.mb] = (x_in, out, aux)
            else:
                x_in, out, aux = saved.pop(a.mb)
                if stage.last:
                    total = out + aux if aux_last else out
                    (total / m if divide_last else total).backward()
                    send_to(x_in.grad if send == "grad" else x_in.detach(), 0, m + a.mb)
                else:
                    grad = torch.empty_like(out)
                    dist.recv(grad, 1, tag=m + a.mb)
                    tensors, grads = [out], [grad]
                    if aux_first:
                        tensors, grads = [out, aux / m if divide_first else aux], [grad, None]
                    torch.autograd.backward(tensors, grads)
        for work, _ in sends:
            work.wait()
        return loss
    return one_f_one_b_two_stages


@pytest.mark.slow
def test_the_published_rank_code_passes():
    assert exercises.check_one_f_one_b_two_stages(NS["one_f_one_b_two_stages"])
    assert exercises.check_one_f_one_b_two_stages(pipeline_step())


NO_M = ("Hint: divide each micro-batch's loss by m before its backward, on both stages (and the balancing loss "
        "with it), and return the sum of the micro-batch losses over m: one process's mean.")


@pytest.mark.slow
def test_rank_code_without_dividing_by_m_fails_naming_the_input_and_the_rank():
    verdict = repr(exercises.check_one_f_one_b_two_stages(pipeline_step(divide_first=False, divide_last=False)))
    assert verdict.startswith("✗ check_one_f_one_b_two_stages: on input 2 of 4 (2 ranks, m=2 micro-batches of 2 "
                              "sequences) rank 0: the result['grads']['layers.0.attn_norm.weight'][0] is ")
    assert verdict.endswith(NO_M)
    verdict = repr(exercises.check_one_f_one_b_two_stages(pipeline_step(loss_divided=False)))
    assert verdict.startswith("✗ check_one_f_one_b_two_stages: on input 2 of 4 (2 ranks, m=2 micro-batches of 2 "
                              "sequences) rank 1: the result['loss'] is 7.")
    assert verdict.endswith(NO_M)


@pytest.mark.slow
def test_rank_code_that_drops_aux_or_sends_the_activations_back_fails_with_hints():
    for dropped in (dict(aux_first=False), dict(aux_last=False)):
        verdict = repr(exercises.check_one_f_one_b_two_stages(pipeline_step(**dropped)))
        assert verdict.startswith("✗ check_one_f_one_b_two_stages: on input 1 of 4 (2 ranks, m=1 micro-batch of 2 "
                                  "sequences) rank 0: the result['grads']"), verdict
        assert verdict.endswith("Hint: the stage's balancing loss aux joins the backward: (loss + aux) / m on the "
                                "last stage, and backward([out, aux / m], [grad, None]) on the first."), verdict
    verdict = repr(exercises.check_one_f_one_b_two_stages(pipeline_step(send="activations")))
    assert verdict.endswith("Hint: the last stage sends back the gradient of its input, x_in.grad after the "
                            "backward, not the activations that came in.")


@pytest.mark.slow
def test_rank_code_that_raises_or_deadlocks_is_a_verdict_and_a_stub_is_not_judged(monkeypatch):
    assert repr(exercises.check_one_f_one_b_two_stages(pipeline_step(raise_at=4))) == (
        "✗ check_one_f_one_b_two_stages: on input 3 of 4 (2 ranks, m=4 micro-batches of 1 sequence) rank 1: your "
        "function raised ValueError: no such micro-batch")
    monkeypatch.setattr(ranks, "TIMEOUT_S", 5.0)
    assert repr(exercises.check_one_f_one_b_two_stages(pipeline_step(blocking=True))) == (   # the prediction's
        "✗ check_one_f_one_b_two_stages: on 2 ranks, the ranks did not finish within 5 s: a collective that not "
        "every rank calls, or a send without its receive?")
    state = torch.get_rng_state()
    with pytest.raises(NotImplementedError, match="exercise 07.2: write one_f_one_b_two_stages"):
        exercises.check_one_f_one_b_two_stages(NS_STUB)
    assert torch.equal(torch.get_rng_state(), state)


def NS_STUB(stage, idx, targets, m):  # noqa: N802 — the stub as the exercise notebook has it
    raise NotImplementedError("exercise 07.2: write one_f_one_b_two_stages")
