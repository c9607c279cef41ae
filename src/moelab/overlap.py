"""Overlap in an expert-parallel block: two micro-batches, one's all-to-all in flight while the other computes.

A transformer block whose MoE layer is expert-parallel alternates computation and communication: attention and
routing (compute) → the counts and the dispatch all-to-all → the local experts (compute) → the combine all-to-all
→ the weighted sum (compute). In that order every all-to-all stops the rank. Cut the batch into micro-batches and
interleave them: while A's rows travel, B's attention runs; while B's rows travel, A's experts run. DeepSeek-V3
does this between the forward chunk of one micro-batch and the backward chunk of another (§3.2.1, its figure 4);
here the same idea runs within one step's forward and within its backward.

To run pieces of two micro-batches in any order, each compute piece is its own autograd graph on detached
inputs, and its backward runs when the schedule says, with the gradients the communication brought
(``torch.autograd.backward(outputs, grads)``, as DualPipe runs its chunks). The all-to-alls are posted rounds
(:mod:`moelab.rounds`: one round to all peers at once, queued behind the rounds before it), so on an emulated network
their time runs while the rank computes. :func:`block_step` is one forward and backward of the block, equal in
outputs and every gradient to the block's own forward and ``backward`` on the same micro-batches
(tests/test_overlap.py).

Shapes: a micro-batch ``x`` is ``(b, T, d_model)``; its ``N = b·T·k`` (token, expert) assignments leave as rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .dispatch import assignments, combine, grouped_experts, permute
from .model import Block
from .network import Network
from .rounds import Round, post


def post_all_to_all(x: torch.Tensor, out: torch.Tensor, send: list[int], recv: list[int],
                    net: Network | None) -> Round:
    """Post an all-to-all of ``x``'s rows into ``out`` (``send[j]`` rows to rank ``j``, ``recv[j]`` from it) as one
    round: the rows for this rank are copied, every other peer's sent and received at once, as DeepEP's kernels
    talk to all peers together (on ``net``, each peer over its own link, so the round lasts as long as the
    slowest of them). Wait for the round returned."""
    p, r = dist.get_world_size(), dist.get_rank()
    outgoing, incoming = list(x.split(send)), list(out.split(recv))
    incoming[r].copy_(outgoing[r])
    peers = [j for j in range(p) if j != r]
    return post([(j, outgoing[j]) for j in peers], [(j, incoming[j]) for j in peers], net)


@dataclass
class MicroBatch:
    """One micro-batch's pieces in flight: its input and its output's gradient, what each compute piece saved for
    its backward (inputs made leaves, outputs), the routing bookkeeping, the rounds posted and not yet waited for
    (and what they carry), its output and its input's gradient."""

    x: torch.Tensor
    grad_y: torch.Tensor | None = None
    saved: dict = field(default_factory=dict)
    token: torch.Tensor | None = None
    send: list[int] = field(default_factory=list)
    recv: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None
    buffer: torch.Tensor | None = None
    round: Round | None = None
    sending: str = ""
    y: torch.Tensor | None = None
    x_grad: torch.Tensor | None = None


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


