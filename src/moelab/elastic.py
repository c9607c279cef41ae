"""Training that survives a replica dying: a quorum per outer step, a commit vote, and healing from a peer.

One process group for the whole job, as :func:`moelab.dist.launch` makes, dies with its first member: gloo and NCCL
fail every collective once a peer is gone. Fault-tolerant training (torchft's design: Lighthouse, Manager,
reconfigurable process group) instead forms a **quorum** of the replicas alive at each synchronisation and builds a
fresh process group for just those:

- **Membership.** At round ``r`` every replica writes that it joined. The replicas expected are the last quorum's
  members and any replica the supervisor has (re)started since, less those it saw die (a scheduler notices a
  dead process, as torchft's Lighthouse notices missing heartbeats). A replica that is starting is waited for
  (within the job's ``timeout``): it is known to be on its way. A member that is alive but silent (hung) is waited
  for at most ``join_timeout`` seconds; then the others go on without the missing ones —
  the job *shrinks* rather than stopping, because waiting for a machine that may never return wastes every
  survivor's time, and a DiLoCo average over fewer replicas is still a valid outer step. The first replica to
  decide writes the member list with ``compare_set``; everyone reads that one, so all agree even if they saw
  different joins.
- **Commit vote.** A round's result is applied only if every member reports its collectives succeeded; the first
  decision written wins again. A replica that dies inside a collective makes the others' collectives fail: no one
  commits, and they retry the same step in the next round — nothing committed is lost, and nothing half-done is
  committed.
- **Healing.** A replica that comes back has no state: it joins the next round, contributes nothing to the
  average, and then receives from the lowest-numbered up-to-date member the current weights and optimizer state
  (torchft sends them over HTTP; here a broadcast on the round's group) and trains on from there.

Known limits, kept for a short course run: the heal is not voted on (a source that dies while sending fails the
job with its traceback), and each round's process group is dropped, not destroyed, when the next one is built
(fine for tens of rounds; a long run would destroy them).

:func:`run_replicas` is the supervisor (a cluster scheduler's part): it starts every replica as a process,
restarts one that dies (up to ``restarts`` times), and stops and reaps them all within ``timeout``. The replicas
meet at a store the supervisor serves. Built in notebooks/11_fragmented_clusters.ipynb.
"""
from __future__ import annotations

import datetime
import io
import queue as queue_module
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import sendable
from .dist import RankError, rank_context, rendezvous, stop_processes


@dataclass
class Round:
    """One round's quorum on this replica: its ``number``, the ``members`` (replica ids, ascending), this
    replica's ``index`` among them, each member's committed ``steps`` when it joined (−1: no state), and the
    round's process group (its collectives wait for a peer at most ``join_timeout``)."""

    number: int
    members: list[int]
    index: int
    steps: dict[int, int]
    group: dist.ProcessGroup | None

    @property
    def source(self) -> int:
        """The index of the lowest-numbered member holding the most committed steps: where healing comes from."""
        best = max(self.steps.values())
        return self.members.index(min(m for m in self.members if self.steps[m] == best))


