"""A replica killed mid-step, the survivors going on, its restart healed from a peer: torchft 0.2.0 on CPU and gloo.

Our fragmented-cluster chapter kills a rank by hand; torchft (PyTorch's fault-tolerance library) is the production
system that lets data-parallel training outlive one. Its pieces:

* the **Lighthouse** (Rust; ``LighthouseServer``, here inside the caller) forms a *quorum* whenever the replicas
  ask, once per step: the replica groups that take part in it. It answers at once when every member of the last
  quorum has asked again (a "fast quorum", which also admits any newcomer that has asked by then). Otherwise it
  needs ``min_replicas`` and more than half of the replicas that heartbeat, and waits up to ``join_timeout_ms``
  for those that heartbeat but have not asked; a replica silent for ``heartbeat_timeout_ms`` no longer counts;
* each replica group's **Manager** (a Rust server and Python) asks for the quorum and, when its members changed,
  **reconfigures** its process group (``ProcessGroupGloo``) for them, on a new store prefix per quorum;
* a replica whose step count is behind the quorum's highest **heals**: the quorum names an up-to-date peer (the
  first in replica-id order, round-robin when several heal), which serves its state dict over its **HTTP
  checkpoint transport** — the model's and optimizer's state (and DiLoCo's global weights and outer optimizer),
  plus torchft's step counters — and the newcomer loads it and takes the peer's step number;
* **should_commit** ends a step: a replica whose all-reduce failed (its peer died: gloo's "Connection reset by
  peer") votes no, skips the optimizer step and retries the step, same data, in the next quorum.

:func:`run_with_failure` runs ``replicas`` processes (each a replica group of one rank, started by
:func:`moelab.dist.rank_context`) that train a tiny MLP, a step being one all-reduce of the gradients
(``Manager.allreduce``, DDP-style) or, with ``sync_every`` > 1, torchft's ``DiLoCo`` (inner Adam steps, then an
all-reduce of the pseudo-gradients and an outer Nesterov step). One replica kills itself with SIGKILL after its
(last) backward in step ``kill_at_step``. DDP-style, its peers are in that step's quorum, waiting for its
gradients: their step fails and is retried in a smaller quorum; with DiLoCo the replicas meet only at the sync,
which it never reaches, so the next quorum simply forms without it and no step fails. Once the survivors have
committed ``down_steps`` steps without it, a fresh process with the same replica id starts, heals from a peer
(with DiLoCo, at its first sync, after inner steps on its own weights) and trains to the end.
:func:`run_without_failure` is the same run with nobody dying. Every replica ends at the same step count; what the
failure costs is the batches the missing replica did not contribute.

Ran on this CPU with gloo (torch 2.13): the Lighthouse, the Manager over ``ProcessGroupGloo`` with synchronous and
asynchronous quorums, ``Manager.allreduce`` and torchft's ``DistributedDataParallel`` and ``Optimizer`` wrappers,
``should_commit``, healing through ``HTTPTransport`` (whole or in chunks) and through ``PGTransport`` over gloo,
``DiLoCo`` and ``LocalSGD``. Did not run: ``ProcessGroupBabyGloo`` (gloo in a subprocess, which torchft uses to
survive a hung collective) under the Manager: every ``Manager.allreduce`` fails with "Got the following error when
running the callback: AssertionError: <EMPTY MESSAGE>" and no step commits (its future completes on another thread
after ``_ManagedWork`` has chained its callbacks, and their closure then points at the chain's tail);
``ProcessGroupGloo.reduce_scatter`` raises "ProcessGroupGloo does not support reduce_scatter." (torchft's FSDP/HSDP
path needs it); the NCCL and XCCL process groups, quantized all-reduce (Triton) and recovery on a CUDA stream need
a GPU. ``import torchft`` needs OpenTelemetry (``opentelemetry-api``, ``-sdk``, ``-exporter-otlp-proto-http``;
without them: "No module named 'opentelemetry'"), though it exports nothing unless ``TORCHFT_USE_OTEL`` is set.

Two waits make every run tell the same story, whatever the load on the machine, and neither changes what torchft
decides: the first processes wait for each other before their first quorum, and the survivors wait (at most
``timeout``) at step ``kill_at_step + down_steps`` until the restarted process has asked the Lighthouse for a
quorum (read from the Lighthouse's status page), so that it joins the very next one rather than racing the
survivors to the end of the run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import signal
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

# torchft's Rust core logs every quorum at INFO on stderr, which a notebook shows; it reads RUST_LOG once, when
# torchft is first imported. Warnings and errors only, unless the caller chose a level.
os.environ.setdefault("RUST_LOG", "warn")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchft import Manager, ProcessGroupGloo  # noqa: E402
from torchft.checkpointing import HTTPTransport  # noqa: E402
from torchft.coordination import LighthouseServer  # noqa: E402
from torchft.local_sgd import DiLoCo  # noqa: E402

from moelab.dist import rank_context  # noqa: E402

FEATURES, HIDDEN, BATCH = 8, 16, 32      # the tiny MLP, and the rows each replica trains on per step
LR = 0.02                                # Adam: every step (DDP-style), or DiLoCo's inner steps
# DiLoCo's outer Nesterov SGD. The paper's momentum 0.9 suits hundreds of inner steps per sync; over a dozen syncs
# of a few inner steps it overshoots (held-out loss 0.86 after 12 syncs of 3, against 0.15 with 0.5).
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.5
# The Lighthouse waits up to JOIN_TIMEOUT_MS for replicas that heartbeat but have not asked for the quorum (torchft's
# in-process default is 100 ms, its command-line lighthouse's 60 s): long enough that the first quorum holds every
# replica on a loaded 2-core machine. A replica silent for HEARTBEAT_TIMEOUT_MS is dead to it (default 5 s): the
# survivors of a death wait that long for their next quorum.
JOIN_TIMEOUT_MS, HEARTBEAT_TIMEOUT_MS = 5000, 1000
STATUS_PARTICIPANTS = re.compile(r"\[(\d+)/\d+ participants healthy\]")   # on the Lighthouse's /status page


@dataclass(frozen=True)
class Settings:
    """One run: ``replicas`` replica groups of one rank train until torchft's step count reaches ``steps``;
    ``sync_every`` = 1 all-reduces gradients every step, > 1 is DiLoCo (one torchft step per ``sync_every`` inner
    steps). Replica ``kill_replica`` (None: nobody) dies in step ``kill_at_step`` and restarts after the survivors
    committed ``down_steps`` steps without it. ``timeout`` (seconds) bounds the whole run, and so every
    collective, RPC, wait and join in it."""

    replicas: int
    steps: int
    sync_every: int
    seed: int
    timeout: float
    kill_replica: int | None = None
    kill_at_step: int = 0
    down_steps: int = 0

    def check(self) -> None:
        """Reject settings the run cannot show: too few replicas to survive one, a kill too late to rejoin."""
        if self.replicas < 2:
            raise ValueError(f"replicas = {self.replicas} is not allowed; allowed: 2 or more")
        if self.sync_every < 1:
            raise ValueError(f"sync_every = {self.sync_every} is not allowed; allowed: 1 (DDP-style) or more (DiLoCo)")
        if not self.timeout > 0:
            raise ValueError(f"timeout = {self.timeout!r} is not allowed; allowed: seconds > 0")
        if self.kill_replica is not None:
            if not 0 <= self.kill_replica < self.replicas:
                raise ValueError(f"kill_replica = {self.kill_replica} is not allowed; allowed: 0 to "
                                 f"{self.replicas - 1}")
            if self.down_steps < 1 or self.kill_at_step < 0 or self.rejoin_at >= self.steps:
                raise ValueError(f"kill_at_step = {self.kill_at_step}, down_steps = {self.down_steps}, steps = "
                                 f"{self.steps}: allowed down_steps >= 1 and kill_at_step + down_steps < steps, "
                                 "so that the restarted replica rejoins before the end")

    @property
    def rejoin_at(self) -> int:
        """The step at which the survivors wait for the restarted replica to ask for a quorum."""
        return self.kill_at_step + self.down_steps


def _digest(state: Any) -> str:
    """SHA-256 of a nested state (dicts, lists, tensors, numbers) in order: equal digests are equal bytes."""
    h = hashlib.sha256()

    def feed(tree: Any) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                h.update(repr(key).encode())
                feed(value)
        elif isinstance(tree, (list, tuple)):
            for value in tree:
                feed(value)
        elif isinstance(tree, torch.Tensor):
            h.update(tree.detach().contiguous().numpy().tobytes())
        else:
            h.update(repr(tree).encode())

    feed(state)
    return h.hexdigest()


def _keys(tree: Any) -> Any:
    """The nested keys of a state dict, a tensor shown as its shape: what a healing replica is sent."""
    if isinstance(tree, dict):
        return {str(k): _keys(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_keys(v) for v in tree]
    return list(tree.shape) if isinstance(tree, torch.Tensor) else type(tree).__name__


class _RecordingTransport(HTTPTransport):
    """torchft's HTTP checkpoint transport, noting what it served (and the digest of our part of it) and what it
    fetched from where."""

    def __init__(self, timeout: timedelta) -> None:
        super().__init__(timeout=timeout, num_chunks=0)
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
        self.sent.append({"to_ranks": list(dst_ranks), "step": step, "state": _digest(state_dict["user"]["default"])})
        super().send_checkpoint(dst_ranks, step, state_dict, timeout)

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
        state = super().recv_checkpoint(src_rank, metadata, step, timeout)
        self.received.append({"address": metadata, "step": step, "keys": _keys(state)})
        return state

    def take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """What was sent and received since the last call."""
        sent, received = self.sent, self.received
        self.sent, self.received = [], []
        return sent, received


def _batch(seed: int, replica: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ``replica``'s rows number ``index`` (replica -1: the held-out rows), so that a failed step retries
    the same rows. The target is a fixed random tanh layer, the same for every replica."""
    weight = torch.randn(FEATURES, FEATURES, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + (replica + 1) * 10_007 + index))
    return x, torch.tanh(x @ weight)


