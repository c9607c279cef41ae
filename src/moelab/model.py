"""A decoder-only transformer language model, written to be read in one sitting.

Pre-norm residual blocks (``x + attn(norm(x))``, ``x + ffn(norm(x))``) with RMSNorm, rotary position
embeddings (both in :mod:`moelab.layers`), causal multi-head attention with an optional grouped-query layout (or
DeepSeek's multi-head latent attention, :mod:`moelab.mla`), and a SwiGLU feed-forward network. Attention and
block names follow Llama's and DeepSeek-V3's reference ``model.py`` (``wq``, ``wo``, ``attn_norm``,
``ffn_norm``, ``tok_embeddings``, ``output``); the SwiGLU matrices are named for what they do, ``w_gate`` /
``w_up`` / ``w_down`` (``w1`` / ``w3`` / ``w2`` there, ``gate_proj`` / ``up_proj`` / ``down_proj`` in Hugging
Face). The FFN slot is pluggable: ``Transformer(config, make_ffn=...)`` puts any module there;
by default the config decides between a dense SwiGLU and a mixture of experts (:mod:`moelab.moe`).
Built in notebooks/01_dense_baseline.ipynb.

Shapes: ``B`` sequences of ``T`` tokens; ``H`` query and ``KV`` key/value heads of ``hd`` = ``head_dim`` values;
``E`` routed experts, ``k`` = ``top_k`` per token.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import RMSNorm, apply_rope, rope_cache
from .mla import MultiHeadLatentAttention
from .moe import MoE, ffn_for_layer
from .mtp import MTPModule, mtp_loss


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block: ``model.eval()`` (no dropout, MoE dispatch without capacity) and no gradients. After it,
    even on an error, the model is back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)

class CausalSelfAttention(nn.Module):
    """Causal scaled dot-product attention (Vaswani et al. 2017) with RoPE and grouped-query heads.

    ``n_kv_head < n_head`` shares each key/value head among ``n_head / n_kv_head`` query heads
    (Ainslie et al. 2023, GQA); ``n_kv_head == n_head`` is plain multi-head attention. With ``qk_norm``, each
    head's queries and keys pass an RMSNorm before RoPE (Qwen3's QK-norm; Dehghani et al. 2023).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        self.wq = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        if config.qk_norm:                                 # Qwen3: RMSNorm over each head's q and k
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries ``(B, H, T, hd)``, keys and values ``(B, KV, T, hd)`` of ``x``, rotated for the positions of
        ``cos``/``sin``'s first ``T`` rows (a decoder passes the rows of the positions it is at)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, KV, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T]), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)                              # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.wo(y))


