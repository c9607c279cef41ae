"""Run one function on N processes joined by ``torch.distributed``: from a notebook, a test or ``torchrun``.

    results = launch(my_module.rank_fn, world_size=4, args=(...))   # one result per rank, in rank order

Each rank is a fresh process that joins a process group — gloo on CPU, NCCL when every rank has its own GPU — at
a store the caller serves on a free local port, with a timeout on the group and on every collective, and one
torch thread. It calls ``rank_fn(rank, world_size, *args)`` and sends back what it returns. The processes are
started fresh, so the function and its arguments travel by value (:mod:`moelab.sendable`): one defined in a
notebook cell runs on the ranks as it is, and a rank's traceback shows the cell's lines.

The processes come from a *forkserver* where the platform has one (Linux, macOS): one server process, started
with the first launch, imports torch once, and every rank is forked from it ready to run, in tens of milliseconds
instead of the second or two it takes a *spawned* interpreter to import torch (Windows spawns). Either way a rank
shares no state with the caller: it receives its function and arguments pickled, as with spawn. The server
process lives as long as the caller and ends with it.

Failure is part of the design. A rank that raises makes :func:`launch` raise :class:`RankError` with that rank's
number and traceback; ranks that do not finish within ``timeout`` seconds are stopped and :func:`launch` raises
``TimeoutError`` naming them; in every case all child processes are gone before :func:`launch` returns or
raises, so the next launch starts clean. What the ranks print is shown after they finish, rank by rank, each
line prefixed with ``[rank r]`` (in rank order, so that a notebook's output does not depend on scheduling).

The same rank functions run on GPUs under ``torchrun`` (see :func:`main`)::

    torchrun --standalone --nproc-per-node 4 -m moelab.dist moelab.some_module:rank_fn
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import os
import queue as queue_module
import time
import traceback
from typing import Any, Callable

import cloudpickle
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab import sendable

RankFn = Callable[..., Any]


class RankError(RuntimeError):
    """A rank raised: ``rank`` is its number and ``remote_traceback`` the traceback it printed."""

    def __init__(self, rank: int, remote_traceback: str):
        super().__init__(f"rank {rank} failed:\n{remote_traceback}")
        self.rank, self.remote_traceback = rank, remote_traceback


def rendezvous(timeout: float) -> dist.TCPStore:
    """The key-value store the ranks of one launch meet at, served by the caller on a port the OS picks and held
    until the caller drops it: a port merely found free and released could be taken by another launch running at
    the same moment (two pytest workers, two notebooks), whose ranks would then meet the wrong group."""
    return dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout),
                         wait_for_workers=False)


def default_backend(world_size: int = 1) -> str:
    """NCCL when there is a GPU for every one of the ``world_size`` ranks, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def rank_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device this rank computes on: its own GPU under NCCL (chosen by :func:`init_process_group`), the CPU
    under gloo. Rank functions put their tensors and models there, so that one function runs on both."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(rank: int, world_size: int, backend: str, timeout: float,
                       store: dist.Store | None = None) -> None:
    """Join the process group met at ``store`` (or at ``MASTER_ADDR`` / ``MASTER_PORT``, as under torchrun); with
    NCCL, rank ``r`` uses GPU ``r % device_count``. ``timeout`` (seconds) bounds the rendezvous and every
    collective."""
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=store,
                            timeout=datetime.timedelta(seconds=timeout))


def max_ranks() -> int:
    """How many gloo ranks this machine holds: four processes per CPU core (each has its own torch), at least 8."""
    return max(8, 4 * (os.cpu_count() or 1))


def _check(fn: RankFn, world_size: int, backend: str, timeout: float) -> None:
    if not callable(fn):
        raise TypeError(f"rank_fn must be a function, got {type(fn).__name__}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size = {world_size!r} is not allowed; allowed: an integer >= 1")
    if backend == "gloo" and world_size > max_ranks():
        raise ValueError(f"world_size = {world_size} is more ranks than this machine holds; allowed: 1 to "
                         f"{max_ranks()} (4 processes per CPU core)")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend = {backend!r} is not allowed; allowed: 'gloo', 'nccl'")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend = 'nccl' needs a GPU per rank: {world_size} ranks, {torch.cuda.device_count()} "
                         f"GPUs visible; allowed here: 'gloo'")
    if not timeout > 0:
        raise ValueError(f"timeout = {timeout!r} is not allowed; allowed: seconds > 0")