@dataclass
class Membership:
    """A replica's view of the job's membership, kept in the shared ``store``: ``replica`` (its id, of
    ``replicas``), its ``incarnation`` (0, then 1 after a restart, …), how long to wait for an expected replica
    (``join_timeout``) and for any decision (``timeout``)."""

    store: dist.Store
    replica: int
    replicas: int
    incarnation: int
    join_timeout: float
    timeout: float
    round: int = -1
    log: list[tuple[str, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.incarnation > 0:                     # back from the dead: start after the last decided round
            self.round = int(self.store.add("round", 0)) - 1

    def _get(self, key: str, default: str) -> str:
        return self.store.get(key).decode() if self.store.check([key]) else default

    def _expected(self, number: int) -> tuple[set[int], set[int]]:
        """The last quorum's members, and whoever the supervisor (re)started since it was last a member (known to be
        on its way), less those known dead."""
        previous = self._get(f"quorum/{number - 1}", "")
        members = {int(m) for m in previous.split(",") if m}
        starting = {r for r in range(self.replicas)
                    if int(self._get(f"hello/{r}", "-1")) > int(self._get(f"seen/{r}", "-1"))}
        alive = {r for r in range(self.replicas) if self._get(f"alive/{r}", "1") == "1"}
        return members & alive, starting & alive

    def _decide(self, key: str, propose: Callable[[], str], may_propose: bool) -> str:
        deadline = time.monotonic() + self.timeout
        while not self.store.check([key]):
            value = propose() if may_propose else ""
            if value:
                self.store.compare_set(key, "", value)
            elif time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.replica}: no decision on {key} within timeout = {self.timeout} s")
            time.sleep(0.005)
        return self.store.get(key).decode()

    def join(self, steps: int) -> Round:
        """Join the next round with ``steps`` committed (−1: none) and return its quorum; a replica left out (it
        joined after the decision) joins the round after."""
        while True:
            self.round += 1
            number, begin = self.round, time.time()
            self.store.set(f"join/{number}/{self.replica}", str(steps))
            deadline = time.monotonic() + self.join_timeout

            def joined() -> list[int]:
                return [r for r in range(self.replicas) if self.store.check([f"join/{number}/{r}"])]

            def propose() -> str:       # everyone expected is in, or the wait for silent members is over
                in_ = joined()
                members, starting = self._expected(number)
                missing = (members | starting) - set(in_)
                if not missing or (time.monotonic() > deadline and not missing & starting):
                    return ",".join(map(str, in_))
                return ""

            members = [int(m) for m in self._decide(f"quorum/{number}", propose, steps >= 0).split(",")]
            if self.replica not in members:
                continue
            if self.replica == members[0]:
                for m in members:
                    self.store.set(f"seen/{m}", self._get(f"hello/{m}", "0"))
                self.store.add("round", 1)
            counts = {m: int(self.store.get(f"join/{number}/{m}")) for m in members}
            group = dist.ProcessGroupGloo(dist.PrefixStore(f"group/{number}/", self.store),
                                          members.index(self.replica), len(members),
                                          datetime.timedelta(seconds=self.join_timeout))
            self.log.append(("quorum", begin, time.time()))
            return Round(number, members, members.index(self.replica), counts, group)

    def commit(self, round_: Round, ok: bool) -> bool:
        """Vote on the round: ``True`` when every member voted ok before any vote went missing for
        ``join_timeout`` seconds (a member that died). The first decision written stands for all."""
        self.store.set(f"vote/{round_.number}/{self.replica}", "1" if ok else "0")
        keys = [f"vote/{round_.number}/{m}" for m in round_.members]
        deadline = time.monotonic() + self.join_timeout

        def propose() -> str:
            votes = [self.store.get(k).decode() if self.store.check([k]) else None for k in keys]
            if "0" in votes or (None in votes and time.monotonic() > deadline):
                return "no"
            return "yes" if None not in votes else ""

        if not ok:                                   # close this rank's end: a peer still inside the collective
            round_.group = None                      # sees the connection drop instead of waiting it out
        return self._decide(f"commit/{round_.number}", propose, True) == "yes"


def send_state(state: dict[str, Any], round_: Round) -> dict[str, Any]:
    """The source member's ``state`` (tensors and plain containers) on every member of the round: serialised,
    its length then its bytes broadcast on the round's group. Others' ``state`` is ignored."""
    mine = round_.index == round_.source
    payload = torch.empty(0, dtype=torch.uint8)
    if mine:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    round_.group.broadcast(size, round_.source).wait()
    if not mine:
        payload = torch.empty(int(size), dtype=torch.uint8)
    round_.group.broadcast(payload, round_.source).wait()
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)


