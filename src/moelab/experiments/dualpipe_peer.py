"""The order of forward, backward and weight-gradient chunks that DeepSeek's DualPipe 1.0.0 runs on each rank.

Our DualPipe schedule is compared with the reference one, but ``dualpipe`` 1.0.0 runs on CUDA only: its constructor
asserts the stages live on the current CUDA device and its communication buffers are allocated on ``cuda``. The
order, though, is decided by its Python code alone. :func:`dualpipe_order` runs ``DualPipe.step`` itself, one rank
at a time, on CPU with tiny stages that log what autograd makes them do, point-to-point communication replaced by
fresh CPU tensors, and ``torch.cuda.current_device`` answering ``"cpu"`` while the constructor runs. The schedule
is never written out here: the log is what dualpipe's own code executed.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
from dualpipe import DualPipe, WeightGradStore
from dualpipe import comm as dualpipe_comm

WIDTH = 2                                   # features of the tiny stages; each micro-batch is one row


class _Group:
    """The two methods of a process group that ``DualPipe.__init__`` reads, for one simulated rank."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class _Scale(torch.autograd.Function):
    """``x * weight`` that logs its backward, and defers the weight gradient when dualpipe enables zero bubble."""

    @staticmethod
    def forward(ctx, x, weight, tag, log):
        ctx.save_for_backward(x, weight)
        ctx.tag, ctx.log = tag, log
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        ctx.log.append("B" + ctx.tag)

        def weight_grad() -> torch.Tensor:
            return (grad * x).sum(0)

        if WeightGradStore.enabled:         # dualpipe's zero-bubble switch: W runs later, at its _weight_chunk
            def deferred(tag=ctx.tag, log=ctx.log) -> None:
                log.append("W" + tag)
                weight.grad = weight_grad() if weight.grad is None else weight.grad + weight_grad()
            WeightGradStore.put(deferred)
            return grad * weight, None, None, None
        return grad * weight, weight_grad(), None, None     # W folded into this B


class _Stage(torch.nn.Module):
    """Chunk ``chunk`` (``modules[chunk]`` of one rank): logs its forwards, tagged with dualpipe's micro-batch id."""

    def __init__(self, chunk: int, log: list[str]) -> None:
        super().__init__()
        self.chunk, self.log = chunk, log
        self.weight = torch.nn.Parameter(torch.ones(WIDTH))
        self.pipe: DualPipe | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DualPipe._forward_compute_chunk has just taken this id and advanced its counter for this chunk.
        tag = f"{self.chunk}.{self.pipe.current_f_chunk_id[self.chunk] - 1}"
        self.log.append("F" + tag)
        return _Scale.apply(x, self.weight, tag, self.log)


def _recv(ops, src, group) -> list[torch.Tensor]:
    """``comm.append_irecv`` without CUDA or a process group: a fresh tensor of the configured shape, no op."""
    return [torch.zeros(shape, dtype=dualpipe_comm.TENSOR_DTYPE, requires_grad=True)
            for shape in dualpipe_comm.TENSOR_SHAPES]


def _send(ops, tensors, dst, group) -> None:
    """``comm.append_isend`` for one simulated rank: nothing is sent."""


def _check(pp: int, microbatches: int) -> None:
    for field, value in (("pp", pp), ("microbatches", microbatches)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{field} must be an int, got {value!r}")
    if pp < 2 or pp % 2:
        raise ValueError(f"pp must be even and at least 2 (DualPipe asserts an even number of ranks), got {pp}")
    if microbatches % 2 or microbatches < 2 * pp:
        raise ValueError(f"microbatches must be even and at least 2 * pp = {2 * pp} (DualPipe asserts "
                         f"num_chunks % 2 == 0 and num_chunks >= 2 * num_ranks), got {microbatches}")


def _rank_order(rank: int, pp: int, microbatches: int) -> list[str]:
    log: list[str] = []
    stages = (_Stage(0, log), _Stage(1, log))
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
        pipe = DualPipe(stages, process_group=_Group(rank, pp))
    for stage in stages:
        object.__setattr__(stage, "pipe", pipe)     # a plain reference, not a registered submodule
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(dualpipe_comm, "append_irecv", _recv))
        stack.enter_context(mock.patch.object(dualpipe_comm, "append_isend", _send))
        stack.enter_context(mock.patch.object(dualpipe_comm, "TENSOR_SHAPES", [(1, WIDTH)]))
        stack.enter_context(mock.patch.object(dualpipe_comm, "TENSOR_DTYPE", torch.float32))
        stack.enter_context(torch.enable_grad())
        half = microbatches // 2
        inputs = torch.ones(half, WIDTH)    # used on the first and last ranks only: half the micro-batches each
        labels = torch.zeros(half, WIDTH)
        pipe.step(inputs, num_chunks=microbatches, labels=[labels],
                  criterion=lambda out, target: ((out - target) ** 2).sum())
    return log


def dualpipe_order(pp: int, microbatches: int) -> list[list[str]]:
    """For each of the ``pp`` ranks, the compute actions DualPipe 1.0.0's ``step`` runs there, in order.

    ``"F0.3"`` is the forward of chunk 0 for micro-batch 3, ``"B1.2"`` the backward of chunk 1 for micro-batch 2
    and ``"W0.5"`` the deferred weight gradient of chunk 0, micro-batch 5. Chunk ``c`` is ``modules[c]`` of every
    rank: chunk 0 carries the micro-batches that enter at rank 0 (through ranks 0 → pp-1, loss on rank pp-1),
    chunk 1 those that enter at rank pp-1 (pp-1 → 0, loss on rank 0). Each chunk carries ``microbatches // 2``
    micro-batches, numbered 0 … microbatches/2 - 1 within it, dualpipe's own ``chunk_id``.

    A ``B`` is the input gradient. Where dualpipe enables zero bubble (``enable_zb``) the weight gradient is
    deferred to a later ``W`` of the same chunk and micro-batch; every other backward computes the weight gradient
    inside it, and that micro-batch has no ``W``. dualpipe's overlapped forward-backward chunks
    (``_forward_backward_compute_chunk``) appear as the two actions in the order it issues them: the forward,
    then the backward.
    """
    _check(pp, microbatches)
    return [_rank_order(rank, pp, microbatches) for rank in range(pp)]
