"""A replica that dies: the others go on without it, it comes back healed, nothing committed is lost or torn."""
import multiprocessing
import os
import signal

import pytest
import torch

from moelab.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from moelab.dist import RankError, rank_context
from moelab.elastic import run_replicas, send_state
from moelab.experiments.fragmented import FragmentedRun, failure_replica

RUN = FragmentedRun(steps=20, H=5, eval_every=5, batch_size=4, eval_batches=2, warmup_steps=2)


@pytest.fixture(scope="module")
def runs():
    return {kill: run_replicas(failure_replica, 3, args=(RUN, kill), down_rounds=1, join_timeout=10.0, timeout=120)
            for kill in (None, (1, 6))}


@pytest.mark.slow
def test_the_job_shrinks_then_heals_and_commits_every_step(runs):
    results, events = runs[1, 6]
    assert [(r, what) for r, what, _ in events] == [(1, "died"), (1, "restarted")]
    survivor, back = results[0], results[1]
    members = [m for _, m in survivor["rounds"]]
    assert [c for c, _ in survivor["rounds"]] == [1, 2, 3, 4]            # every outer step committed, once
    assert members[0] == [0, 1, 2] and [0, 2] in members and members[-1] == [0, 1, 2]
    assert back["incarnation"] == 1 and back["rounds"][-1][0] == 4
    for r in results:                                                     # one global model everywhere
        assert torch.equal(r["params"], survivor["params"])
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_the_loss_with_a_failure_stays_near_the_loss_without(runs):
    final = {kill: runs[kill][0][0]["evals"][-1][1] for kill in runs}
    assert abs(final[1, 6] / final[None] - 1) < 0.02


def vote_replica(members, die_in_round: int) -> list:
    """Each round: join, all-reduce a one, vote; the victim dies after joining a round, before its all-reduce."""
    committed = []
    while len(committed) < 3:
        round_ = members.join(len(committed))
        if members.replica == 2 and round_.number == die_in_round:
            os.kill(os.getpid(), signal.SIGKILL)
        one = torch.ones(1)
        try:
            round_.group.allreduce([one]).wait()
            ok = True
        except RuntimeError:
            ok = False
        if members.commit(round_, ok):
            committed.append((round_.number, round_.members, int(one)))
    return committed


@pytest.mark.slow
def test_a_death_inside_a_round_commits_nothing_and_the_step_is_retried():
    results, events = run_replicas(vote_replica, 3, args=(1,), down_rounds=100, join_timeout=10.0, timeout=60)
    assert results[2] is None and [what for _, what, _ in events] == ["died"]
    assert results[0] == results[1]
    numbers = [n for n, _, _ in results[0]]
    assert numbers[0] == 0 and 1 not in numbers                           # round 1 failed: nothing committed
    for _, members, total in results[0]:
        assert total == len(members)                                      # the sum of the members alone
    assert results[0][-1][1] == [0, 1]


def source_replica(members) -> dict:
    round_ = members.join(members.replica)                                 # replica 2 holds the most steps
    return send_state({"from": torch.tensor([members.replica]), "step": members.replica}, round_)


def test_state_is_sent_from_the_most_advanced_member():
    results, _ = run_replicas(source_replica, 3, join_timeout=1.0, timeout=60)
    assert all(r["step"] == 2 and int(r["from"]) == 2 for r in results)


def crashing_replica(members):
    raise ValueError("a bug on replica " + str(members.replica))


def test_a_replica_that_raises_surfaces_its_traceback():
    with pytest.raises(RankError, match="ValueError: a bug on replica"):
        run_replicas(crashing_replica, 2, timeout=30)
    assert multiprocessing.active_children() == []


def die_while_writing(path: str) -> None:
    def write(f):
        f.write(b"x" * 1000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(path, write)


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 3, "w": torch.arange(4.0)})
    p = rank_context().Process(target=die_while_writing, args=(str(path),))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"replicas": 1}, "replicas = 1 is not allowed; allowed: an integer >= 2"),
    ({"replicas": 2, "restarts": -1}, "restarts = -1 is not allowed; allowed: an integer >= 0"),
    ({"replicas": 2, "down_rounds": 0.5}, "down_rounds = 0.5 is not allowed"),
    ({"replicas": 2, "join_timeout": 5.0, "timeout": 5.0}, "join_timeout = 5.0 is not allowed; allowed: seconds > 0 "
                                                           "and < timeout = 5.0"),
])
def test_bad_input_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_replicas(crashing_replica, **kwargs)