class OverlappedBlock:
    """A :class:`~moelab.model.Block` with an expert-parallel MoE (:func:`moelab.ep.shard`) run as pieces, for
    :func:`block_step`. ``net``: the emulated network its all-to-alls cross (None: plain loopback)."""

    def __init__(self, block: Block, cos: torch.Tensor, sin: torch.Tensor, net: Network | None = None):
        moe = block.ffn
        if not getattr(moe, "expert_parallel", False):
            raise ValueError("OverlappedBlock: block.ffn is not an expert-parallel MoE layer; allowed: a block whose "
                             "MoE was sharded with moelab.ep.shard")
        self.block, self.moe, self.cos, self.sin, self.net = block, moe, cos, sin, net
        self.world = dist.get_world_size()
        self.E, self.E_local = moe.config.n_routed_experts, moe.experts.n_experts

    # forward pieces: compute pieces return nothing, communication pieces post rounds
    def attention(self, mb: MicroBatch) -> None:
        x = _leaf(mb.x)
        h = x + self.block.attn(self.block.attn_norm(x), self.cos, self.sin)
        rows = self.block.ffn_norm(h).flatten(0, -2)
        routing = self.moe.router(rows)
        aux = self.moe.balance_loss(routing, x.shape[:-1])
        token, expert, weight = assignments(routing)
        order, _ = permute(token, expert, self.E)
        mb.token, expert, weight = token[order], expert[order], weight[order]
        mb.counts = torch.bincount(expert, minlength=self.E).view(self.world, self.E_local)
        sent = rows.index_select(0, mb.token)
        shared = self.moe.shared(rows) if self.moe.shared is not None else torch.zeros_like(rows)
        mb.saved["attention"] = ([x], [h, sent, weight, shared, aux])

    def post_dispatch(self, mb: MicroBatch) -> None:
        """Exchange the row counts (a small round, waited for: the rows' buffers need them), then post the rows."""
        counts = torch.empty_like(mb.counts)
        post_all_to_all(mb.counts, counts, [1] * self.world, [1] * self.world, self.net).wait()
        mb.send, mb.recv, mb.counts = mb.counts.sum(1).tolist(), counts.sum(1).tolist(), counts
        sent = mb.saved["attention"][1][1].detach()
        mb.buffer = sent.new_empty((sum(mb.recv), sent.shape[1]))
        mb.round, mb.sending = post_all_to_all(sent, mb.buffer, mb.send, mb.recv, self.net), "dispatch"

    def experts(self, mb: MicroBatch) -> None:
        rows = _leaf(mb.buffer)
        local = torch.arange(self.E_local).repeat(self.world).repeat_interleave(mb.counts.flatten())
        if rows.shape[0]:
            out = grouped_experts(rows, torch.arange(rows.shape[0]), local, rows.new_ones(rows.shape[0]),
                                  self.moe.experts)
        else:
            out = self.moe.experts.expert(0, rows)  # nothing came: the experts still get a (zero) gradient
        mb.saved["experts"] = ([rows], [out])

    def post_combine(self, mb: MicroBatch) -> None:
        out = mb.saved["experts"][1][0].detach()
        mb.buffer = out.new_empty((sum(mb.send), out.shape[1]))
        mb.round, mb.sending = post_all_to_all(out, mb.buffer, mb.recv, mb.send, self.net), "combine"

    def output(self, mb: MicroBatch) -> None:
        h, _, weight, shared, _ = (_leaf(t) for t in mb.saved["attention"][1])
        back = _leaf(mb.buffer)
        routed = combine(shared, mb.token, back * weight[:, None])
        mb.y = h + (routed + shared).view_as(h)
        mb.saved["output"] = ([h, weight, shared, back], [mb.y])

    # backward pieces
    def output_backward(self, mb: MicroBatch) -> None:
        (h, weight, shared, back), (y,) = mb.saved["output"]
        torch.autograd.backward([y], [mb.grad_y])
        mb.saved["output grads"] = (h.grad, weight.grad, shared.grad)
        mb.buffer = back.grad.new_empty((sum(mb.recv), back.shape[1]))
        mb.round, mb.sending = post_all_to_all(back.grad, mb.buffer, mb.send, mb.recv, self.net), "combine backward"

    def experts_backward(self, mb: MicroBatch) -> None:
        (rows,), (out,) = mb.saved.pop("experts")
        torch.autograd.backward([out], [mb.buffer])
        mb.buffer = rows.grad.new_empty((sum(mb.send), rows.shape[1]))
        mb.round, mb.sending = post_all_to_all(rows.grad, mb.buffer, mb.recv, mb.send, self.net), "dispatch backward"

    def attention_backward(self, mb: MicroBatch) -> None:
        (x,), (h, sent, weight, shared, aux) = mb.saved.pop("attention")
        gh, gweight, gshared = mb.saved.pop("output grads")
        pairs = [(h, gh), (sent, mb.buffer), (weight, gweight), (shared, gshared), (aux, torch.ones_like(aux))]
        pairs = [(t, g) for t, g in pairs if t.requires_grad]
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        mb.saved.clear()
        mb.x_grad = x.grad


@dataclass
class StepTimes:
    """What :func:`block_step` measured on this rank: ``(piece, start, end)`` of each compute piece and of each
    all-to-all (its round's begin and end on the emulated network), in seconds from
    the step's start, and the step's length."""

    compute: list[tuple[str, float, float]]
    comm: list[tuple[str, float, float]]
    seconds: float


ORDERS = ("in turn", "overlapped", "F&B pairs")


