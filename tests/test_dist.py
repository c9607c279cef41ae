"""The launcher: results in rank order, a rank's traceback on failure, a timeout on a hang, and no process left.

Most rank functions live at the top of this module; those written as a notebook cell writes them travel by value.
"""
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from moelab import sendable
from moelab.dist import RankError, launch, main, max_ranks, rendezvous

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


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=0), "world_size = 0 is not allowed; allowed: an integer >= 1"),
    (dict(world_size=2, backend="mpi"), "backend = 'mpi' is not allowed; allowed: 'gloo', 'nccl'"),
    (dict(world_size=2, timeout=0), "timeout = 0 is not allowed; allowed: seconds > 0")])
def test_bad_arguments_name_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        launch(all_reduce_rank, **kwargs)


CELL = "/tmp/ipykernel_0/cell_7.py"        # a file name as ipykernel compiles a cell to


def notebook_cell(source: str) -> dict:
    """Run ``source`` as a notebook cell runs: in ``__main__``'s namespace, compiled from a cell's file name."""
    namespace = {"__name__": "__main__"}
    exec(compile(source, CELL, "exec"), namespace)
    return namespace


SUM_CELL = """
import torch
import torch.distributed as dist
SCALE = 10

def scaled(x):
    return x * SCALE

def rank_sum(rank, world_size):
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    assert rank != 1 or x.item() == 3, "rank 1 disagrees"
    return scaled(x).item()
"""


FUNCTION_CELL = """
import torch

class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad

def double_rank(rank, world_size):
    x = torch.ones(2, requires_grad=True)
    Double.apply(x).sum().backward()
    return x.grad.tolist()
"""


def test_a_function_written_in_a_notebook_cell_runs_on_the_ranks_with_the_globals_it_reads():
    cell = notebook_cell(SUM_CELL)
    assert cell["rank_sum"].__module__ == "__main__"          # plain pickle could not send it
    assert launch(cell["rank_sum"], 2, timeout=60) == [30.0, 30.0]
    assert launch(lambda rank, world_size: rank * 10, 3, timeout=60) == [0, 10, 20]
    cell = notebook_cell(FUNCTION_CELL)            # an autograd.Function's class refers to itself through Function
    assert launch(cell["double_rank"], 2, timeout=60) == [[2.0, 2.0], [2.0, 2.0]]
    assert no_children_left()


def test_a_failing_notebook_function_shows_the_cells_lines(monkeypatch):
    cell = notebook_cell(SUM_CELL.replace("x.item() == 3", "x.item() == 4"))
    lines = SUM_CELL.splitlines(keepends=True)
    monkeypatch.setattr(sendable, "cell_sources", lambda: {CELL: ("Cell In[7]", lines)})
    with pytest.raises(RankError, match="rank 1 failed") as info:
        launch(cell["rank_sum"], 2, timeout=60)
    text = info.value.remote_traceback
    assert "Cell In[7], line 12, in rank_sum" in text and 'assert rank != 1 or x.item() == 4, "rank 1 disagrees"' \
        not in text and "x.item() == 3" in text            # the lines shown are the cell's, from the notebook
    assert "AssertionError: rank 1 disagrees" in text and "cloudpickle" not in text
    assert no_children_left()


def test_what_cannot_be_sent_is_refused_before_starting_anything_naming_it():
    cell = notebook_cell("def uses_undefined(rank, world_size):\n    return helper_never_defined(rank)\n")
    with pytest.raises(NameError, match=r"reads globals that are not defined: helper_never_defined "
                                        r"\(in uses_undefined\); the ranks would not have them either"):
        launch(cell["uses_undefined"], 2)
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"rank_fn '.*<lambda>' cannot be sent to the ranks \(TypeError: cannot "
                                        r"pickle '_thread.lock' object\)\. Allowed: functions"):
        launch(lambda rank, world_size: lock.locked(), 2)
    with pytest.raises(TypeError, match=r"args\[1\] cannot be sent to the ranks"):
        launch(all_reduce_rank, 2, args=(1.0, lock))
    assert not multiprocessing.active_children()


def test_a_result_that_cannot_be_sent_back_is_named():
    with pytest.raises(RankError, match=r"rank \d failed:(.|\n)*TypeError: the rank function returned a generator "
                                        r"that cannot be sent back"):
        launch(lambda rank, world_size: (i for i in range(rank)), 2, timeout=60)
    assert no_children_left()


def test_more_ranks_than_the_machine_holds_are_refused():
    with pytest.raises(ValueError, match=rf"world_size = {max_ranks() + 1} is more ranks than this machine holds; "
                                         rf"allowed: 1 to {max_ranks()}"):
        launch(all_reduce_rank, max_ranks() + 1)


def test_the_rendezvous_port_stays_taken_while_its_launch_runs():
    """Another launch (another pytest worker, another notebook) cannot be given the same port meanwhile."""
    store = rendezvous(10)
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", store.port))


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


def test_in_a_real_notebook_a_ranks_traceback_points_at_the_learners_cell():
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    cells = ["import torch\nimport torch.distributed as dist\nfrom moelab.dist import launch",
             "def rank_fn(rank, world_size):\n    x = torch.ones(1)\n    dist.all_reduce(x)\n    if rank == 1:\n"
             "        raise ValueError(f'sum {x.item():.0f}')\n    return x.item()",
             "try:\n    launch(rank_fn, 2, timeout=60)\nexcept Exception as error:\n    print(error)"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="moelab", shutdown_kernel="immediate").execute()
    printed = nb.cells[2].outputs[0]["text"]
    assert "rank 1 failed" in printed and "Cell In[2], line 5, in rank_fn" in printed
    assert "raise ValueError(f'sum {x.item():.0f}')" in printed and "ValueError: sum 2" in printed
