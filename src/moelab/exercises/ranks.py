"""Checks of rank code: the learner's function runs on real gloo ranks, next to moelab's, on the same inputs.

A rank-code exercise asks for a function that every rank of a process group calls, with collectives inside.
:func:`run_rank_check` launches the ranks of each input (:func:`moelab.dist.launch`, which sends a function written
in a notebook by value); on every rank the reference runs first, then the learner's function, then the known wrong
answers the hints describe, each on that rank's own inputs. The verdict names the input, the rank and the first
element that differs. A function that raises on a rank, or leaves the others waiting in a collective, is a verdict
too, not a crash or a hang: the launch stops every rank after a timeout and reports the rank.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..dist import RankError, launch
from ..exchange import exchange_counts
from .core import Verdict, _same, difference, seeded

TIMEOUT_S = 30.0        # one input's launch: a correct function needs well under a second


@dataclass(frozen=True)
class RankCase:
    """One input: ``world`` ranks, each calling ``make(rank, world)`` for its keyword arguments; ``label`` names
    the input in a verdict."""

    world: int
    make: Callable[[int, int], dict[str, Any]]
    label: str


def split_matrix(rank: int, world: int, seed: int, pattern: str) -> tuple[list[int], list[int]]:
    """This rank's send and receive splits of an all-to-all, from one matrix every rank draws alike: ``m[i][j]``
    rows go from rank ``i`` to rank ``j``; ``pattern`` ``"random"`` (0–3 rows, some empty), ``"to rank 0"`` (every
    row goes to rank 0) or ``"rank 0 silent"`` (rank 0 sends nothing)."""
    m = torch.randint(0, 4, (world, world), generator=seeded(seed))
    if pattern == "to rank 0":
        m[:, 1:] = 0
    elif pattern == "rank 0 silent":
        m[0] = 0
    return m[rank].tolist(), m[:, rank].tolist()


def exchange(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]) -> torch.Tensor:
    """The rows of ``x`` cut by ``send_splits``, piece ``j`` to rank ``j``; what arrives, in rank order.

    ``recv_splits[j]`` rows arrive from rank ``j``. The plain exchange (no gradient) that references and known
    wrong answers are built from."""
    out = x.new_empty(sum(recv_splits), x.shape[1])
    dist.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits))
    return out


def send_to(rows: torch.Tensor, peer: torch.Tensor) -> torch.Tensor:
    """``rows[i]`` to rank ``peer[i]`` (``peer`` sorted), the counts exchanged first; what this rank receives."""
    send = torch.bincount(peer, minlength=dist.get_world_size())
    recv = exchange_counts(send)
    return exchange(rows, send.tolist(), recv.tolist())


def _on_rank(rank: int, world: int, fn: Callable, reference: Callable, makes: Sequence[tuple[int, Callable]],
             wrong: Sequence[Callable]) -> list[tuple[Any, Any, list]]:
    """Every input of this world size in turn: (expected, got, the wrong answers) for each."""
    results = []
    for i, make in makes:
        kwargs = make(rank, world)
        expected = reference(**copy.deepcopy(kwargs))
        try:
            got = fn(**copy.deepcopy(kwargs))
        except NotImplementedError:
            raise
        except Exception as error:  # noqa: BLE001 — reported with the input it failed on
            raise InputFailed(f"input {i}: {type(error).__name__}: {error}") from error
        results.append((expected, got, [w(**copy.deepcopy(kwargs)) for w in wrong]))
    return results


def _raise_here(fn: Callable, c: RankCase) -> None:
    """Call an unfilled stub in this process, so that its NotImplementedError shows the learner's own line (a stub
    raises before any collective); anything else it raises here, outside a process group, is ignored."""
    try:
        fn(**c.make(0, c.world))
    except NotImplementedError:
        raise
    except Exception:  # noqa: BLE001 — not a stub after all: the caller raises the ranks' error instead
        pass


class InputFailed(RuntimeError):
    """The learner's function raised on one rank, on the input named first in the message."""


def run_rank_check(name: str, fn: Callable, reference: Callable, cases: Sequence[RankCase], against: str,
                   rtol: float = 1e-5, atol: float = 1e-6, hints: Sequence[tuple[Callable, str]] = ()) -> Verdict:
    """Compare the rank function ``fn`` with ``reference`` on every case's ranks; see the module docstring. The
    inputs of one world size share a launch."""
    if not callable(fn):
        raise TypeError(f"fn = {fn!r} is not allowed; allowed: the function you wrote, e.g. {name}(my_function)")
    wrong = [w for w, _ in hints]

    def where(i: int) -> str:
        return f"on input {i} of {len(cases)} ({cases[i - 1].world} ranks, {cases[i - 1].label})"

    for world in dict.fromkeys(c.world for c in cases):
        makes = [(i, c.make) for i, c in enumerate(cases, 1) if c.world == world]
        try:
            results = launch(_on_rank, world, args=(fn, reference, makes, wrong), timeout=TIMEOUT_S)
        except RankError as error:
            last = error.remote_traceback.strip().splitlines()[-1]
            if last.startswith("NotImplementedError"):
                _raise_here(fn, cases[0])
                raise NotImplementedError(last.partition(": ")[2]) from None
            failed = re.match(r".*InputFailed: input (\d+): (.*)", last)
            if failed is None:
                return Verdict(name, False, f"✗ {name}: on {world} ranks, rank {error.rank} failed: {last}")
            return Verdict(name, False, f"✗ {name}: {where(int(failed[1]))} rank {error.rank}: your function "
                                        f"raised {failed[2]}")
        except TimeoutError:
            return Verdict(name, False, f"✗ {name}: on {world} ranks, the ranks did not finish within "
                                        f"{TIMEOUT_S:g} s: a collective that not every rank calls, or a send "
                                        f"without its receive?")
        for (i, _), per_rank in zip(makes, zip(*results)):
            for rank, (expected, got, wrongs) in enumerate(per_rank):
                found = difference(expected, got, rtol, atol, where="the result")
                if found:
                    hint = next((h for (_, h), w in zip(hints, wrongs) if _same(got, w, rtol, atol)), None)
                    return Verdict(name, False, f"✗ {name}: {where(i)} rank {rank}: {found}."
                                                + (f" Hint: {hint}" if hint else ""))
    return Verdict(name, True, f"✓ {name}: agrees with {against} on {len(cases)} random inputs, on real ranks")
