"""Speculative decoding with DeepSeek-V3's MTP module as the drafter: the same tokens as greedy decoding, in fewer
passes of the main model.

A decode step at small batch waits on memory (:mod:`moelab.roofline`), so a pass over two positions costs little
more than a pass over one. :func:`speculative_decode` lets MTP module 1 (:mod:`moelab.mtp`) guess the token after
the next one from the hidden state the main model just computed; the main model's next pass checks that guess along
with the token it had to process anyway, and keeps it when it is the token greedy decoding would choose (Leviathan
et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; DeepSeek-V3 §5.4.3: 85–90% of the second
tokens accepted, 1.8× the tokens per second).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import check, check_int
from .decode import STEPS, KVCache, forward_cached
from .model import Transformer, evaluating


@dataclass
class SpeculativeStats:
    """What one :func:`speculative_decode` did: drafts ``proposed`` and ``accepted``, and main-model
    ``forward_passes`` (the prefill included). Each pass yields one token and each accepted draft one more."""

    proposed: int = 0
    accepted: int = 0
    forward_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else math.nan


@torch.no_grad()
def draft(model: Transformer, h: torch.Tensor, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """MTP module 1's greedy guess ``(B, 1)`` of the token after ``tokens[:, -1]``.

    ``h`` ``(B, T, d_model)``: the main model's hidden states at positions ``cache.pos…``; ``tokens`` ``(B, T)``: the
    token after each of those positions. The block's keys and values for the ``T`` positions are appended to
    ``cache`` (a :class:`moelab.decode.KVCache` of one layer)."""
    module, pos, T = model.mtp[0], cache.pos, tokens.shape[1]
    block, cos, sin = module.block, model.rope_cos[pos:pos + T], model.rope_sin[pos:pos + T]
    x = module.combine(h, model.tok_embeddings(tokens))
    x = x + STEPS[cache.layout](block.attn, block.attn_norm(x), cos, sin, cache.layers[0], pos)
    x = x + block.ffn(block.ffn_norm(x))
    cache.pos += T
    return module.logits(x[:, -1:], model.output).argmax(-1)


@torch.no_grad()
def speculative_decode(model: Transformer, idx: torch.Tensor,
                       max_new_tokens: int) -> tuple[torch.Tensor, SpeculativeStats]:
    """``idx`` ``(1, T)`` with ``max_new_tokens`` greedy tokens appended, MTP module 1 drafting and the main model
    verifying: the tokens of :func:`moelab.decode.greedy_decode`, in fewer main-model passes. Also the counts.

    Each pass feeds the main model the newest token and the draft of the one after it, two positions in one cached
    pass (the last pass, with one token to go, feeds the newest alone). The first position's logits give the next
    token; when it equals the draft, the draft is accepted and the second position's logits give one more token.
    A rejected draft's position leaves the cache (``cache.pos`` moves back; the next pass overwrites it). The MTP
    block keeps its own cache, which needs no rollback: its position ``i`` is written from ``h_i`` and token
    ``i + 1`` once both are verified. One sequence at a time: sequences accept different numbers of drafts.
    """
    c = model.config
    check_int("speculative_decode", "max_new_tokens", max_new_tokens, 0)
    check(c.mtp_depth >= 1, "ModelConfig", "mtp_depth", c.mtp_depth,
          "speculative decoding drafts with MTP module 1; allowed: 1 or more")
    check(idx.dim() == 2 and idx.shape[0] == 1, "speculative_decode", "idx", tuple(idx.shape),
          "allowed: one sequence, shape (1, T)")
    T = idx.shape[1]
    check(T + max_new_tokens - 1 <= c.block_size, "speculative_decode", "max_new_tokens", max_new_tokens,
          f"the {T} prompt tokens and the new ones but the last must fit block_size = {c.block_size}; allowed: "
          f"0..{c.block_size - T + 1}")
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return idx, stats
    end = T + max_new_tokens
    cache, draft_cache = KVCache(model, 1, end - 1), KVCache(model, 1, end - 1)
    draft_cache.layers = draft_cache.layers[:1]       # sized like the main model's; the MTP block needs one layer
    with evaluating(model):
        logits, h = forward_cached(model, idx, cache, hidden=True)
        stats.forward_passes = 1
        seq = torch.cat([idx, logits[:, -1:].argmax(-1)], 1)        # seq[:, -1] is not in the main cache yet
        while seq.shape[1] < end:
            drafting = seq.shape[1] + 1 < end                       # two tokens or more to go
            new = seq[:, -1:]
            if drafting:
                new = torch.cat([new, draft(model, h, seq[:, draft_cache.pos + 1:], draft_cache)], 1)
            logits, h = forward_cached(model, new, cache, hidden=True)
            greedy = logits.argmax(-1)                                  # (1, 1) or (1, 2)
            accepted = drafting and bool(greedy[0, 0] == new[0, 1])
            if drafting and not accepted:
                cache.pos -= 1
                h = h[:, :1]
            seq = torch.cat([seq, greedy[:, :1 + accepted]], 1)
            stats.forward_passes += 1
            stats.proposed += drafting
            stats.accepted += accepted
    return seq, stats
