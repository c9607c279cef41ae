"""The launcher: results in rank order, a rank's traceback on failure, a timeout on a hang, and no process left.

The rank functions live at the top of this module so that spawned ranks can import it.
"""
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from moelab.dist import RankError, free_port, launch, main

pytestmark = pytest.mark.slow            # spawns ranks, runs JupyterLab or installs: not in make test-fast


def all_reduce_rank(rank, world_size, scale):
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    x = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(x)
    print(f"sum {x.item():.0f}")
    return {"rank": rank, "sum": x.cpu() * scale, "threads": torch.get_num_threads(), "backend": dist.get_backend()}


def failing_rank(rank, world_size):
    if rank == 1:
        raise ValueError("rank one cannot go on")
    dist.barrier()                      # the others wait for rank 1, which never comes: they must be stopped


def hanging_rank(rank, world_size):
    if rank == 0:
        time.sleep(3600)
    return rank


def dying_rank(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def no_children_left():
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


def test_launch_returns_each_ranks_result_in_rank_order_and_prints_by_rank(capsys):
    results = launch(all_reduce_rank, 3, args=(2.0,), timeout=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(torch.equal(r["sum"], torch.tensor([12.0])) for r in results)       # (1 + 2 + 3) * 2
    assert {r["threads"] for r in results} == {1} and results[0]["backend"] == "gloo"
    assert capsys.readouterr().out.splitlines() == ["[rank 0] sum 6", "[rank 1] sum 6", "[rank 2] sum 6"]
    assert no_children_left()


def test_a_failing_rank_raises_with_its_number_and_traceback_and_the_next_launch_works():
    with pytest.raises(RankError, match="rank 1 failed") as info:
        launch(failing_rank, 2, timeout=60)
    assert info.value.rank == 1 and "ValueError: rank one cannot go on" in info.value.remote_traceback
    assert "failing_rank" in info.value.remote_traceback
    assert no_children_left()
    assert [r["rank"] for r in launch(all_reduce_rank, 2, args=(1.0,), timeout=60)] == [0, 1]


def test_a_hanging_rank_is_stopped_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 2 did not finish within timeout = 8 s"):
        launch(hanging_rank, 2, timeout=8)
    assert time.monotonic() - start < 30
    assert no_children_left()


def test_a_rank_that_dies_without_reporting_is_named():
    with pytest.raises(RankError, match="rank 1 failed:\nthe process exited with code 3"):
        launch(dying_rank, 2, timeout=60)
    assert no_children_left()


def notebook_like():
    pass


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=0), "world_size = 0 is not allowed; allowed: an integer >= 1"),
    (dict(world_size=2, backend="mpi"), "backend = 'mpi' is not allowed; allowed: 'gloo', 'nccl'"),
    (dict(world_size=2, timeout=0), "timeout = 0 is not allowed; allowed: seconds > 0")])
def test_bad_arguments_name_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        launch(all_reduce_rank, **kwargs)


def test_functions_spawned_ranks_cannot_import_are_refused_before_starting_anything(monkeypatch):
    monkeypatch.setattr(notebook_like, "__module__", "__main__")
    with pytest.raises(ValueError, match="defined in __main__ .* Allowed: a function at the top level of a module"):
        launch(notebook_like, 2)

    def local(rank, world_size):
        return rank
    with pytest.raises(ValueError, match="inside a function"):
        launch(local, 2)


def test_free_port_can_be_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_torchrun_entry_point_refuses_to_run_without_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        main(["test_dist:all_reduce_rank", "1.0"])
    assert "run this module under torchrun" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_all_reduce_on_two_gpus():
    results = launch(all_reduce_rank, 2, args=(1.0,), backend="nccl", timeout=120)
    assert results[0]["backend"] == "nccl" and results[1]["sum"].item() == 3.0


def word_rank(rank, world_size, word):
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    return f"{word}: {world_size} ranks, sum {x.item():.0f}"


def test_the_same_rank_function_runs_under_torchrun():
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "moelab.dist", "test_dist:word_rank", "hello"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "hello: 2 ranks, sum 3"
