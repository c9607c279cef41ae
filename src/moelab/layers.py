"""The pieces every attention block shares: RMSNorm and rotary position embeddings (RoPE).

Used by :mod:`moelab.model` (grouped-query attention) and :mod:`moelab.mla` (multi-head latent attention); built
in notebooks/01_dense_baseline.ipynb.

Shapes: ``T`` positions (tokens) of a sequence.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * weight`` over the last dimension (Zhang & Sennrich 2019, arXiv:1910.07467).

    Computed in float32 whatever the input dtype, as Llama and DeepSeek-V3 do.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_cache(head_dim: int, max_len: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles ``m·θ_i``, ``θ_i = theta^(-2i/head_dim)``: each ``(max_len, head_dim/2)``.

    Source: Su et al. 2021, RoFormer (arXiv:2104.09864) eq. 15. Computed on the CPU in float64, then placed on
    the default device (on the meta device, only the shapes remain).
    """
    cpu = torch.device("cpu")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=cpu) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=cpu), inv_freq)
    device = torch.get_default_device()
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair ``(x[2i], x[2i+1])`` of the last dimension by the angle of its position.

    ``x``: ``(..., T, head_dim)``; ``cos``/``sin``: ``(T, head_dim/2)``. The interleaved-pair layout is
    RoFormer's eq. 34 and DeepSeek-V3's (complex multiplication); HF Llama rotates halves instead.
    After rotation ``q_m · k_n`` depends on positions only through ``m - n``.
    """
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