class _Replica:
    """One replica group of one rank: the model, its optimizer(s) and a torchft Manager over a reconfigurable
    gloo group. Its first weights differ from every other process's, so that only torchft makes them equal."""

    def __init__(self, replica: int, life: int, settings: Settings, lighthouse: str) -> None:
        self.replica, self.settings = replica, settings
        wait_for = timedelta(seconds=settings.timeout)
        torch.manual_seed(settings.seed * 100 + replica * 10 + life)
        self.model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, FEATURES))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.transport = _RecordingTransport(wait_for)
        self.store = torch.distributed.TCPStore("localhost", 0, is_master=True, wait_for_workers=False,
                                                timeout=wait_for)   # this replica group's own store
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=wait_for), load_state_dict=self.load_state_dict,
            state_dict=self.state_dict, min_replica_size=settings.replicas - 1, use_async_quorum=False,
            replica_id=f"replica_{replica}", store_addr="localhost", store_port=self.store.port, rank=0,
            world_size=1, lighthouse_addr=lighthouse, timeout=wait_for, quorum_timeout=wait_for,
            connect_timeout=wait_for, checkpoint_transport=self.transport)
        self.diloco: DiLoCo | None = None
        if settings.sync_every > 1:
            outer = torch.optim.SGD(self.model.parameters(), lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
            self.diloco = DiLoCo(self.manager, [self.model], self.optimizer, outer, sync_every=settings.sync_every)

    def state_dict(self) -> dict[str, Any]:
        """What a healing peer is sent (DiLoCo adds its global weights and outer optimizer under its own key)."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Heal: take the peer's weights and optimizer state, and note the digest of what this replica now holds."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.transport.received[-1]["loaded_state"] = _digest(self.state_dict())

    def _loss(self, index: int) -> float:
        x, y = _batch(self.settings.seed, self.replica, index)
        self.optimizer.zero_grad()
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        return loss.item()

    def _ddp_step(self, die: bool) -> list[float]:
        """Quorum (a replica behind heals here), forward, backward, all-reduce, commit or not."""
        self.manager.start_quorum()
        loss = self._loss(self.manager.current_step())
        if die:
            os.kill(os.getpid(), signal.SIGKILL)     # mid-step: the peers wait in the all-reduce for its gradients
        for work in [self.manager.allreduce(p.grad) for p in self.model.parameters()]:
            work.wait()
        if self.manager.should_commit():
            self.optimizer.step()
        return [loss]

    def _diloco_step(self, die: bool) -> list[float]:
        """``sync_every`` inner steps; DiLoCo's hook after the last asks for the quorum (a replica behind heals
        there), all-reduces the pseudo-gradients and commits the outer step, or restores the last global weights."""
        losses = []
        for i in range(self.settings.sync_every):
            losses.append(self._loss(self.manager.current_step() * self.settings.sync_every + i))
            if die and i == self.settings.sync_every - 1:
                os.kill(os.getpid(), signal.SIGKILL)  # the peers are about to wait for its pseudo-gradients
            self.optimizer.step()
        return losses

    def step(self, die: bool) -> dict[str, Any]:
        """One torchft step, and what it showed: the step it ran as (a healed replica runs as the peer's), the
        quorum, the mean loss, the vote, the error that failed it, the checkpoints served or fetched, and the digest
        of the parameters after it."""
        before = self.manager.current_step()
        losses = self._diloco_step(die) if self.diloco else self._ddp_step(die)
        sent, received = self.transport.take()
        ran_as = received[-1]["step"] if received else before
        error = self.manager.errored()
        return {"step": ran_as, "committed": self.manager.current_step() > ran_as,
                "committed_steps": self.manager.current_step(), "quorum": self.manager.num_participants(),
                "loss": sum(losses) / len(losses),
                "error": None if error is None else str(error.original_exception).splitlines()[0],
                "sent": sent, "received": received, "params": _digest(list(self.model.parameters())),
                "at": time.time()}

    def finish(self) -> dict[str, Any]:
        """The end of the run: the step count, the batches of all replicas committed, the held-out loss."""
        x, y = _batch(self.settings.seed, -1, 0)
        with torch.no_grad():
            loss = nn.functional.mse_loss(self.model(x), y).item()
        return {"final_step": self.manager.current_step(), "batches_committed": self.manager.batches_committed(),
                "final_loss": loss, "params": _digest(list(self.model.parameters()))}


def _replica_main(replica: int, life: int, settings: Settings, lighthouse: str, out: Connection, start: Any,
                  rejoin: Any) -> None:
    """Body of one replica process (``life`` 0 the first, 1 the restarted one): sends ("hello" | "step" | "done" |
    "error", payload) to the caller. What torchft prints (tracebacks of the failed all-reduce, the checkpoint
    server's requests) is kept and sent only with an error: each step's record holds the error itself."""
    torch.set_num_threads(1)
    printed = io.StringIO()
    doomed = life == 0 and replica == settings.kill_replica
    survivor = life == 0 and settings.kill_replica not in (None, replica)
    with contextlib.redirect_stderr(printed):
        try:
            r = _Replica(replica, life, settings, lighthouse)
            out.send(("hello", {"pid": os.getpid(), "checkpoint_address": r.transport.metadata(),
                                "up_at": time.time()}))
            if life == 0:
                start.wait(settings.timeout)              # every first process is up before the first quorum
            with r.diloco or contextlib.nullcontext():    # DiLoCo's optimizer hooks
                while r.manager.current_step() < settings.steps:
                    step = r.manager.current_step()
                    if survivor and step == settings.rejoin_at and not rejoin.wait(settings.timeout):
                        raise TimeoutError(f"the restarted replica did not ask for a quorum within {settings.timeout}"
                                           " s")
                    out.send(("step", r.step(die=doomed and step == settings.kill_at_step)))
            out.send(("done", r.finish()))
            r.manager.shutdown(wait=False)
        except BaseException:  # noqa: BLE001 — everything goes back to the caller
            out.send(("error", traceback.format_exc() + printed.getvalue()))


def _asking(lighthouse: str, timeout: float) -> int:
    """How many replicas have asked the Lighthouse for the next quorum and wait for it: its status page says so
    ("[1/1 participants healthy]"); torchft 0.2.0 has no Python call for it."""
    with urllib.request.urlopen(f"{lighthouse}/status", timeout=timeout) as page:
        found = STATUS_PARTICIPANTS.search(page.read().decode())
    if found is None:
        raise RuntimeError(f"the Lighthouse's status page at {lighthouse}/status no longer shows its participants")
    return int(found[1])


class _Run:
    """The processes of one run and what each has reported, keyed by (replica, life)."""

    def __init__(self, settings: Settings, lighthouse: str) -> None:
        self.settings, self.lighthouse = settings, lighthouse
        self.ctx = rank_context()
        self.start = self.ctx.Barrier(settings.replicas)
        self.rejoin = self.ctx.Event()  # set once the restarted replica waits for a quorum
        self.processes: dict[tuple[int, int], Any] = {}
        self.pipes: dict[Connection, tuple[int, int]] = {}
        self.lives: dict[tuple[int, int], dict[str, Any]] = {}
        self.began = time.time()         # the processes' clock readings become seconds since the run began

    def launch(self, replica: int, life: int) -> None:
        receiver, sender = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_replica_main, daemon=True, args=(
            replica, life, self.settings, self.lighthouse, sender, self.start, self.rejoin))
        p.start()
        self.processes[replica, life] = p
        sender.close()                   # the child holds the only writer: its end closes the pipe
        self.pipes[receiver] = (replica, life)
        self.lives[replica, life] = {"replica": replica, "life": life, "steps": [], "final": None}

    def receive(self, timeout: float) -> None:
        """Take what arrives within ``timeout`` seconds; a closed pipe means its process has ended."""
        for conn in wait(list(self.pipes), timeout):
            key = self.pipes[conn]
            life = self.lives[key]
            try:
                kind, payload = conn.recv()
            except EOFError:
                del self.pipes[conn]
                conn.close()
                self.processes[key].join(self.settings.timeout)
                life["exitcode"] = self.processes[key].exitcode
                continue
            if kind == "error":
                raise RuntimeError(f"replica {key[0]} (life {key[1]}) failed:\n{payload}")
            if kind == "hello":
                life.update(payload, up_at=payload["up_at"] - self.began)
            elif kind == "step":
                life["steps"].append(dict(payload, at=payload["at"] - self.began))
            else:
                life["final"] = payload

    def survivors_wait(self) -> bool:
        """Every survivor has committed up to step ``rejoin_at`` and now waits there, asking nothing."""
        s = self.settings
        return s.kill_replica is not None and all(
            self.lives[i, 0]["steps"] and self.lives[i, 0]["steps"][-1]["committed_steps"] == s.rejoin_at
            for i in range(s.replicas) if i != s.kill_replica)

    def restart_when_due(self) -> None:
        """Once the survivors wait, start the killed replica again; once it has asked the Lighthouse for a quorum
        (nobody else is asking), let the survivors ask too, so that the quorum they form holds it."""
        if self.rejoin.is_set() or not self.survivors_wait():
            return
        if (self.settings.kill_replica, 1) not in self.lives:
            self.launch(self.settings.kill_replica, 1)
        elif _asking(self.lighthouse, self.settings.timeout) > 0:
            self.rejoin.set()

    def progress(self) -> str:
        """Where each process is: for a run that did not end."""
        return "; ".join(f"replica {r} life {life}: {len(report['steps'])} steps reported, exit code "
                         f"{report.get('exitcode')}" for (r, life), report in sorted(self.lives.items()))

    def stop(self) -> None:
        """Kill every process still alive and reap them all."""
        for p in self.processes.values():
            if p.is_alive():
                p.kill()
        for p in self.processes.values():
            p.join(self.settings.timeout)
        for conn in self.pipes:
            conn.close()

    def check_ends(self) -> None:
        """Every process reported its end, except the one killed on purpose (by SIGKILL)."""
        for (replica, life), report in self.lives.items():
            killed = replica == self.settings.kill_replica and life == 0
            if report["final"] is None and not (killed and report.get("exitcode") == -signal.SIGKILL):
                raise RuntimeError(f"replica {replica} (life {life}) ended with exit code {report.get('exitcode')} "
                                   "without reporting (crashed in native code?)")


def _heals(lives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every checkpoint a replica fetched: from which replica, at which step, and whether what it then held equals,
    byte for byte, the weights and optimizer state that replica served."""
    by_address = {life["checkpoint_address"]: life for life in lives}
    heals = []
    for life in lives:
        for got in (got for record in life["steps"] for got in record["received"]):
            source = by_address[got["address"]]
            served = {s["state"] for record in source["steps"] for s in record["sent"] if s["step"] == got["step"]}
            heals.append({"replica": life["replica"], "life": life["life"], "step": got["step"],
                          "from_replica": source["replica"], "state_equal": served == {got.get("loaded_state")},
                          "keys": got["keys"]})
    return heals


def _run(settings: Settings) -> dict[str, Any]:
    """The Lighthouse here, the replicas in processes, the restart when its time comes; everything stopped at the
    end, whatever happened."""
    settings.check()
    began = time.perf_counter()
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=settings.replicas - 1,
                                  join_timeout_ms=JOIN_TIMEOUT_MS, heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS)
    run = _Run(settings, lighthouse.address())
    try:
        for replica in range(settings.replicas):
            run.launch(replica, 0)
        deadline = time.monotonic() + settings.timeout
        while run.pipes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run did not end within timeout = {settings.timeout} s ({run.progress()}); "
                                   "all its processes were killed")
            run.receive(0.05)
            run.restart_when_due()
        run.check_ends()
    finally:
        run.stop()
        lighthouse.shutdown()
    lives = sorted(run.lives.values(), key=lambda life: (life["replica"], life["life"]))
    return {"settings": asdict(settings), "wall_time": time.perf_counter() - began,
            "replicas": [[life for life in lives if life["replica"] == r] for r in range(settings.replicas)],
            "heals": _heals(lives)}


