"""Decoding with a KV cache: each new token reads the weights once and the cached keys and values of the tokens
before it, instead of recomputing them.

A decoder first *prefills* the prompt (all its positions in one pass, writing their keys and values into the
cache), then *decodes* one position per step per sequence. A step's arithmetic is tiny (about 2 FLOPs per weight
per sequence), so on any modern chip its time is the time to read the weights it touches and the cache from memory
(:mod:`moelab.roofline` models it). The cache is allocated once for ``max_len`` positions and written in place, so
a step reads what it needs and copies nothing.

Three caches, one per attention layout:

- grouped-query attention caches each key/value head's keys and values, ``2 · n_kv_head · head_dim`` values per
  token and layer (plain multi-head attention: ``n_kv_head = n_head``);
- multi-head latent attention (:mod:`moelab.mla`) decoded *naively* materialises every head's key and value from
  the latent and caches them, ``n_head · (qk_nope + qk_rope + v_head_dim)`` values (DeepSeek-V3
  ``inference/model.py``, ``attn_impl = "naive"``);
- MLA *absorbed* caches only the latent ``c_kv`` and the shared RoPE key, ``kv_lora_rank + qk_rope_head_dim``
  values, and folds the per-head up-projection ``W_UK`` into the queries and ``W_UV`` into the output
  (DeepSeek-V2 §2.1.2; V3's default ``attn_impl = "absorb"``): scores ``q_nope·W_UK·c_kv + q_pe·k_pe``, output
  ``W_UV·(softmax · c_kv)``, without ever forming a key or a value.

Shapes: ``B`` sequences, ``T`` new positions this pass, ``S`` positions in the cache after it, ``H`` heads.
"""
from __future__ import annotations

import torch

from .config import check, check_int
from .mla import MultiHeadLatentAttention
from .model import Transformer, evaluating

LAYOUTS = ("gqa", "mla-naive", "mla-absorbed")


class KVCache:
    """The keys and values (or MLA latents) of ``batch`` sequences, ``max_len`` positions per layer.

    ``absorb`` picks MLA's cache: the latent (True) or every head's keys and values (False); it does not apply to
    grouped-query attention. :attr:`pos` positions are filled; :meth:`nbytes` counts the bytes a step reads.
    """

    def __init__(self, model: Transformer, batch: int, max_len: int | None = None, absorb: bool = True):
        c = model.config
        max_len = c.block_size if max_len is None else max_len
        check_int("KVCache", "batch", batch)
        check(isinstance(max_len, int) and 1 <= max_len <= c.block_size, "KVCache", "max_len", max_len,
              f"allowed: 1..ModelConfig.block_size = {c.block_size} (RoPE's table ends there)")
        self.layout = ("mla-absorbed" if absorb else "mla-naive") if c.attention == "mla" else "gqa"
        self.pos, self.max_len = 0, max_len
        p = next(model.parameters())
        new = dict(dtype=p.dtype, device=p.device)
        if self.layout == "gqa":
            shapes = [(batch, c.n_kv_head, max_len, c.head_dim)] * 2
        elif self.layout == "mla-naive":
            shapes = [(batch, c.n_head, max_len, c.head_dim), (batch, c.n_head, max_len, c.v_head_dim)]
        else:
            shapes = [(batch, max_len, c.kv_lora_rank), (batch, max_len, c.qk_rope_head_dim)]
        self.layers = [tuple(torch.zeros(s, **new) for s in shapes) for _ in range(c.n_layer)]

    def nbytes(self) -> int:
        """Bytes of the filled positions, all layers: what one decode step reads from the cache."""
        return sum(t.element_size() * t.numel() // self.max_len * self.pos for layer in self.layers for t in layer)


def _mask(T: int, S: int, device: torch.device) -> torch.Tensor | None:
    """Query ``t`` (position ``S − T + t``) sees cache positions up to its own; None when ``T = 1`` (sees all)."""
    if T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v`` for queries ``(B, H, T, d)`` over cached keys ``(B, KV, S, d)`` and values
    ``(B, KV, S, d_v)``, each key/value head shared by ``H / KV`` query heads (grouped-query attention): ``(B, H, T,
    d_v)``. Written as two batched matmuls, which read the cache once without copying it: for a decode step's few
    queries this torch's CPU ``scaled_dot_product_attention`` kernel takes about three times as long."""
    B, H, T, d = q.shape
    KV = k.shape[1]
    scores = q.view(B, KV, H // KV, T, d) @ k.unsqueeze(2).transpose(-1, -2) * (d ** -0.5 if scale is None
                                                                                 else scale)   # (B, KV, G, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.unsqueeze(2)).view(B, H, T, v.shape[-1])


def _write(buffer: torch.Tensor, new: torch.Tensor, pos: int, dim: int) -> torch.Tensor:
    """Store ``new`` at positions ``pos…`` along ``dim`` of ``buffer``; return the filled part (a view)."""
    T = new.shape[dim]
    buffer.narrow(dim, pos, T).copy_(new)
    return buffer.narrow(dim, 0, pos + T)


def gqa_step(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple, pos: int) -> torch.Tensor:
    """Grouped-query attention of ``x`` ``(B, T, d)`` at positions ``pos…``: append its keys and values to the
    cache, attend over all ``pos + T``."""
    B, T, _ = x.shape
    q, k, v = attn.project(x, cos, sin)
    k, v = _write(cache[0], k, pos, 2), _write(cache[1], v, pos, 2)
    y = attend(q, k, v, _mask(T, pos + T, x.device))
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1))