def _rank_main(blob: bytes, rank: int, world_size: int, port: int, backend: str, timeout: float, threads: int,
               out: Any) -> None:
    """Body of each rank process: join the group, run the function packed in ``blob``, send back
    ("ok" | "error", rank, payload, printed text, time)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    wait = datetime.timedelta(seconds=timeout)
    torch.set_num_threads(threads)
    printed = io.StringIO()
    sources = {}
    try:
        with contextlib.redirect_stdout(printed):
            fn, args, sources = sendable.unpack(blob)
            store = dist.TCPStore("127.0.0.1", port, None, False, timeout=wait)      # the caller's rendezvous
            init_process_group(rank, world_size, backend, timeout, store)
            result = fn(rank, world_size, *args)
        out.put(("ok", rank, sendable.result_bytes(result, _save), printed.getvalue(), time.time()))
    except BaseException:  # noqa: BLE001 — everything a rank raises goes back to the caller
        out.put(("error", rank, sendable.relabel(traceback.format_exc(), sources), printed.getvalue(), time.time()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _save(result: Any) -> bytes:
    """Tensors as bytes (shared-memory handles would die with the rank), objects of notebook classes by value."""
    buffer = io.BytesIO()
    torch.save(result, buffer, pickle_module=cloudpickle)
    return buffer.getvalue()


def stop_processes(processes: list) -> None:
    """Terminate, then kill, every process still alive; reap them all (those that were started)."""
    processes = [p for p in processes if p.pid is not None]
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _first_error(out: Any, first: tuple, grace: float = 1.0) -> tuple[int, str]:
    """The error that happened first. When one rank fails, the ranks waiting for it in a collective often fail
    a moment later (their peer is gone); their errors are symptoms. Collect what arrives within ``grace``
    seconds and return the earliest (rank, traceback)."""
    errors = [first]
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            message = out.get(timeout=0.05)
        except queue_module.Empty:
            continue
        if message[0] == "error":
            errors.append(message)
    status, rank, payload, text, t = min(errors, key=lambda m: m[4])
    return rank, payload


def _print_by_rank(printed: dict[int, str]) -> None:
    for rank in sorted(printed):
        for line in printed[rank].splitlines():
            print(f"[rank {rank}] {line}")


def rank_context() -> mp.context.BaseContext:
    """How ranks are started: a forkserver that has imported torch (see the module docstring), else spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def launch(fn: RankFn, world_size: int, args: tuple = (), backend: str | None = None, timeout: float = 60.0,
           threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes in one process group and return
    the results in rank order. Raises :class:`RankError` if a rank raises (or dies), ``TimeoutError`` if the
    ranks are not all done after ``timeout`` seconds; no child process outlives the call."""
    backend = backend or default_backend(world_size)
    _check(fn, world_size, backend, timeout)
    blob = sendable.pack(fn, tuple(args))
    ctx = rank_context()
    out = ctx.Queue()
    store = rendezvous(timeout)                       # held until the ranks are gone
    processes = [ctx.Process(target=_rank_main, daemon=True,
                             args=(blob, rank, world_size, store.port, backend, timeout, threads, out))
                 for rank in range(world_size)]
    results: dict[int, Any] = {}
    printed: dict[int, str] = {}
    try:
        for p in processes:
            p.start()
        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            try:
                message = out.get(timeout=0.1)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(processes) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    raise RankError(dead[0], f"the process exited with code {processes[dead[0]].exitcode} "
                                             f"without reporting (killed, or crashed in native code)") from None
                if time.monotonic() > deadline:
                    waiting = [r for r in range(world_size) if r not in results]
                    raise TimeoutError(f"ranks {waiting} of {world_size} did not finish within timeout = "
                                       f"{timeout} s; all ranks were stopped. Allowed: a larger timeout, or a "
                                       f"rank function whose collectives match on every rank") from None
                continue
            status, rank, payload, printed[rank], _ = message
            if status == "error":
                raise RankError(*_first_error(out, message))
            # from our own child; GPU tensors come back to the CPU
            results[rank] = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    finally:
        stop_processes(processes)
        out.close()
        del store
        _print_by_rank(printed)
    return [results[rank] for rank in range(world_size)]


def main(argv: list[str] | None = None) -> None:
    """``torchrun --standalone --nproc-per-node N -m moelab.dist module:function [args...]``: run the rank function
    on every process torchrun started (string arguments passed through); rank 0 prints its result."""
    parser = argparse.ArgumentParser(description="Run a moelab rank function under torchrun.")
    parser.add_argument("target", help="module:function, e.g. moelab.experiments.expert_parallel:summary_rank")
    parser.add_argument("args", nargs="*", help="string arguments passed to the function after rank, world_size")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the rendezvous and collectives")
    args = parser.parse_args(argv)
    module, _, name = args.target.partition(":")
    if not name:
        parser.error(f"target {args.target!r} is not allowed; allowed: module:function, "
                     "e.g. moelab.experiments.expert_parallel:summary_rank")
    fn = getattr(importlib.import_module(module), name)
    if "RANK" not in os.environ:
        parser.error("RANK is not set: run this module under torchrun --standalone --nproc-per-node N")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = default_backend(world_size)
    init_process_group(rank, world_size, backend, args.timeout)
    try:
        result = fn(rank, world_size, *args.args)
        if rank == 0:
            print(result)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
