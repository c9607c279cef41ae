"""8-bit numbers with scales: FP8 (E4M3, E5M2) and INT8, one scale per 1×``block`` tile of the last dimension.

DeepSeek-V3 (§3.3.1) quantises activations in 1×128 tiles: each run of 128 values along the hidden dimension
shares one fp32 scale, ``amax / format_max``, so one outlier spoils only its own tile. Quantising is
``q = cast(clamp(x / scale, ±format_max))`` and dequantising ``q · scale``. The clamp is explicit because torch's
CPU cast saturates E4M3 silently (even inf → 448) and overflows E5M2 to inf; with the tile's own amax the clamp
only ever trims rounding. An all-zero tile gets scale 1 (no 0/0). INT8 is symmetric: ``round(x / scale)`` in
``[−127, 127]``. Used for the compressed all-to-all of :mod:`moelab.collectives`.
"""
from __future__ import annotations

import torch

FORMATS = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8}
FORMAT_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int8": 127.0}


def _check(fmt: str, block: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt = {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    if not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block = {block!r} is not allowed; allowed: an integer >= 1")


def _tiles(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` as ``(..., n_tiles, block)``, the last tile zero-padded."""
    d = x.shape[-1]
    pad = (-d) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (d + pad) // block, block)


def quantize(x: torch.Tensor, fmt: str = "fp8_e4m3", block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: ``q`` in ``fmt`` with ``x``'s shape, ``scales`` fp32 of shape ``(..., ceil(d / block))``."""
    _check(fmt, block)
    if not torch.isfinite(x).all():
        raise ValueError("x holds inf or NaN; allowed: finite values (a scale cannot represent them)")
    tiles = _tiles(x.float(), block)
    amax = tiles.abs().amax(-1, keepdim=True)
    scales = torch.where(amax > 0, amax / FORMAT_MAX[fmt], torch.ones_like(amax))
    scaled = (tiles / scales).clamp(-FORMAT_MAX[fmt], FORMAT_MAX[fmt])
    if fmt == "int8":
        scaled = scaled.round()
    q = scaled.to(FORMATS[fmt]).reshape(*x.shape[:-1], -1)[..., :x.shape[-1]]
    return q, scales.squeeze(-1)


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32):
    """``q · scale`` per tile, in ``dtype``."""
    tiles = _tiles(q.float(), block)
    return (tiles * scales.unsqueeze(-1)).reshape(*q.shape[:-1], -1)[..., :q.shape[-1]].to(dtype)


def pack(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows of ``q`` ``(N, d)`` and their scales ``(N, t)`` as one uint8 tensor ``(N, d·size + 4t)``: what goes on
    the wire (gloo cannot send FP8 dtypes, but it sends bytes)."""
    return torch.cat([q.contiguous().view(torch.uint8), scales.float().contiguous().view(torch.uint8)], dim=1)


def unpack(packed: torch.Tensor, d: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack` for rows of ``d`` values in ``fmt``: the same bytes, the dtypes restored."""
    _check(fmt, 1)
    q = packed[:, :d].contiguous().view(FORMATS[fmt])
    return q, packed[:, d:].contiguous().view(torch.float32)
