"""Feed-forward networks: the dense SwiGLU, and E SwiGLU experts stored stacked for grouped matmuls.

A SwiGLU FFN is ``w_down(silu(w_gate(x)) * w_up(x))`` (Shazeer 2020, "GLU Variants Improve Transformer"). It is
the dense FFN of Llama, Qwen3 and DeepSeek-V3, and the shape of every expert in Mixtral, Qwen3-MoE and
DeepSeek-V3. Built in notebooks/01_dense_baseline.ipynb (SwiGLU) and notebooks/02_moe_layer.ipynb (Experts).

Shapes: ``E`` experts, ``n`` rows (tokens) of ``d_model`` values.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """The dense SwiGLU FFN: ``nn.Linear`` layers ``w_gate``, ``w_up`` (d_model → d_ff) and ``w_down`` back."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)))


class Experts(nn.Module):
    """``n_experts`` SwiGLU experts with stacked weights, ready for one grouped matmul over all experts.

    ``w_gate``, ``w_up``: ``(E, d_model, d_expert)``; ``w_down``: ``(E, d_expert, d_model)``. Expert ``e`` maps
    ``x`` to ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`` — the layout of torchtitan's
    ``GroupedExperts`` and of Hugging Face's fused experts (transformers >= 5), transposed to ``x @ W``.
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.n_experts, self.d_model, self.d_expert = n_experts, d_model, d_expert
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        for w in (self.w_gate, self.w_up, self.w_down):  # nn.Linear's default, per expert, for standalone use;
            # inside a Transformer, reset_parameters re-initialises every matrix
            nn.init.uniform_(w, -1 / math.sqrt(w.shape[1]), 1 / math.sqrt(w.shape[1]))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` ``(n, d_model)``: one small SwiGLU, as the reference loop runs it."""
        return (F.silu(x @ self.w_gate[e]) * (x @ self.w_up[e])) @ self.w_down[e]

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """All experts at once on rows ``x`` sorted by expert; rows ``offsets[e-1]:offsets[e]`` go to expert ``e``.

        Each output row is multiplied by ``scale`` (its routing weight). ``torch._grouped_mm(A, B, offs)`` computes
        ``A[rows of g] @ B[g]`` for every group ``g`` in one call. The scale is applied to whichever of the hidden
        activation or the output is narrower: ``(s·h) @ W = s·(h @ W)``, with fewer multiplications.
        """
        h = F.silu(torch._grouped_mm(x, self.w_gate, offs=offsets)) * torch._grouped_mm(x, self.w_up, offs=offsets)
        if self.d_expert <= self.d_model:
            return torch._grouped_mm(h * scale[:, None], self.w_down, offs=offsets)
        return torch._grouped_mm(h, self.w_down, offs=offsets) * scale[:, None]
