"""Experts whose matmuls run in 8 bits, to measure what a quantisation scheme costs a trained MoE.

A scheme says how both operands of every expert matmul ``x @ W`` are stored (:mod:`moelab.quant`):

- ``"fp32"``: as trained (the reference);
- ``"bf16"``: both rounded to bfloat16, products summed in fp32;
- ``"int8_weight_only"``: weights INT8 with one scale per output channel, dequantised on the fly; activations and
  products stay fp32 (the memory saving without the arithmetic one);
- ``"int8_channel"``: W8A8 — weights INT8 with one scale per output channel, activations INT8 with one scale per
  token (dynamic), products summed exactly in int32 (:func:`moelab.quant.w8a8_linear`; SmoothQuant's setting
  without its smoothing);
- ``"fp8_tensor"``: weights and activations FP8 E4M3 with one scale per tensor (per expert matrix, and per batch of
  rows), :func:`moelab.quant.scaled_mm`;
- ``"fp8_fine"``: DeepSeek-V3's recipe — activations in 1×128 tiles, weights in 128×128 blocks, the block-scaled
  GEMM :func:`moelab.quant.fp8_block_gemm`.

Weights are quantised once, activations on every call. Only the routed experts change; attention, the router,
the shared experts, norms and embeddings stay as they are (DeepSeek-V3 also keeps its gating, norms, attention
and embeddings in higher precision). Inference only: the quantised experts have no gradients.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ffn import Experts
from .quant import dequantize_blocks, fp8_block_gemm, quantize_blocks, scaled_mm, w8a8_linear

SCHEMES = ("fp32", "bf16", "int8_weight_only", "int8_channel", "fp8_tensor", "fp8_fine")


class QuantizedLinear:
    """``x @ W`` for a weight ``W`` ``(in, out)`` stored as ``scheme`` says; ``stored_bytes`` is its size."""

    def __init__(self, w: torch.Tensor, scheme: str):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme = {scheme!r} is not allowed; allowed: {', '.join(SCHEMES)}")
        self.scheme, wt = scheme, w.detach().t().contiguous()                    # (out, in), as nn.Linear
        self.shape = tuple(wt.shape)
        if scheme == "fp32":
            self.w, self.stored_bytes = wt, wt.numel() * 4
        elif scheme == "bf16":
            self.w, self.stored_bytes = wt.bfloat16(), wt.numel() * 2
        else:
            fmt = "int8" if scheme.startswith("int8") else "fp8_e4m3"
            self.block = {"int8_weight_only": (1, wt.shape[1]), "int8_channel": (1, wt.shape[1]),
                          "fp8_tensor": tuple(wt.shape), "fp8_fine": (128, 128)}[scheme]
            self.q, self.scales = quantize_blocks(wt, fmt, self.block)
            self.stored_bytes = wt.numel() + self.scales.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        if s == "fp32":
            return x @ self.w.t()
        if s == "bf16":
            return (x.bfloat16() @ self.w.t()).float()
        if s == "int8_weight_only":
            return x @ dequantize_blocks(self.q, self.scales, self.block).t()
        if x.shape[0] == 0:
            return x.new_zeros(0, self.shape[0])
        if s == "int8_channel":
            return w8a8_linear(x, self.q, self.scales)
        if s == "fp8_tensor":
            x_q, x_s = quantize_blocks(x, "fp8_e4m3", tuple(x.shape))
            return scaled_mm(x_q, x_s.view(()), self.q, self.scales.view(()))
        x_q, x_s = quantize_blocks(x, "fp8_e4m3", (1, 128))
        return fp8_block_gemm(x_q, x_s, self.q, self.scales)

    def dequantized(self) -> torch.Tensor:
        """The weight ``(in, out)`` as this scheme stores it, back in fp32."""
        if self.scheme in ("fp32", "bf16"):
            return self.w.float().t()
        return dequantize_blocks(self.q, self.scales, self.block).t()


class QuantizedExperts(nn.Module):
    """The experts of an :class:`~moelab.ffn.Experts`, each matmul a :class:`QuantizedLinear`. It has the interface
    the dispatch paths use (``n_experts``, ``d_model``, ``d_expert``, ``expert(e, x)``); the grouped path falls
    back to the sorted loop, one expert at a time."""

    def __init__(self, experts: Experts, scheme: str):
        super().__init__()
        self.n_experts, self.d_model, self.d_expert = experts.n_experts, experts.d_model, experts.d_expert
        self.scheme = scheme
        self.gate = [QuantizedLinear(w, scheme) for w in experts.w_gate]
        self.up = [QuantizedLinear(w, scheme) for w in experts.w_up]
        self.down = [QuantizedLinear(w, scheme) for w in experts.w_down]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.down[e](F.silu(self.gate[e](x)) * self.up[e](x))

    @property
    def stored_bytes(self) -> int:
        return sum(m.stored_bytes for m in (*self.gate, *self.up, *self.down))


def quantized_copy(model: nn.Module, scheme: str) -> nn.Module:
    """A copy of ``model`` (eval mode) whose MoE layers' routed experts run in ``scheme``."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme = {scheme!r} is not allowed; allowed: {', '.join(SCHEMES)}")
    model = copy.deepcopy(model).eval()
    for moe in model.moe_layers:
        moe.experts = QuantizedExperts(moe.experts, scheme)
    return model
