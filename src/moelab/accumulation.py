"""Why FP8 GEMMs promote partial sums to fp32: a long dot product summed in an accumulator with few bits.

DeepSeek-V3 (§3.3.2) reports that the FP8 GEMMs of NVIDIA's H800 keep only about 14 bits of the running sum, a
maximum relative error near 2% at ``K = 4096``; their fix is *promotion*: every ``N_C = 128`` products (four WGMMA
instructions) the partial sum is copied to fp32 registers on the CUDA cores and added there, so the limited
accumulator never holds more than 128 terms.

The emulation here: the products of two FP8 operands are exact (4 + 4 significant bits fit any float); the running
sum keeps ``bits`` significant bits after every addition, rounded toward zero (the low bits of an aligned addend are
dropped) or to nearest; with ``interval`` the limited sum restarts every ``interval`` products and is added to an
fp32 total. Sums are held in float64 between roundings, so the only error is the accumulator's.

Shapes: ``products`` ``(n, K)``: ``n`` dot products of length ``K``, summed along ``K``.
"""
from __future__ import annotations

import torch

ROUNDINGS = ("toward_zero", "nearest")


def keep_bits(x: torch.Tensor, bits: int, rounding: str = "toward_zero") -> torch.Tensor:
    """``x`` (float64) with ``bits`` significant bits, rounded toward zero or to nearest."""
    mantissa, exponent = torch.frexp(x)                   # x = mantissa · 2^exponent, 0.5 <= |mantissa| < 1
    scaled = mantissa * 2.0 ** bits
    scaled = torch.trunc(scaled) if rounding == "toward_zero" else torch.round(scaled)
    return torch.ldexp(scaled / 2.0 ** bits, exponent)


def limited_sum(products: torch.Tensor, bits: int = 14, interval: int | None = None,
                rounding: str = "toward_zero") -> torch.Tensor:
    """Each row of ``products`` summed left to right in an accumulator of ``bits`` significant bits; with
    ``interval``, promoted to an fp32 total every ``interval`` terms. Returns float64 ``(n,)``."""
    if products.dim() != 2:
        raise ValueError(f"products has {products.dim()} dimensions; allowed: 2, (dot products, K)")
    if not (isinstance(bits, int) and 2 <= bits <= 53):
        raise ValueError(f"bits = {bits!r} is not allowed; allowed: an integer from 2 to 53")
    if interval is not None and not (isinstance(interval, int) and interval >= 1):
        raise ValueError(f"interval = {interval!r} is not allowed; allowed: None or an integer >= 1")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding = {rounding!r} is not allowed; allowed: {', '.join(map(repr, ROUNDINGS))}")
    products = products.double()
    partial = torch.zeros(products.shape[0], dtype=torch.float64)
    total = torch.zeros(products.shape[0], dtype=torch.float32)
    for k in range(products.shape[1]):
        partial = keep_bits(partial + products[:, k], bits, rounding)
        if interval is not None and (k + 1) % interval == 0:
            total, partial = total + partial.float(), torch.zeros_like(partial)   # promotion: fp32 adds
    return (total + partial.float()).double() if interval is not None else partial


def accumulation_error(K: int, bits: int = 14, interval: int | None = None, rounding: str = "toward_zero",
                       n: int = 256, seed: int = 0) -> float:
    """The largest relative error ``|limited - exact| / |exact|`` over ``n`` dot products of length ``K`` whose
    operands are uniform in (0, 1) rounded to FP8 E4M3 (all products positive, so ``exact`` is never near 0)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.rand(n, K, generator=g).to(torch.float8_e4m3fn).double() for _ in range(2))
    products = a * b
    exact = products.sum(dim=1)
    return float(((limited_sum(products, bits, interval, rounding) - exact).abs() / exact).max())
