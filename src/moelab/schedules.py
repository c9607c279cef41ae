"""Pipeline schedules as data: which forward (F), backward (B) and weight-gradient (W) each stage runs, in order.

A batch is cut into ``m`` micro-batches that flow through ``p`` stages on ``p`` ranks. What differs between
schedules is the *order* in which each rank runs its actions:

- **GPipe** (Huang et al. 2019): every micro-batch's forward, then every backward. A stage keeps the activations
  of all ``m`` micro-batches until their backward.
- **1F1B** (PipeDream-Flush, Narayanan et al. 2021): stage ``s`` runs ``p − 1 − s`` forwards to fill the pipe,
  then alternates one forward and one backward, then drains; it keeps at most ``p − s`` micro-batches.
- **DualPipe** (DeepSeek-V3, §3.2.1): micro-batches enter from *both* ends. Rank ``r`` holds two chunks: stage
  ``r`` of the model for the micro-batches that enter at rank 0 (chunk 0) and stage ``p − 1 − r`` of a second
  copy for those that enter at rank ``p − 1`` (chunk 1). In the steady state a rank runs one chunk's forward
  together with the other's backward (an F&B pair: on a GPU the all-to-all of one hides behind the computation
  of the other), and some backwards leave their weight gradients (W) for later, to fill what would be idle
  (zero-bubble pipelining, Qi et al. 2023).

GPipe and 1F1B idle ``(p − 1)(F + B)`` per step, :func:`bubble_fraction` of it; DualPipe ``(p/2 − 1)(F&B + B −
3W)`` (:func:`dualpipe_bubble`, the report's table 2). :func:`replay` places a schedule's actions on a timeline,
each as soon as its input is there, from their durations: an ideal timeline, or one from durations measured on
real ranks (:mod:`moelab.pipeline` executes the schedules).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

SCHEDULES = ("gpipe", "1f1b", "dualpipe")


@dataclass(frozen=True)
class Action:
    """One step of a rank's schedule: ``kind`` ``"F"``, ``"B"`` or ``"W"`` of micro-batch ``mb`` of ``chunk``
    (DualPipe's direction, 0 or 1; None in one-direction schedules). A ``B`` with ``defer_w`` computes only the
    gradient of its input, and a later ``W`` the weights' gradients; a ``paired`` F runs with the B after it
    (an F&B pair)."""

    kind: str
    mb: int
    chunk: int | None = None
    defer_w: bool = False
    paired: bool = False

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}" if self.chunk is None else f"{self.kind}{self.chunk}.{self.mb}"


def _check(stages: int, microbatches: int) -> None:
    if not (isinstance(stages, int) and stages >= 1):
        raise ValueError(f"stages = {stages!r} is not allowed; allowed: an integer >= 1")
    if not (isinstance(microbatches, int) and microbatches >= 1):
        raise ValueError(f"microbatches = {microbatches!r} is not allowed; allowed: an integer >= 1")


def gpipe(stages: int, microbatches: int) -> list[list[Action]]:
    """GPipe: on every stage, the forwards of all micro-batches, then their backwards in the same order."""
    _check(stages, microbatches)
    return [[Action("F", i) for i in range(microbatches)] + [Action("B", i) for i in range(microbatches)]
            for _ in range(stages)]


def one_f_one_b(stages: int, microbatches: int) -> list[list[Action]]:
    """1F1B: stage ``s`` warms up with ``min(p − 1 − s, m)`` forwards, alternates forward and backward, then
    runs the backwards left."""
    _check(stages, microbatches)
    out = []
    for s in range(stages):
        warmup = min(stages - 1 - s, microbatches)
        actions = [Action("F", i) for i in range(warmup)]
        forward, backward = warmup, 0
        while forward < microbatches:
            actions += [Action("F", forward), Action("B", backward)]
            forward, backward = forward + 1, backward + 1
        actions += [Action("B", i) for i in range(backward, microbatches)]
        out.append(actions)
    return out


def dualpipe(stages: int, microbatches: int) -> list[list[Action]]:
    """DualPipe: ``m / 2`` micro-batches in each direction, each rank's actions in the eight steps of DeepSeek's
    reference implementation (``DualPipe.step``). Ranks in the second half are the mirror of the first, their
    chunks swapped; a step's "phase 0" is a rank's own direction (chunk 0 in the first half, 1 in the second)."""
    _check(stages, microbatches)
    if stages % 2:
        raise ValueError(f"stages = {stages} is not allowed for DualPipe; allowed: an even number (the two "
                         f"directions meet in the middle)")
    if microbatches % 2 or microbatches < 2 * stages:
        raise ValueError(f"microbatches = {microbatches} is not allowed for DualPipe with {stages} stages; allowed: "
                         f"an even number >= 2 · stages = {2 * stages}")
    return [_dualpipe_rank(r, stages, microbatches // 2) for r in range(stages)]


def _dualpipe_rank(r: int, p: int, n: int) -> list[Action]:
    half = min(r, p - 1 - r)                        # distance from the nearer end
    flip = int(r >= p // 2)
    middle = half == p // 2 - 1
    nf, nb = [0, 0], [0, 0]
    deferred: deque[tuple[int, int]] = deque()
    actions: list[Action] = []

    def F(phase: int, paired: bool = False) -> None:
        c = phase ^ flip
        actions.append(Action("F", nf[c], c, paired=paired))
        nf[c] += 1

    def B(phase: int, zero_bubble: bool = False) -> None:
        c = phase ^ flip
        actions.append(Action("B", nb[c], c, defer_w=zero_bubble))
        if zero_bubble:
            deferred.append((c, nb[c]))
        nb[c] += 1

    def W() -> None:
        c, mb = deferred.popleft()
        actions.append(Action("W", mb, c))

    def FB(forward: int, backward: int) -> None:
        F(forward, paired=True)
        B(backward)

    for _ in range((p // 2 - half - 1) * 2):        # 1: nF0, the warm-up of the rank's own direction
        F(0)
    for _ in range(half + 1):                        # 2: nF0F1
        F(0)
        F(1)
    for _ in range(p // 2 - half - 1):              # 3: nB1W1F1, zero bubble
        B(1, zero_bubble=True)
        W()
        F(1)
    for i in range(n - p + half + 1):               # 4: the main step, nF0B1F1B0 in F&B pairs
        if i == 0 and middle:                       # the reference does not pair these two, to shorten its bubble
            F(0)
            B(1)
        else:
            FB(0, 1)
        FB(1, 0)
    for _ in range(p // 2 - half - 1):              # 5: nB1F1B0
        B(1)
        FB(1, 0)
    zero_bubble = False
    for i in range(half + 1):                       # 6: nB1B0, the second half in zero bubble
        if i == (half + 1) // 2 and half % 2 == 1:
            zero_bubble = True
        B(1, zero_bubble)
        if i == (half + 1) // 2 and half % 2 == 0:
            zero_bubble = True
        B(0, zero_bubble)
    for _ in range(p // 2 - half - 1):              # 7: nWB0
        W()
        B(0, zero_bubble=True)
    for _ in range(half + 1):                       # 8: nW
        W()
    return actions


def schedule(name: str, stages: int, microbatches: int) -> list[list[Action]]:
    """The schedule named ``name`` (:data:`SCHEDULES`)."""
    makers = {"gpipe": gpipe, "1f1b": one_f_one_b, "dualpipe": dualpipe}
    if name not in makers:
        raise ValueError(f"schedule = {name!r} is not allowed; allowed: {', '.join(map(repr, SCHEDULES))}")
    return makers[name](stages, microbatches)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """The idle share of a GPipe or 1F1B step with equal stages: ``(p − 1) / (m + p − 1)``."""
    _check(stages, microbatches)
    return (stages - 1) / (microbatches + stages - 1)


def dualpipe_bubble(stages: int, F: float, B: float, W: float, FB: float | None = None) -> float:
    """DualPipe's idle time per rank, ``(p/2 − 1)(F&B + B − 3W)`` (DeepSeek-V3 report, table 2): ``B`` a full
    backward chunk, ``W`` its weights' part, ``FB`` an F&B pair (``F + B`` where nothing overlaps them)."""
    return (stages // 2 - 1) * ((F + B if FB is None else FB) + B - 3 * W)


def in_flight(actions: list[Action]) -> int:
    """The most micro-batches whose activations a rank holds at once under ``actions`` (forward done, gradients
    not all computed: until the ``W`` of a deferred backward): ``m`` for GPipe, ``p − s`` for 1F1B on stage ``s``."""
    held = most = 0
    for a in actions:
        held += 1 if a.kind == "F" else -1 if a.kind == "W" or not a.defer_w else 0
        most = max(most, held)
    return most


def stage_of(rank: int, chunk: int | None, stages: int) -> int:
    """Which stage of the model ``chunk`` is on ``rank``: the rank's own for chunk 0 (and one-direction
    schedules), the mirror ``p − 1 − rank`` for DualPipe's chunk 1. The map is its own inverse: it also gives
    the rank that holds a stage."""
    return stages - 1 - rank if chunk == 1 else rank


def needs(rank: int, a: Action, stages: int) -> tuple[int, Action] | None:
    """The action (and its rank) whose output ``a`` waits for: the previous stage's forward for a forward (none
    on the first stage), the next stage's backward for a backward (this rank's forward on the last stage), this
    rank's own backward for a W."""
    if a.kind == "W":
        return rank, Action("B", a.mb, a.chunk)
    s = stage_of(rank, a.chunk, stages)
    if a.kind == "F":
        return None if s == 0 else (stage_of(s - 1, a.chunk, stages), Action("F", a.mb, a.chunk))
    if s == stages - 1:
        return rank, Action("F", a.mb, a.chunk)
    return stage_of(s + 1, a.chunk, stages), Action("B", a.mb, a.chunk)


def durations(F: float, B: float, W: float = 0.0,
              deferred_b: float | None = None) -> Callable[[int, Action], float]:
    """Each action's time for :func:`replay`: ``F``, a full backward ``B``, ``W``, and a backward that defers its
    weights' gradient ``B − W`` (or ``deferred_b``, where that part was measured on its own)."""
    short = B - W if deferred_b is None else deferred_b
    return lambda rank, a: F if a.kind == "F" else W if a.kind == "W" else short if a.defer_w else B


def replay(plan: list[list[Action]], seconds: Callable[[int, Action], float]) -> list[list[tuple[str, float, float]]]:
    """Each rank's ``(action, start, end)`` when every action starts as soon as its rank is free and its input is
    there (:func:`needs`; transfers take no time), lasting ``seconds(rank, action)``. An F&B pair starts when both
    its inputs are there, its B right after its F (a GPU would overlap them; here they take their sum)."""
    stages = len(plan)
    done: dict[tuple[int, str, int, int | None], float] = {}
    free, position = [0.0] * stages, [0] * stages
    timeline: list[list[tuple[str, float, float]]] = [[] for _ in range(stages)]

    def ready(r: int, a: Action) -> float | None:
        need = needs(r, a, stages)
        if need is None:
            return 0.0
        return done.get((need[0], need[1].kind, need[1].mb, need[1].chunk))

    while any(position[r] < len(plan[r]) for r in range(stages)):
        moved = False
        for r in range(stages):
            if position[r] == len(plan[r]):
                continue
            a = plan[r][position[r]]
            unit = plan[r][position[r]:position[r] + 2] if a.paired else [a]
            times = [ready(r, b) for b in unit]
            if None in times:
                continue
            t = max([free[r], *times])
            for b in unit:
                timeline[r].append((repr(b), t, t + seconds(r, b)))
                t += seconds(r, b)
                done[r, b.kind, b.mb, b.chunk] = t
            free[r] = t
            position[r] += len(unit)
            moved = True
        if not moved:
            waiting = {r: plan[r][position[r]] for r in range(stages) if position[r] < len(plan[r])}
            raise ValueError(f"the schedule deadlocks: ranks wait for each other at {waiting}; allowed: a schedule "
                             f"in which every action's input is produced by an earlier action")
    return timeline


def measured_bubbles(events: list[list[tuple[str, float, float]]]) -> list[float]:
    """Each rank's idle share of the step, from its actions' ``(name, start, end)`` (one list per rank, times from
    a common start): ``1 − busy / step``, the step lasting until the last rank's last action ends."""
    step = max(end for rank in events for _, _, end in rank)
    if not step > 0:
        raise ValueError(f"the events end at {step!r}; allowed: a step that takes time")
    return [1 - sum(end - start for _, start, end in rank) / step for rank in events]
