"""Multi-head latent attention (MLA): DeepSeek-V2 §2.1 (arXiv:2405.04434), as DeepSeek-V3 and Kimi K2 use it.

Keys and values come from one small *latent* per token, ``c_kv = kv_norm(x · W_kv_a)`` of ``kv_lora_rank``
values, expanded per head by ``wkv_b`` into a no-position key part (``qk_nope_head_dim``) and a value
(``v_head_dim``). Position enters through a separate *decoupled* RoPE key of ``qk_rope_head_dim`` values, one for
all heads, taken from ``x`` alongside the latent. Queries have both parts per head, optionally through their own
low-rank bottleneck (``q_lora_rank``; 0 means one matrix ``wq``). So a decoder caches per token and layer only
``c_kv`` and the RoPE key — ``kv_lora_rank + qk_rope_head_dim`` values (512 + 64 for DeepSeek-V3) instead of
``2 · n_head · head_dim`` — and :meth:`MultiHeadLatentAttention.attend` computes attention from exactly that.

Names follow DeepSeek-V3's ``inference/model.py`` (``wq_a``, ``q_norm``, ``wq_b``, ``wkv_a``, ``kv_norm``, ``wkv_b``,
``wo``); the softmax scale is ``(qk_nope_head_dim + qk_rope_head_dim)^-0.5`` (its YaRN factor for long contexts is
left out: the course's contexts are short). RoPE rotates interleaved pairs, as there.

Shapes: ``B`` sequences of ``T`` tokens, ``H`` = ``n_head`` heads, ``S`` cached positions.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import RMSNorm, apply_rope


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA over ``(B, T, d_model)`` inputs; see the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, d = config.n_head, config.d_model
        self.n_head, self.kv_lora_rank = H, config.kv_lora_rank
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        qk = self.nope + self.rope
        if config.q_lora_rank:
            self.wq_a = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, config.norm_eps)
            self.wq_b = nn.Linear(config.q_lora_rank, H * qk, bias=False)
        else:
            self.wq = nn.Linear(d, H * qk, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, d, bias=False)
        self.scale = qk ** -0.5
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_nope, q_pe)``, each ``(B, H, T, ·)``; ``q_pe`` rotated for positions ``0..T−1`` of ``cos``/``sin``."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(B, T, self.n_head, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], -1)
        return q_nope, apply_rope(q_pe, cos[:T], sin[:T])

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decoder caches for ``x``: ``c_kv`` ``(B, T, kv_lora_rank)`` and the rotated RoPE key
        ``k_pe`` ``(B, T, qk_rope_head_dim)``, shared by all heads."""
        T = x.shape[1]
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], -1)
        return self.kv_norm(c_kv), apply_rope(k_pe, cos[:T], sin[:T])

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               causal: bool = True) -> torch.Tensor:
        """Attention of the queries over the cached ``c_kv`` and ``k_pe`` (``S`` positions), then ``wo``:
        ``(B, T, d_model)``. ``causal`` masks position ``t`` of the queries to the first ``t+1`` of the cache
        (queries and cache of the same positions); a decoder's new token attends to the whole cache."""
        B, H, T, _ = q_nope.shape
        S = c_kv.shape[1]
        kv = self.wkv_b(c_kv).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, k_pe[:, None].expand(B, H, S, self.rope)], -1)
        q = torch.cat([q_nope, q_pe], -1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, H * self.v_dim)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q_nope, q_pe = self.queries(x, cos, sin)
        return self.attend(q_nope, q_pe, *self.latent(x, cos, sin))
