"""Checks for notebook 08 (FP8 and INT8): 8-bit tiles, their round-trip error, and their bytes.

Three checks: quantising to INT8 tiles and the round-trip error at a granularity, each against :mod:`moelab.quant`
on fixed random inputs, and rank code run on real gloo ranks (:mod:`.ranks`): FP8 rows with their scales sent as
bytes, against :func:`moelab.collectives.compressed_all_to_all`.

Shapes: ``x`` is ``(R, C)``: ``R`` rows of ``C`` values.
"""
from __future__ import annotations

from functools import partial

import torch

from .. import quant
from ..collectives import compressed_all_to_all
from .core import Verdict, case, run_check, seeded
from .ranks import RankCase, exchange, run_rank_check, split_matrix

__all__ = ["check_quantize_int8", "check_round_trip_error", "check_fp8_all_to_all"]


def _quantize_int8_mistaken(x: torch.Tensor, block: int, top: float = 127, rounds: bool = True,
                            zero_scale_one: bool = True, dtype: torch.dtype = torch.float64):
    """:func:`moelab.quant.quantize`'s INT8 with one of its parts done wrong, computed in ``dtype`` (a learner's
    float32 and float64 differ where ``x / scale`` lands on an integer or half a step)."""
    d = x.shape[-1]
    tiles = torch.nn.functional.pad(x.to(dtype), (0, (-d) % block)).view(*x.shape[:-1], -1, block)
    scales = tiles.abs().amax(-1, keepdim=True) / top
    if zero_scale_one:
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = (tiles / scales).nan_to_num(0.0)
    q = (scaled.round() if rounds else scaled).clamp(-127, 127).to(torch.int8)
    return q.flatten(-2)[..., :d], scales.squeeze(-1).float()


TRUNCATES = "`.to(torch.int8)` truncates towards zero; round first."


def check_quantize_int8(fn) -> Verdict:
    """Notebook 08, exercise 1: ``fn(x, block) -> (q, scales)``, symmetric absmax INT8 with one fp32 scale per
    1×``block`` tile along the last dimension of ``x`` (the last tile zero-padded), as
    :func:`moelab.quant.quantize` with ``fmt="int8"``: ``scale = amax / 127`` (1 for an all-zero tile),
    ``q = round(x / scale)`` in ``[−127, 127]``. DeepSeek-V3's activation tiles are 1×128 (arXiv:2412.19437,
    §3.3.2); symmetric INT8 as in LLM.int8() (Dettmers et al. 2022, §3)."""
    g = seeded(701)
    outliers = torch.randn(6, 1024, generator=g)
    outliers[:, [17, 600]] *= 60
    zero_tile = torch.randn(2, 256, generator=g)
    zero_tile[1, 128:] = 0.0
    cases = [case(x=torch.randn(1, 256, generator=g), block=128),
             case(x=torch.randn(4, 300, generator=g), block=128),
             case(x=torch.randn(3, 5, 64, generator=g) * 10, block=16),
             case(x=outliers, block=128),
             case(x=torch.randn(8, 512, generator=g), block=512),
             case(x=torch.randn(1, 1, generator=g), block=128),
             case(x=torch.randn(5, 24, generator=g), block=1),
             case(x=zero_tile, block=128)]
    return run_check("check_quantize_int8", fn, lambda x, block: quant.quantize(x, "int8", block), cases,
                     against="moelab.quant.quantize(x, 'int8', block)",
                     hints=[(partial(_quantize_int8_mistaken, rounds=False), TRUNCATES),
                            (partial(_quantize_int8_mistaken, rounds=False, dtype=torch.float32), TRUNCATES),
                            (partial(_quantize_int8_mistaken, top=128), "symmetric INT8 maps the tile's amax to "
                                                                        "127, not 128: scale = amax / 127."),
                            (partial(_quantize_int8_mistaken, zero_scale_one=False),
                             "an all-zero tile gets scale 1 (its amax is 0: no 0/0).")])


def _round_trip_error_all_columns(x: torch.Tensor, fmt: str, block: tuple[int, int], keep: torch.Tensor) -> float:
    return quant.round_trip_error(x, fmt, block)


def _round_trip_error_per_tensor(x: torch.Tensor, fmt: str, block: tuple[int, int], keep: torch.Tensor) -> float:
    return quant.round_trip_error(x, fmt, tuple(x.shape), keep)


def _mean_relative_error(x: torch.Tensor, fmt: str, block: tuple[int, int], keep: torch.Tensor) -> float:
    back = quant.dequantize_blocks(*quant.quantize_blocks(x, fmt, block), block)
    return float(((back - x).abs() / x.abs())[:, keep].mean())


