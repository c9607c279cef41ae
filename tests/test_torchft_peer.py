"""torchft 0.2.0 on CPU and gloo: a replica killed mid-step, the survivors going on, its restart healed from a peer."""
import multiprocessing
import signal
from collections import defaultdict

import pytest

pytest.importorskip("torchft")

from moelab.experiments import torchft_peer  # noqa: E402

REPLICAS, STEPS, KILLED, KILL_AT, DOWN = 3, 8, 1, 2, 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def failed():
    return torchft_peer.run_with_failure(replicas=REPLICAS, steps=STEPS, kill_replica=KILLED, kill_at_step=KILL_AT,
                                         down_steps=DOWN)


@pytest.fixture(scope="module")
def healthy():
    return torchft_peer.run_without_failure(replicas=REPLICAS, steps=STEPS)


def lives(run):
    return [life for replica in run["replicas"] for life in replica]


def survivors(run):
    return [run["replicas"][r][0] for r in range(REPLICAS) if r != KILLED]


def test_every_replica_ends_at_the_same_step_with_or_without_a_failure(failed, healthy):
    """torchft's guarantee: every replica of a quorum runs as the quorum's highest step (one behind heals to it),
    so all replicas that finish stop at ``steps``; the killed process never reports an end."""
    killed, restarted = failed["replicas"][KILLED]
    assert killed["exitcode"] == -signal.SIGKILL and killed["final"] is None
    assert [r["step"] for r in killed["steps"]] == list(range(KILL_AT))          # it died inside step KILL_AT
    assert [life["final"]["final_step"] for life in lives(failed) if life["final"]] == [STEPS] * REPLICAS
    assert [life["final"]["final_step"] for life in lives(healthy)] == [STEPS] * REPLICAS
    assert len(lives(healthy)) == REPLICAS


def test_the_survivors_fail_the_step_the_replica_died_in_then_go_on_without_it(failed):
    """Its peers were waiting for its gradients: their all-reduce fails (gloo sees the socket close), should_commit
    says no, and the same step commits in the next quorum, one replica smaller, until the restart rejoins."""
    for life in survivors(failed):
        attempts = [r for r in life["steps"] if r["step"] == KILL_AT]
        assert [(r["committed"], r["quorum"]) for r in attempts] == [(False, REPLICAS), (True, REPLICAS - 1)]
        assert "gloo" in attempts[0]["error"]       # typically "... Read error ...: Connection reset by peer"
        assert [r["committed_steps"] for r in life["steps"] if r["committed"]] == list(range(1, STEPS + 1))
        quorums = [r["quorum"] for r in life["steps"] if r["committed"]]
        assert quorums == [REPLICAS] * KILL_AT + [REPLICAS - 1] * DOWN + [REPLICAS] * (STEPS - KILL_AT - DOWN)


def test_the_restarted_replica_heals_from_a_peer_bit_for_bit(failed):
    restarted = failed["replicas"][KILLED][1]
    heals = [h for h in failed["heals"] if (h["replica"], h["life"]) == (KILLED, 1)]
    assert len(heals) == 1
    heal = heals[0]
    assert heal["state_equal"]
    assert heal["from_replica"] == 0                # the first up-to-date replica in replica-id order
    assert heal["step"] == KILL_AT + DOWN          # the first quorum after the survivors' DOWN steps without it
    assert set(heal["keys"]["user"]["default"]) == {"model", "optim"} and "torchft" in heal["keys"]
    first = restarted["steps"][0]
    assert first["step"] == heal["step"] and first["committed"] and first["quorum"] == REPLICAS


def test_replicas_hold_the_same_weights_after_every_committed_step(failed, healthy):
    for run in (failed, healthy):
        digests = defaultdict(set)
        for life in lives(run):
            for record in life["steps"]:
                if record["committed"]:
                    digests[record["committed_steps"]].add(record["params"])
        assert sorted(digests) == list(range(1, STEPS + 1))
        assert all(len(d) == 1 for d in digests.values())
        assert len({life["final"]["params"] for life in lives(run) if life["final"]}) == 1


def test_a_failure_costs_batches_not_steps(failed, healthy):
    """Without the dead replica's batches the model saw fewer rows: torchft counts them (``batches_committed``)."""
    degraded = sum(r["quorum"] < REPLICAS for r in survivors(failed)[0]["steps"] if r["committed"])
    assert healthy["replicas"][0][0]["final"]["batches_committed"] == REPLICAS * STEPS
    assert failed["replicas"][0][0]["final"]["batches_committed"] == REPLICAS * STEPS - degraded
    for run in (failed, healthy):
        final = run["replicas"][0][0]["final"]["final_loss"]
        assert final < 0.5 * run["replicas"][0][0]["steps"][0]["loss"]


def test_no_process_is_left(failed, healthy):
    assert not multiprocessing.active_children()
    psutil = pytest.importorskip("psutil")
    assert not [life["pid"] for run in (failed, healthy) for life in lives(run) if psutil.pid_exists(life["pid"])]


def test_a_run_out_of_time_raises_and_leaves_no_process():
    with pytest.raises(TimeoutError, match="did not end within"):
        torchft_peer.run_without_failure(timeout=0.5)
    assert not multiprocessing.active_children()


def test_diloco_survives_a_death_between_syncs_and_heals_at_a_sync():
    """With DiLoCo the replicas meet only at syncs: the dead replica is simply absent from the next sync's quorum
    (the survivors commit it, no step fails), and the restarted one heals at its first sync."""
    run = torchft_peer.run_with_failure(replicas=REPLICAS, steps=6, kill_replica=KILLED, kill_at_step=1,
                                        down_steps=1, sync_every=2)
    for life in survivors(run):
        assert all(r["committed"] for r in life["steps"])
        assert [r["quorum"] for r in life["steps"]] == [REPLICAS, REPLICAS - 1] + [REPLICAS] * 4
    [heal] = [h for h in run["heals"] if h["life"] == 1]
    assert heal["state_equal"] and heal["from_replica"] != KILLED
    assert any(key.startswith("StreamingDiLoCoFragment") for key in heal["keys"]["user"])
    assert [life["final"]["final_step"] for life in lives(run) if life["final"]] == [6] * REPLICAS


def test_settings_the_run_cannot_show_are_refused():
    with pytest.raises(ValueError, match="rejoins before the end"):
        torchft_peer.run_with_failure(steps=6, kill_at_step=4, down_steps=2)
    with pytest.raises(ValueError, match="replicas = 1"):
        torchft_peer.run_without_failure(replicas=1)
