"""Checks for notebooks/exercises/05_expert_parallelism.ipynb: what the expert-parallel all-to-all sends, where.

The first three checks run in one process: the learner's function and moelab's get the routing of every rank at
once, as the notebook's by-hand simulation does. The last is rank code, run on real gloo ranks (:mod:`.ranks`).

- :func:`check_dispatch_plan` — the order in which a rank sends its (token, expert) rows and the split per
  destination rank, against moelab's sort (:func:`moelab.dispatch.assignments`, :func:`moelab.dispatch.permute`)
  as :func:`moelab.ep.expert_parallel` uses it;
- :func:`check_expert_rows` — the rows each rank's experts process, from every rank's routing (the same plan);
- :func:`check_payload_bytes` — the bytes of one MoE layer's dispatch and combine on a rank, against
  :func:`moelab.sizing.moe_traffic`;
- :func:`check_all_to_all_backward` — rank code: the all-to-all's backward pass, the gradients sent back the
  reverse way, against the backward of :func:`moelab.exchange.all_to_all`.

Shapes: ``N`` tokens per rank, ``k`` choices per token, ``E`` experts, ``W`` ranks.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ..config import ModelConfig
from ..dispatch import assignments, permute
from ..exchange import all_to_all
from ..quant import packed_bytes
from ..router import Routing
from ..sizing import moe_traffic
from ..wire import FORMATS
from .core import Verdict, case, run_check, seeded
from .ranks import RankCase, exchange, run_rank_check, split_matrix

__all__ = ["check_dispatch_plan", "check_expert_rows", "check_payload_bytes", "check_all_to_all_backward"]


def _plan(indices: torch.Tensor, n_experts: int, world: int) -> tuple[torch.Tensor, list[int]]:
    """moelab's dispatch order (tokens sorted by expert, stably) and the rows for each rank, experts laid out in
    order: rank ``r`` holds experts ``r·E/W … (r+1)·E/W − 1`` (:func:`moelab.ep.expert_parallel`)."""
    empty = torch.empty(0)
    token, expert, _ = assignments(Routing(torch.ones(indices.shape), indices, empty, empty))
    order, ends = permute(token, expert, n_experts)
    rank_ends = ends[n_experts // world - 1::n_experts // world].long()
    return token[order], torch.diff(rank_ends, prepend=rank_ends.new_zeros(1)).tolist()


def _routing(g: torch.Generator, tokens: int, k: int, n_experts: int) -> torch.Tensor:
    """``(tokens, k)`` distinct experts per token, uniformly at random."""
    return torch.rand(tokens, n_experts, generator=g).argsort(-1)[:, :k]


# (world, experts, tokens, k): two ranks as the notebook's toy, single tokens, top-1, one expert per rank, …
SHAPES = [(2, 4, 4, 1), (2, 4, 12, 2), (4, 8, 16, 2), (4, 8, 1, 2), (3, 6, 10, 3), (2, 2, 5, 1), (4, 16, 20, 4),
          (8, 64, 32, 8), (2, 8, 7, 8), (4, 4, 6, 1)]


def _wrong_round_robin(indices: torch.Tensor, n_experts: int, world: int) -> tuple[torch.Tensor, list[int]]:
    """The right order, but splits for experts dealt to the ranks in turn (expert ``e`` on rank ``e mod W``)."""
    return _plan(indices, n_experts, world)[0], torch.bincount(indices.flatten() % world, minlength=world).tolist()


def _wrong_by_rank(indices: torch.Tensor, n_experts: int, world: int) -> tuple[torch.Tensor, list[int]]:
    """Rows sorted by destination rank only, token order kept inside a rank."""
    E_local = n_experts // world
    return _plan((indices // E_local) * E_local, n_experts, world)


def check_dispatch_plan(fn: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, list[int]]]) -> Verdict:
    """Exercise 05.1: ``fn(indices, n_experts, world) -> (tokens, send_splits)``.

    ``indices`` ``(N, k)`` are one rank's routing (token ``t`` chose experts ``indices[t]``); the ``n_experts``
    experts lie on the ``world`` ranks in order, ``n_experts / world`` each. Return the token of every row this
    rank sends, in the order ``all_to_all_single`` sends them (the ``N·k`` (token, expert) pairs sorted by expert,
    ties in token order: int64 ``(N·k,)``), and ``send_splits``, the number of rows for each rank (a list of
    ``world`` ints). GShard's dispatch (Lepikhin et al. 2020, §2.2); checked against moelab's sort
    (:func:`moelab.dispatch.permute`) grouped per rank, as :func:`moelab.ep.expert_parallel` does."""
    g = seeded(50)
    cases = [case(indices=_routing(g, N, k, E), n_experts=E, world=W) for W, E, N, k in SHAPES]
    hints = [(_wrong_round_robin, "experts lie on the ranks in contiguous blocks: expert e is on rank "
                                  "e // (n_experts / world), not e % world."),
             (_wrong_by_rank, "sort by expert, not only by rank: the receiving rank runs each of its experts on a "
                              "contiguous segment of the rows.")]
    return run_check("check_dispatch_plan", fn, _plan, cases, "moelab.dispatch.permute (the order "
                     "moelab.ep.expert_parallel sends)", hints=hints)


def _rows(indices: torch.Tensor, n_experts: int) -> list[int]:
    """Rows each rank's experts process: the sum over the sending ranks of their splits for it."""
    world = indices.shape[0]
    splits = torch.tensor([_plan(rank_indices, n_experts, world)[1] for rank_indices in indices])
    return splits.sum(0).tolist()