def check_round_trip_error(fn) -> Verdict:
    """Notebook 08, exercise 2: ``fn(x, fmt, block, keep) -> float``, the relative RMS error
    ``sqrt(mean(diff²) / mean(x²))`` over the columns where ``keep`` is true, ``diff`` the round trip of ``x``
    ``(R, C)`` through ``fmt`` (``"int8"`` or ``"fp8_e4m3"``) with one scale per ``block = (rows, cols)`` (the
    blocks tile ``x`` exactly), as :func:`moelab.quant.round_trip_error`. Outlier channels as in LLM.int8()
    (Dettmers et al. 2022, §3.4); per-tile scales as DeepSeek-V3 (arXiv:2412.19437, §3.3.1)."""
    g = seeded(702)
    normal = torch.randn(16, 256, generator=g)
    acts = torch.randn(16, 256, generator=g)
    acts[:, [5, 200]] *= 60
    big = acts.clone()
    big[:, [5, 200]] *= 10
    everything = torch.ones(256, dtype=torch.bool)
    ordinary = everything.clone()
    ordinary[[5, 200]] = False
    cases = [case(x=normal, fmt="int8", block=(1, 128), keep=everything),
             case(x=normal, fmt="fp8_e4m3", block=(16, 256), keep=everything),
             case(x=acts, fmt="int8", block=(16, 256), keep=ordinary),
             case(x=acts, fmt="int8", block=(1, 128), keep=ordinary),
             case(x=acts, fmt="fp8_e4m3", block=(1, 256), keep=ordinary),
             case(x=big, fmt="int8", block=(1, 256), keep=ordinary),
             case(x=big, fmt="fp8_e4m3", block=(16, 256), keep=ordinary),
             case(x=torch.randn(2, 8, generator=g), fmt="int8", block=(2, 4), keep=torch.tensor([True] * 7 + [False]))]
    return run_check("check_round_trip_error", fn, quant.round_trip_error, cases,
                     against="moelab.quant.round_trip_error", rtol=1e-3,
                     hints=[(_round_trip_error_all_columns, "average only over the columns where keep is True, in "
                                                           "both the numerator and the denominator."),
                            (_round_trip_error_per_tensor, "one scale per block of `block`'s shape, not one for the "
                                                           "whole tensor."),
                            (_mean_relative_error, "the error is an RMS ratio, sqrt(mean(diff²) / mean(x²)), not "
                                                   "the mean of |diff| / |x|.")])


def _fp8_inputs(rank: int, world: int, seed: int, pattern: str, d: int) -> dict:
    send, recv = split_matrix(rank, world, seed, pattern)
    x = torch.randn(sum(send), d, generator=seeded(1000 * seed + rank)) * 10.0 ** (rank - 1)  # ranks differ in scale
    return {"x": x, "send_splits": send, "recv_splits": recv}


def _fp8_all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """moelab's compressed all-to-all (FP8 E4M3 rows, fp32 scales per 1×128 tile, sent as bytes), dequantised."""
    q, scales = compressed_all_to_all(x, send_splits, recv_splits, "fp8_e4m3", 128)
    return quant.dequantize(q, scales, 128)


def _fp8_without_scales(x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """The received FP8 values, never multiplied back by their tiles' scales."""
    q, _ = compressed_all_to_all(x, send_splits, recv_splits, "fp8_e4m3", 128)
    return q.float()


def check_fp8_all_to_all(fn) -> Verdict:
    """Notebook 08, exercise 3, rank code: ``fn(x, send_splits, recv_splits) -> tensor``, on every rank.

    Send ``x``'s rows ``(N, d)`` as DeepSeek-V3 dispatches them (§3.3.3): each row in FP8 E4M3 with one fp32 scale
    per 1×128 tile (the last tile may be partial), as bytes, since gloo has no FP8 dtype; ``send_splits[j]`` rows go
    to rank ``j``. Return the rows this rank receives, ``recv_splits[j]`` from rank ``j`` in rank order, turned back
    into fp32. Run on 2–4 real gloo ranks against :func:`moelab.collectives.compressed_all_to_all`."""
    plan = [(2, 1, "random", 256), (2, 6, "random", 64), (3, 2, "random", 128), (3, 5, "rank 0 silent", 300),
            (4, 3, "random", 200), (4, 4, "to rank 0", 128)]              # by world size: one launch each
    cases = [RankCase(world, partial(_fp8_inputs, seed=seed, pattern=pattern, d=d), f"splits {pattern}, rows of {d}")
             for world, seed, pattern, d in plan]
    hints = [(exchange, "round each row to FP8 before it travels: what arrives is the sender's round trip, not its "
                          "fp32 values."),
             (_fp8_without_scales, "multiply each FP8 value by its tile's scale, which travels behind the row.")]
    return run_rank_check("check_fp8_all_to_all", fn, _fp8_all_to_all, cases,
                          "moelab.collectives.compressed_all_to_all", rtol=1e-6, atol=0.0, hints=hints)