def run_with_failure(replicas: int = 3, steps: int = 12, kill_replica: int = 1, kill_at_step: int = 4,
                     down_steps: int = 3, sync_every: int = 1, seed: int = 0, timeout: float = 60.0) -> dict[str, Any]:
    """Train ``replicas`` torchft replicas until torchft's step count reaches ``steps``; replica ``kill_replica``
    dies by SIGKILL in step ``kill_at_step`` (after its last backward, before its all-reduce) and a fresh process
    with its replica id starts once the survivors have committed ``down_steps`` steps without it, heals from a peer
    and trains to the end. ``sync_every`` > 1 trains with torchft's DiLoCo (a step is then ``sync_every`` inner
    steps and a sync).
    ``timeout`` (seconds) bounds the whole run and every collective, RPC and wait in it; every process is killed
    and reaped before this returns or raises.

    Returns ``{"settings", "wall_time", "replicas", "heals"}``: ``replicas[r]`` lists replica ``r``'s processes
    ("lives"), each ``{"replica", "life", "pid", "exitcode", "checkpoint_address", "up_at", "steps", "final"}``.
    Each entry of ``steps`` is one attempted step: ``step`` (torchft's step it ran as), ``committed``,
    ``committed_steps`` (``Manager.current_step()`` after it), ``quorum`` (replicas taking part), ``loss`` (mean
    over its inner steps), ``error`` (why the step failed), ``sent``/``received`` (checkpoints served or fetched),
    ``params`` (SHA-256 of the weights after it) and ``at`` (when it ended; ``up_at`` and ``at`` are seconds since
    the run began).
    ``final`` holds ``final_step``, ``batches_committed``, ``final_loss`` (held-out rows) and ``params``; None for
    the killed process. ``heals`` lists each checkpoint fetched: ``replica``, ``life``, ``step``, ``from_replica``,
    ``state_equal`` (the healed weights and optimizer state equal what the peer served, bit for bit) and ``keys``
    (the state dict's structure)."""
    return _run(Settings(replicas, steps, sync_every, seed, timeout, kill_replica, kill_at_step, down_steps))


def run_without_failure(replicas: int = 3, steps: int = 12, sync_every: int = 1, seed: int = 0,
                        timeout: float = 60.0) -> dict[str, Any]:
    """:func:`run_with_failure` with nobody dying: the same data, seeds and settings, one life per replica."""
    return _run(Settings(replicas, steps, sync_every, seed, timeout))