class Block(nn.Module):
    """One pre-norm transformer block: ``x + attn(attn_norm(x))`` then ``x + ffn(ffn_norm(x))``."""

    def __init__(self, config: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = MultiHeadLatentAttention(config) if config.attention == "mla" else CausalSelfAttention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


# Parameters that write into the residual stream; GPT-2 scales their init by 1/sqrt(2·n_layer).
RESIDUAL_OUTPUTS = ("wo", "w_down")


class Transformer(nn.Module):
    """Token embedding → ``n_layer`` blocks → RMSNorm → output head; ``forward`` returns ``(logits, loss)``.

    ``make_ffn(config, layer_index)`` builds the module in each block's FFN slot. The default,
    :func:`moelab.moe.ffn_for_layer`, follows the config: a dense SwiGLU, or an MoE layer when the config has
    routed experts.

    With ``mtp_depth = D > 0``, ``mtp`` holds ``D`` multi-token-prediction modules (:class:`moelab.mtp.MTPModule`,
    blocks ``n_layer…n_layer + D − 1`` for ``make_ffn``) that read the main model's last hidden states; the main
    model itself never reads them. They are built with the CPU's random-number generator forked (models are built
    on the CPU, then moved), so the main model's initial weights are those of the same config without MTP; and
    ``D = 0`` leaves ``mtp`` empty: the same parameters, state-dict keys and outputs as a model without the feature.
    """

    def __init__(self, config: ModelConfig, make_ffn: Callable[[ModelConfig, int], nn.Module] = ffn_for_layer):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, make_ffn(config, i)) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        with torch.random.fork_rng([], enabled=config.mtp_depth > 0):   # reset_parameters draws the weights
            self.mtp = nn.ModuleList(MTPModule(config, Block(config, make_ffn(config, config.n_layer + k)))
                                     for k in range(config.mtp_depth))
        self.mtp_loss = torch.zeros(())
        cos, sin = rope_cache(config.rope_head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    @property
    def mtp_moe_layers(self) -> list[MoE]:
        """The MoE layers of the MTP modules' blocks: outside :attr:`moe_layers`, which describe the main model;
        balanced through :attr:`mtp_loss` and :meth:`after_step`."""
        return [module.moe for module in self.mtp if module.moe is not None]

    @property
    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' weighted balancing losses from the last forward pass (zero for a dense model)."""
        return sum((moe.aux_loss for moe in self.moe_layers), torch.zeros((), device=self.device))

    def after_step(self) -> None:
        """Call after each optimizer step: MoE layers, the MTP modules' included, apply their aux-loss-free bias
        updates."""
        for moe in self.moe_layers + self.mtp_moe_layers:
            moe.after_step()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix, divided by sqrt(2·n_layer) for residual outputs (GPT-2 §2.3)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            residual = any(part in RESIDUAL_OUTPUTS for part in name.split(".")[-2:])
            std = self.config.init_std / (math.sqrt(2 * self.config.n_layer) if residual else 1.0)
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """``idx``: ``(B, T)`` token ids. Returns logits ``(B, T, vocab)`` and the mean cross-entropy (or None).

        The loss is the language-modelling loss only; MoE balancing losses are in :attr:`aux_loss`, and with
        ``targets`` the MTP modules' loss is in :attr:`mtp_loss` (:func:`moelab.mtp.mtp_loss`; zero without MTP or
        targets). The training loop adds both before ``backward``.
        """
        self._check_ids(idx)
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds ModelConfig.block_size = {self.config.block_size}")
        x = self.dropout(self.tok_embeddings(idx))                                  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        logits = self.output(self.norm(x))                                          # (B, T, vocab)
        loss, self.mtp_loss = None, torch.zeros((), device=x.device)
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            self.mtp_loss = mtp_loss(self, x, targets)
        return logits, loss

    def _check_ids(self, idx: torch.Tensor) -> None:
        if idx.dim() != 2 or idx.dtype != torch.long or idx.shape[1] == 0:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids (torch.long) with time >= 1; got "
                             f"shape {tuple(idx.shape)} and dtype {idx.dtype} (a 1-D prompt needs idx[None])")
        if not self.device.type == "meta" and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.config.vocab_size - 1} (ModelConfig.vocab_size = "
                             f"{self.config.vocab_size}); got ids from {idx.min().item()} to {idx.max().item()}")

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)``; ``temperature = 0`` is greedy.

        The context is cropped to the last ``block_size`` tokens (nanoGPT's ``generate``).
        """
        self._check_ids(idx)
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens = {max_new_tokens!r} is not allowed; allowed: an integer >= 0")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature = {temperature!r} is not allowed; allowed: a number >= 0")
        if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= self.config.vocab_size):
            raise ValueError(f"top_k = {top_k!r} is not allowed; allowed: None or 1..{self.config.vocab_size}")
        with evaluating(self):
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.block_size:])
                logits = logits[:, -1, :].float()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, top_k).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                idx = torch.cat((idx, nxt), dim=1)
        return idx


def complete(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8,
             top_k: int | None = None, seed: int = 0) -> str:
    """The text ``model`` writes after ``prompt`` (the prompt itself excluded); deterministic in ``seed``.

    ``tokenizer`` is anything with ``encode(str) -> LongTensor`` and ``decode(ids) -> str``.
    """
    if not prompt:
        raise ValueError("prompt = '' is not allowed; allowed: a non-empty string (the model needs a first token)")
    idx = tokenizer.encode(prompt)[None].to(model.device)
    generator = torch.Generator(model.device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature, top_k, generator)
    return tokenizer.decode(out[0, idx.shape[1]:].cpu())


def parameter_counts(model: Transformer) -> dict[str, int]:
    """``total`` parameters of the main model, and the ``active`` ones each token uses: all but the ``E − k`` routed
    experts it skips in every MoE layer. Embedding and output head count as active (the convention of notebook 00).

    ``mtp``: the multi-token-prediction modules' own parameters (their embedding and head are the main model's),
    outside ``total`` as DeepSeek counts them outside V3's 671 B (685 B with them)."""
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    skipped = sum((moe.experts.n_experts - moe.config.top_k) * sum(p[0].numel() for p in moe.experts.parameters())
                  for moe in model.moe_layers)
    return {"total": total, "active": total - skipped, "mtp": mtp}


def flops_per_token(model: Transformer) -> int:
    """Training FLOPs per token, forward and backward: ``6·N + 6·n_layer·block_size·d_model`` (Kaplan et al.
    2020, §2.1: ``C_forward ≈ 2N + 2·n_layer·n_ctx·d_attn``, and backward twice forward), where ``N`` counts the
    active parameters that multiply — all active ones except the input embedding, a table lookup."""
    c = model.config
    n = parameter_counts(model)["active"] - (0 if c.tie_embeddings else model.tok_embeddings.weight.numel())
    return 6 * n + 6 * c.n_layer * c.block_size * c.d_model