def _replica_main(blob: bytes, replica: int, replicas: int, incarnation: int, port: int, join_timeout: float,
                  timeout: float, out: Any) -> None:
    """Body of a replica process: meet at the supervisor's store, run the function, report back."""
    torch.set_num_threads(1)
    sources = {}
    try:
        fn, args, sources = sendable.unpack(blob)
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=timeout))
        members = Membership(store, replica, replicas, incarnation, join_timeout, timeout)
        result = fn(members, *args)
        out.put(("ok", replica, sendable.result_bytes(result, _dumps), time.time()))
    except BaseException:  # noqa: BLE001 — everything a replica raises goes back to the supervisor
        out.put(("error", replica, sendable.relabel(traceback.format_exc(), sources), time.time()))


def _dumps(result: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def run_replicas(fn: Callable[..., Any], replicas: int, args: tuple = (), restarts: int = 1, down_rounds: int = 0,
                 join_timeout: float = 2.0, timeout: float = 120.0) -> tuple[list, list[tuple[int, str, float]]]:
    """Run ``fn(membership, *args)`` on ``replicas`` processes (``membership.replica``, ``.incarnation``), restart
    a replica whose process dies once the others have decided ``down_rounds`` more rounds (a machine's time to
    come back, counted in rounds so that a run is reproducible; at most ``restarts`` restarts in all) and return
    each replica's last result (``None`` for one still down when the others finished) and the events
    ``(replica, "died" | "restarted", time.time())``. Raises :class:`~moelab.dist.RankError` if a replica raises
    or dies once too often, ``TimeoutError`` after ``timeout`` seconds; no process outlives the call."""
    if not (isinstance(replicas, int) and replicas >= 2):
        raise ValueError(f"replicas = {replicas!r} is not allowed; allowed: an integer >= 2")
    for name, value in (("restarts", restarts), ("down_rounds", down_rounds)):
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"{name} = {value!r} is not allowed; allowed: an integer >= 0")
    if not 0 < join_timeout < timeout:
        raise ValueError(f"join_timeout = {join_timeout!r} is not allowed; allowed: seconds > 0 and < timeout = "
                         f"{timeout!r}")
    blob = sendable.pack(fn, tuple(args))
    ctx = rank_context()
    out = ctx.Queue()
    store = rendezvous(timeout)

    def spawn(replica: int, incarnation: int):
        store.set(f"hello/{replica}", str(incarnation))          # expected from the next round on
        store.set(f"alive/{replica}", "1")
        p = ctx.Process(target=_replica_main, daemon=True, args=(blob, replica, replicas, incarnation, store.port,
                                                                 join_timeout, timeout, out))
        p.start()
        return p

    processes = {r: spawn(r, 0) for r in range(replicas)}
    incarnations, events, results, everyone = [0] * replicas, [], {}, list(processes.values())
    down: dict[int, int] = {}                       # dead replica -> the round count at which it comes back
    try:
        deadline = time.monotonic() + timeout
        while not set(results) | set(down) >= set(range(replicas)):   # until each finished or is down
            try:
                status, replica, payload, _ = out.get(timeout=0.05)
            except queue_module.Empty:
                decided = int(store.add("round", 0))
                for r, p in processes.items():
                    if r not in results and r not in down and p.exitcode not in (None, 0):
                        events.append((r, "died", time.time()))
                        store.set(f"alive/{r}", "0")             # the others need not wait for it
                        if restarts == 0:
                            raise RankError(r, f"replica {r}'s process exited with code {p.exitcode} and no "
                                               f"restart is left (restarts = 0 remaining)") from None
                        restarts -= 1
                        down[r] = decided + down_rounds
                for r in [r for r, back in down.items() if decided >= back]:
                    del down[r]
                    incarnations[r] += 1
                    processes[r] = spawn(r, incarnations[r])
                    everyone.append(processes[r])
                    events.append((r, "restarted", time.time()))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replicas {sorted(set(range(replicas)) - set(results))} did not finish "
                                       f"within timeout = {timeout} s; all were stopped") from None
                continue
            if status == "error":
                raise RankError(replica, payload)
            results[replica] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        stop_processes(everyone)
        out.close()
    return [results.get(r) for r in range(replicas)], events