def block_step(blocks: OverlappedBlock | list[OverlappedBlock], xs: list[torch.Tensor], grads: list[torch.Tensor],
               order: str = "overlapped") -> tuple[list[torch.Tensor], list[torch.Tensor], StepTimes]:
    """One forward and backward of a block, or of blocks one after another, on micro-batches ``xs``, with
    ``grads`` the gradients of the last block's outputs, the pieces in ``order`` (:data:`ORDERS`):

    - ``"in turn"``: each micro-batch's forward and backward pieces in turn, waiting for each all-to-all;
    - ``"overlapped"``: all forwards, then all backwards, piece by piece across the micro-batches (A's attention,
      then B's while A's rows travel, …);
    - ``"F&B pairs"``: A's forward; then B's forward piece by piece with A's backward, as DeepSeek-V3 pairs a
      forward chunk with a backward chunk (figure 4) — the forward's all-to-alls outweigh its computation and the
      backward's computation outweighs its all-to-alls, so each hides the other's; then B's backward (with more
      micro-batches, forward ``i + 1`` with backward ``i``).

    Between two blocks, a block's output and the next one's attention are one piece, so one micro-batch's combine
    travels while the other's next attention runs. Returns the last block's outputs, the gradients of the first
    block's inputs, and the times. Parameter gradients accumulate in the blocks."""
    if order not in ORDERS:
        raise ValueError(f"order = {order!r} is not allowed; allowed: {', '.join(map(repr, ORDERS))}")
    blocks = [blocks] if isinstance(blocks, OverlappedBlock) else list(blocks)
    if len(xs) != len(grads) or not xs or not blocks:
        raise ValueError(f"{len(xs)} micro-batches, {len(grads)} gradients and {len(blocks)} blocks; allowed: one "
                         f"gradient per micro-batch, at least one micro-batch and one block")
    net, L = blocks[0].net, len(blocks)
    clock = net.now if net is not None else time.perf_counter
    mbs = [[MicroBatch(x if b == 0 else None, g if b == L - 1 else None) for x, g in zip(xs, grads)]
           for b in range(L)]                                                 # mbs[block][micro-batch]
    compute, comm = [], []
    start = clock()

    def name(piece: str, b: int, i: int) -> str:
        return f"{piece}{f' {b}' if L > 1 else ''} {i}"

    def wait(i: int) -> None:
        for b in range(L):
            mb = mbs[b][i]
            if mb.round is not None:
                mb.round.wait()
                if net is not None:
                    comm.append((name(mb.sending, b, i), mb.round.begin - start, mb.round.end - start))
                mb.round = None

    def attention(b: int, i: int) -> None:
        if b:                                       # the previous block's output, then this block's attention
            blocks[b - 1].output(mbs[b - 1][i])
            mbs[b][i].x = mbs[b - 1][i].y.detach()
        blocks[b].attention(mbs[b][i])

    def attention_backward(b: int, i: int) -> None:
        blocks[b].attention_backward(mbs[b][i])
        if b:                                       # and the previous block's output backward (posts its combine's)
            mbs[b - 1][i].grad_y = mbs[b][i].x_grad
            blocks[b - 1].output_backward(mbs[b - 1][i])

    forward = [p for b in range(L) for p in (("attention", b, attention, "post_dispatch"),
                                             ("experts", b, lambda b, i: blocks[b].experts(mbs[b][i]),
                                              "post_combine"))]
    forward.append(("output", L - 1, lambda b, i: blocks[b].output(mbs[b][i]), None))
    backward = [("output backward", L - 1, lambda b, i: blocks[b].output_backward(mbs[b][i]), None)]
    backward += [p for b in reversed(range(L)) for p in (
        ("experts backward", b, lambda b, i: blocks[b].experts_backward(mbs[b][i]), None),
        ("attention backward", b, attention_backward, None))]
    n = len(xs)
    if order == "in turn":
        steps = [(pieces, k, i) for pieces in (forward, backward) for i in range(n) for k in range(len(pieces))]
    elif order == "overlapped":
        steps = [(pieces, k, i) for pieces in (forward, backward) for k in range(len(pieces)) for i in range(n)]
    else:
        steps = [(forward, k, 0) for k in range(len(forward))]
        for i in range(1, n):
            for k in range(max(len(forward), len(backward))):
                steps += [(forward, k, i)] if k < len(forward) else []
                steps += [(backward, k, i - 1)] if k < len(backward) else []
        steps += [(backward, k, n - 1) for k in range(len(backward))]
    for pieces, k, i in steps:
        piece, b, run, posts = pieces[k]
        wait(i)
        t0 = clock()
        run(b, i)
        compute.append((name(piece, b, i), t0 - start, clock() - start))
        if posts is not None:
            getattr(blocks[b], posts)(mbs[b][i])
    for i in range(len(xs)):
        wait(i)
    return ([mb.y.detach() for mb in mbs[-1]], [mb.x_grad for mb in mbs[0]],
            StepTimes(compute, comm, clock() - start))
