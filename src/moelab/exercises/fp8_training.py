"""Checks for notebook 09 (training in FP8 and INT8): DeepSeek-V3's three GEMMs, promoted sums, BF16 moments.

Three checks, each against the library on fixed random inputs: the forward, input-gradient and weight-gradient
GEMMs of a linear layer under the fine-grained recipe against :func:`moelab.mixed_precision.matmul8` and its
backward; a sum in a 14-bit accumulator promoted to fp32 every ``interval`` terms against
:func:`moelab.accumulation.limited_sum`; and steps of AdamW with BF16 moments against
:class:`moelab.mixed_precision.AdamW`.

Shapes: ``x`` ``(M, K)`` tokens × input features, ``w`` ``(N, K)`` as ``nn.Linear`` stores it, ``dy`` ``(M, N)``;
``products`` ``(n, K)``: ``n`` dot products of length ``K``.
"""
from __future__ import annotations

from functools import partial

import torch

from ..accumulation import keep_bits, limited_sum
from ..mixed_precision import AdamW, matmul8
from ..quant import fake_quantize
from .core import Verdict, case, run_check, seeded

__all__ = ["check_fine_grained_gemms", "check_promoted_sum", "check_adamw_bf16"]


def _fine_grained_gemms(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(y, dx, dw) from :func:`moelab.mixed_precision.matmul8` under ``"fine"`` and its backward."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = matmul8(x, w, "fine")
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _gemms_mistaken(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, wgrad_tiles: str = "tokens",
                    grad_format: str = "fp8_e4m3", weight_block: tuple[int, int] = (128, 128),
                    act_block: tuple[int, int] = (1, 128)) -> tuple[torch.Tensor, ...]:
    """The three GEMMs with one part of the recipe done another way."""
    q = fake_quantize
    y = q(x, "fp8_e4m3", act_block) @ q(w, "fp8_e4m3", weight_block).t()
    dx = q(dy, grad_format, act_block) @ q(w.t(), "fp8_e4m3", weight_block).t()
    if wgrad_tiles == "tokens":
        dw = q(dy.t(), grad_format, act_block) @ q(x.t(), "fp8_e4m3", act_block).t()
    else:                                   # the forward's tiles (along channels), reused for wgrad
        dw = q(dy, grad_format, act_block).t() @ q(x, "fp8_e4m3", act_block)
    return y, dx, dw


def _gemm_inputs(g: torch.Generator, M: int, K: int, N: int, outliers: bool = False) -> dict:
    x, w, dy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(M, N, generator=g)
    if outliers:
        x[:, 3] *= 1e3                       # one outlier channel: it spoils its own tiles only
        dy[5] *= 1e3                         # and one token whose gradient is large
    return {"x": x, "w": w, "dy": dy}


def check_fine_grained_gemms(fn) -> Verdict:
    """Notebook 09, exercise 1: ``fn(x, w, dy) -> (y, dx, dw)``, the three GEMMs of a linear layer
    ``y = x wᵀ`` under DeepSeek-V3's fine-grained recipe, as :func:`moelab.mixed_precision.matmul8` computes
    them forward and backward: every operand rounded to FP8 E4M3 with one scale per group along its GEMM's
    reduction dimension — activations and output gradients in 1×128 tiles, weights in 128×128 blocks, and in the
    weight gradient ``dw = dyᵀ x``, which sums over tokens, ``dy`` and ``x`` in tiles of 128 tokens × 1 channel —
    and the products summed in fp32 (arXiv:2412.19437, §3.3.2, Fig. 7)."""
    g = seeded(801)
    cases = [case(**_gemm_inputs(g, 256, 256, 256)),
             case(**_gemm_inputs(g, 300, 200, 130)),                # partial tiles and blocks everywhere
             case(**_gemm_inputs(g, 256, 384, 128, outliers=True)),
             case(**_gemm_inputs(g, 7, 128, 256)),
             case(**_gemm_inputs(g, 512, 64, 64))]
    return run_check("check_fine_grained_gemms", fn, _fine_grained_gemms, cases,
                     against="moelab.mixed_precision.matmul8(x, w, 'fine') and its backward", rtol=1e-4, atol=1e-4,
                     hints=[(partial(_gemms_mistaken, wgrad_tiles="channels"),
                             "dw = dyᵀ x sums over tokens, so its scales must run along tokens: quantise dy.T and "
                             "x.T in 1×128 tiles (128 tokens × 1 channel of dy and x), not the forward's tiles."),
                            (partial(_gemms_mistaken, grad_format="fp8_e5m2"),
                             "DeepSeek-V3 keeps the output gradient in E4M3 too: its fine scales leave no need "
                             "for E5M2's range."),
                            (partial(_gemms_mistaken, weight_block=(1, 128)),
                             "weights are scaled per 128×128 block, not per 1×128 tile."),
                            (partial(_gemms_mistaken, act_block=(128, 128)),
                             "activations and gradients are scaled per 1×128 tile (one token, 128 channels), not "
                             "per 128×128 block.")])


def _promoted_sum(products: torch.Tensor, interval: int) -> torch.Tensor:
    return limited_sum(products, 14, interval, "toward_zero")


def _promoted_without_reset(products: torch.Tensor, interval: int) -> torch.Tensor:
    """Promotion that copies the partial sum to fp32 but keeps adding to it."""
    partial_sum = torch.zeros(products.shape[0], dtype=torch.float64)
    total = torch.zeros(products.shape[0], dtype=torch.float32)
    for k in range(products.shape[1]):
        partial_sum = keep_bits(partial_sum + products[:, k].double(), 14)
        if (k + 1) % interval == 0:
            total = total + partial_sum.float()
    return (total + partial_sum.float()).double()


def _never_promoted(products: torch.Tensor, interval: int) -> torch.Tensor:
    return limited_sum(products, 14, None, "toward_zero")


def _promoted_rounding_nearest(products: torch.Tensor, interval: int) -> torch.Tensor:
    return limited_sum(products, 14, interval, "nearest")


def _products(g: torch.Generator, n: int, K: int) -> torch.Tensor:
    a, b = (torch.rand(n, K, generator=g).to(torch.float8_e4m3fn).double() for _ in range(2))
    return a * b


def check_promoted_sum(fn) -> Verdict:
    """Notebook 09, exercise 2: ``fn(products, interval) -> tensor (n,) float64``, each row of
    ``products`` summed left to right in an accumulator that keeps 14 significant bits after every addition
    (the low bits dropped: rounded toward zero), its partial sum added to an fp32 total and restarted every
    ``interval`` terms, as :func:`moelab.accumulation.limited_sum` (DeepSeek-V3, §3.3.2: N_C = 128)."""
    g = seeded(802)
    cases = [case(products=_products(g, 8, 512), interval=128),
             case(products=_products(g, 4, 1000), interval=128),          # a last, partial interval
             case(products=_products(g, 6, 300), interval=1),
             case(products=_products(g, 5, 2048), interval=512),
             case(products=_products(g, 3, 64), interval=128)]            # never reaches the interval
    return run_check("check_promoted_sum", fn, _promoted_sum, cases,
                     against="moelab.accumulation.limited_sum(products, 14, interval, 'toward_zero')", rtol=1e-12,
                     atol=0.0,
                     hints=[(_promoted_without_reset, "after a promotion the limited accumulator starts again from "
                                                      "zero; otherwise each partial sum is counted again."),
                            (_never_promoted, "add the partial sum to the fp32 total every `interval` terms."),
                            (_promoted_rounding_nearest, "the accumulator drops the low bits (torch.trunc on the "
                                                         "mantissa), it does not round to nearest.")])


def _adamw_run(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float,
               moment_dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """The parameters after one AdamW step per list of gradients."""
    params = [p.clone().requires_grad_() for p in params]
    opt = AdamW(params, lr=lr, weight_decay=0.1, moment_dtype=moment_dtype)
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()
    return [p.detach() for p in params]


def _adamw_without_bias_correction(params: list[torch.Tensor], grads: list[list[torch.Tensor]],
                                   lr: float) -> list[torch.Tensor]:
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    v = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    for step in grads:
        for i, (p, gr) in enumerate(zip(params, step)):
            mi = m[i].float() * 0.9 + 0.1 * gr
            vi = v[i].float() * 0.95 + 0.05 * gr * gr
            m[i].copy_(mi)
            v[i].copy_(vi)
            p.mul_(1 - lr * 0.1)
            p.add_(-lr * mi / (vi.sqrt() + 1e-8))
    return params


def _adam_inputs(g: torch.Generator, shapes: list[tuple[int, ...]], steps: int, scale: float = 1.0) -> dict:
    params = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) * scale for s in shapes] for _ in range(steps)]
    return {"params": params, "grads": grads}