def mla_naive_step(attn: MultiHeadLatentAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: tuple, pos: int) -> torch.Tensor:
    """MLA with every head's key and value materialised from the new tokens' latent and cached."""
    B, T, _ = x.shape
    H = attn.n_head
    q_nope, q_pe = attn.queries(x, cos, sin)
    c_kv, k_pe = attn.latent(x, cos, sin)
    k_nope, v = attn.wkv_b(c_kv).view(B, T, H, attn.nope + attn.v_dim).transpose(1, 2).split(
        [attn.nope, attn.v_dim], -1)
    k = torch.cat([k_nope, k_pe[:, None].expand(B, H, T, attn.rope)], -1)
    k, v = _write(cache[0], k, pos, 2), _write(cache[1], v, pos, 2)
    y = attend(torch.cat([q_nope, q_pe], -1), k, v, _mask(T, pos + T, x.device), attn.scale)
    return attn.wo(y.transpose(1, 2).reshape(B, T, H * attn.v_dim))


def mla_absorbed_step(attn: MultiHeadLatentAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache: tuple, pos: int) -> torch.Tensor:
    """MLA over the cached latent alone: ``W_UK`` folded into the queries, ``W_UV`` applied after attention."""
    B, T, _ = x.shape
    H, r = attn.n_head, attn.kv_lora_rank
    q_nope, q_pe = attn.queries(x, cos, sin)
    c_kv, k_pe = attn.latent(x, cos, sin)
    c_kv, k_pe = _write(cache[0], c_kv, pos, 1), _write(cache[1], k_pe, pos, 1)       # (B, S, r), (B, S, rope)
    w_uk, w_uv = attn.wkv_b.weight.view(H, attn.nope + attn.v_dim, r).split([attn.nope, attn.v_dim], 1)
    q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)                          # queries in latent space
    scores = (torch.einsum("bhtr,bsr->bhts", q_latent, c_kv)
              + torch.einsum("bhtp,bsp->bhts", q_pe, k_pe)) * attn.scale
    mask = _mask(T, pos + T, x.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    o_latent = torch.einsum("bhts,bsr->bhtr", scores.softmax(-1), c_kv)
    y = torch.einsum("bhtr,hvr->bthv", o_latent, w_uv)                              # (B, T, H, v_head_dim)
    return attn.wo(y.reshape(B, T, H * attn.v_dim))


STEPS = {"gqa": gqa_step, "mla-naive": mla_naive_step, "mla-absorbed": mla_absorbed_step}


@torch.no_grad()
def forward_cached(model: Transformer, idx: torch.Tensor, cache: KVCache,
                   hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, T, vocab)`` of the tokens ``idx`` at positions ``cache.pos…``, reading and extending the
    cache; equal to the matching positions of ``model(whole sequence)``. Eval mode (no dropout). With
    ``hidden``, also the last block's output ``(B, T, d_model)`` before the final norm (what a multi-token
    prediction module drafts from)."""
    model._check_ids(idx)
    B, T = idx.shape
    check(B == cache.layers[0][0].shape[0], "forward_cached", "idx", tuple(idx.shape),
          f"allowed: a batch of {cache.layers[0][0].shape[0]} sequences, the cache's")
    check(cache.pos + T <= cache.max_len, "forward_cached", "idx", tuple(idx.shape),
          f"the cache holds {cache.max_len} positions and {cache.pos} are filled; allowed: at most "
          f"{cache.max_len - cache.pos} new ones")
    step, pos = STEPS[cache.layout], cache.pos
    cos, sin = model.rope_cos[pos:pos + T], model.rope_sin[pos:pos + T]
    with evaluating(model):
        x = model.tok_embeddings(idx)
        for block, layer_cache in zip(model.layers, cache.layers):
            x = x + step(block.attn, block.attn_norm(x), cos, sin, layer_cache, pos)
            x = x + block.ffn(block.ffn_norm(x))
        cache.pos += T
        logits = model.output(model.norm(x))
    return (logits, x) if hidden else logits


@torch.no_grad()
def greedy_decode(model: Transformer, idx: torch.Tensor, max_new_tokens: int, absorb: bool = True) -> torch.Tensor:
    """``idx`` ``(B, T)`` with ``max_new_tokens`` greedy tokens appended: prefill once, then one step per token.
    The same tokens as ``model.generate(idx, max_new_tokens, temperature=0)`` while the sequence fits
    ``block_size`` (that one re-reads the whole context every step; this one reads the cache)."""
    check_int("greedy_decode", "max_new_tokens", max_new_tokens, 0)
    cache = KVCache(model, idx.shape[0], idx.shape[1] + max(max_new_tokens - 1, 0), absorb)
    logits = forward_cached(model, idx, cache)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
        if i + 1 < max_new_tokens:                  # the last token's own logits are not needed
            logits = forward_cached(model, nxt, cache)
    return idx