def _wrong_tokens(indices: torch.Tensor, n_experts: int) -> list[int]:
    """Tokens (not rows) per rank: a token with two experts on one rank counted once."""
    world = indices.shape[0]
    owner = indices // (n_experts // world)
    seen = torch.zeros(*owner.shape[:2], world, dtype=torch.bool).scatter_(-1, owner, True)
    return seen.sum((0, 1)).tolist()


def check_expert_rows(fn: Callable[[torch.Tensor, int], list[int]]) -> Verdict:
    """Exercise 05.2: ``fn(indices, n_experts) -> list[int]``, the rows each rank's experts process.

    ``indices`` ``(W, N, k)``: rank ``r``'s routing is ``indices[r]``; the experts lie on the ranks in order. A
    rank computes every row sent to it by every rank (its own included), so the most loaded rank sets the step
    time (notebook 05, §5). Checked against the sum of moelab's send splits over the ranks (see
    :func:`check_dispatch_plan`)."""
    g = seeded(51)
    cases = []
    for W, E, N, k in SHAPES:
        indices = torch.stack([_routing(g, N, k, E) for _ in range(W)])
        if W == 4 and E == 8 and N == 16:              # every token wants rank 0's experts: one rank does it all
            indices = torch.stack([_routing(g, N, k, E // W) for _ in range(W)])
        cases.append(case(indices=indices, n_experts=E))
    hints = [(lambda indices, n_experts: torch.bincount(indices.flatten() % len(indices), minlength=len(indices))
              .tolist(),
              "experts lie on the ranks in contiguous blocks: expert e is on rank e // (n_experts / world)."),
             (_wrong_tokens, "count rows, not tokens: a token with two experts on one rank sends it two rows.")]
    return run_check("check_expert_rows", fn, _rows, cases, "the send splits of moelab.dispatch.permute, "
                     "summed over the ranks", hints=hints)


def _payload(tokens: int, top_k: int, d_model: int, dispatch: str, combine: str) -> dict[str, int]:
    """moelab's bytes per token of one MoE layer (:func:`moelab.sizing.moe_traffic`), times the tokens."""
    config = ModelConfig(vocab_size=1, n_layer=1, n_head=1, d_model=d_model, n_routed_experts=top_k, top_k=top_k)
    traffic = moe_traffic(config, dispatch, combine)
    return {"dispatch": tokens * traffic["dispatch"], "combine": tokens * traffic["combine"]}


def _wrong_fp8(scales: Callable[[int], int]) -> Callable[..., dict[str, int]]:
    """A payload whose fp8 rows carry ``scales(d_model)`` fp32 scales instead of ``⌈d_model / 128⌉``."""
    def wrong(tokens: int, top_k: int, d_model: int, dispatch: str, combine: str) -> dict[str, int]:
        right = _payload(tokens, top_k, d_model, dispatch, combine)
        fix = tokens * top_k * (d_model + 4 * scales(d_model) - packed_bytes(d_model))
        return {side: right[side] + fix * (wire == "fp8") for side, wire in (("dispatch", dispatch),
                                                                           ("combine", combine))}
    return wrong


def check_payload_bytes(fn: Callable[[int, int, int, str, str], dict[str, int]]) -> Verdict:
    """Exercise 05.3: ``fn(tokens, top_k, d_model, dispatch, combine) -> {"dispatch": int, "combine": int}``,
    the bytes a rank's ``tokens`` put into one MoE layer's dispatch all-to-all and get back in its combine
    (forward only, rows that stay on the rank included), each in a wire format: ``"fp32"`` or ``"bf16"`` (4 or
    2 bytes a value) or ``"fp8"`` (1 byte a value plus one fp32 scale per 128 values, DeepSeek-V3 §3.3.3).
    Checked against :func:`moelab.sizing.moe_traffic`."""
    g = seeded(52)
    cases = [case(tokens=2048, top_k=2, d_model=256, dispatch="fp32", combine="fp32"),
             case(tokens=2048, top_k=4, d_model=256, dispatch="fp32", combine="fp32"),
             case(tokens=4096, top_k=8, d_model=7168, dispatch="fp8", combine="bf16"),
             case(tokens=1, top_k=1, d_model=64, dispatch="bf16", combine="fp32")]
    for _ in range(8):
        cases.append(case(tokens=int(torch.randint(1, 5000, (), generator=g)),
                          top_k=int(torch.randint(1, 9, (), generator=g)),
                          d_model=2 * int(torch.randint(1, 300, (), generator=g)),
                          dispatch=FORMATS[int(torch.randint(0, 3, (), generator=g))],
                          combine=FORMATS[int(torch.randint(0, 3, (), generator=g))]))
    hints = [(_wrong_fp8(lambda d: 0), "an fp8 row also carries its scales: 4 bytes per 128 values."),
             (_wrong_fp8(lambda d: d // 128), "a last, partial tile of fewer than 128 values needs a scale too: "
                                              "⌈d_model / 128⌉ scales."),
             (lambda tokens, top_k, d_model, dispatch, combine: _payload(tokens, 1, d_model, dispatch, combine),
              "every token sends top_k rows, one per chosen expert.")]
    return run_check("check_payload_bytes", fn, _payload, cases, "moelab.sizing.moe_traffic", hints=hints)


def _backward_inputs(rank: int, world: int, seed: int, pattern: str, d: int) -> dict:
    send, recv = split_matrix(rank, world, seed, pattern)
    grad = torch.randn(sum(recv), d, generator=seeded(1000 * seed + rank))
    return {"grad": grad, "send_splits": send, "recv_splits": recv}


def _all_to_all_backward(grad: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """moelab's differentiable all-to-all, run backward: the gradient of the rows this rank sent."""
    x = torch.zeros(sum(send_splits), grad.shape[1], requires_grad=True)
    all_to_all(x, send_splits, recv_splits).backward(grad)
    return x.grad


def _wrong_forward_again(grad: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """The gradients sent with the forward's splits; ``grad`` cut or padded with zeros to ``sum(send_splits)`` rows,
    so that every rank joins the exchange (a hint must neither raise nor leave a rank waiting)."""
    rows = grad.new_zeros(sum(send_splits), grad.shape[1])
    n = min(len(rows), len(grad))
    rows[:n] = grad[:n]
    return exchange(rows, send_splits, recv_splits)


def check_all_to_all_backward(fn: Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]) -> Verdict:
    """Exercise 05.4, rank code: ``fn(grad, send_splits, recv_splits) -> tensor``, on every rank.

    In the forward pass this rank sent ``send_splits[j]`` rows to rank ``j`` and received ``recv_splits[j]`` rows
    from rank ``j``, in rank order. ``grad`` ``(sum(recv_splits), d)`` is the gradient of the rows it received;
    return the gradient of the rows it sent, ``(sum(send_splits), d)``, in the order it sent them. Run on 2–4 real
    gloo ranks against the backward pass of :func:`moelab.exchange.all_to_all`."""
    plan = [(2, 1, "random", 3), (2, 6, "random", 1), (3, 2, "random", 4), (3, 5, "rank 0 silent", 2),
            (4, 3, "random", 2), (4, 4, "to rank 0", 3)]                  # by world size: one launch each
    cases = [RankCase(world, functools.partial(_backward_inputs, seed=seed, pattern=pattern, d=d),
                      f"splits {pattern}, rows of {d}") for world, seed, pattern, d in plan]
    hints = [(lambda grad, send_splits, recv_splits: grad,
              "the gradient of a received row belongs on the rank that sent the row: send the gradients back, "
              "one all-to-all the reverse way."),
             (_wrong_forward_again, "backward sends with the splits swapped: send recv_splits[j] rows to rank j, "
                                    "receive send_splits[j] from it.")]
    return run_rank_check("check_all_to_all_backward", fn, _all_to_all_backward, cases,
                          "the backward pass of moelab.exchange.all_to_all", hints=hints)