def check_adamw_bf16(fn) -> Verdict:
    """Notebook 09, exercise 3: ``fn(params, grads, lr) -> list of tensors``: the fp32 parameters after
    one AdamW step per entry of ``grads`` (betas 0.9 and 0.95, eps 1e-8, weight decay 0.1, decoupled), the two
    moments stored in BF16 between steps and every step computed in fp32 (DeepSeek-V3, §3.3.3), as
    :class:`moelab.mixed_precision.AdamW` with ``moment_dtype=torch.bfloat16``."""
    g = seeded(803)
    cases = [case(**_adam_inputs(g, [(64, 32)], 1), lr=1e-3),
             case(**_adam_inputs(g, [(16, 16), (16,)], 5), lr=1e-2),
             case(**_adam_inputs(g, [(8, 300)], 20, scale=1e-3), lr=3e-3),
             case(**_adam_inputs(g, [(4, 4), (4,), (2, 2, 2)], 3), lr=1e-1)]
    return run_check("check_adamw_bf16", fn, _adamw_run, cases,
                     against="moelab.mixed_precision.AdamW(moment_dtype=torch.bfloat16)", rtol=1e-5, atol=1e-6,
                     hints=[(partial(_adamw_run, moment_dtype=torch.float32),
                             "store the moments in BF16 between steps (compute each step in fp32, then round the "
                             "moments with .copy_ into BF16 tensors)."),
                            (_adamw_without_bias_correction, "divide the moments by 1 − βᵗ (bias correction) "
                                                             "before the update.")])
