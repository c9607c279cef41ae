"""Which experts each domain's tokens use: routing statistics for trained MoE models.

Built in notebooks/04_moe_vs_dense.ipynb.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import TextData
from .model import Transformer, evaluating


def routing_by_domain(model: Transformer, data: TextData, split: str = "val", batch_size: int = 16,
                      n_batches: int = 2, seed: int = 0) -> np.ndarray:
    """``(MoE layers, domains, experts)``: the fraction of each domain's token-to-expert assignments that go
    to each expert, from ``n_batches`` fixed batches of that domain (rows sum to 1)."""
    E = model.config.n_routed_experts
    out = np.zeros((len(model.moe_layers), len(data.domains), E))
    with evaluating(model):
        for d, domain in enumerate(data.domains):
            for i in range(n_batches):
                x, _ = data.batch(split, batch_size, model.config.block_size, seed + i, domain)
                model(x.to(model.device))
                for layer, moe in enumerate(model.moe_layers):
                    out[layer, d] += torch.bincount(moe.indices.flatten(), minlength=E).cpu().numpy()
    return out / out.sum(-1, keepdims=True)


def domain_expert_information(fractions: np.ndarray) -> np.ndarray:
    """Mutual information (bits) between a token's domain and the expert it is sent to, per layer, for
    ``fractions`` ``(layers, domains, experts)`` with equally weighted domains: 0 when every domain uses the
    experts alike, ``log2(domains)`` at most, when each expert serves one domain only."""
    joint = fractions / fractions.shape[1]                                        # p(domain, expert)
    p_expert = joint.sum(1, keepdims=True)
    p_domain = joint.sum(2, keepdims=True)
    ratio = np.divide(joint, p_domain * p_expert, out=np.ones_like(joint), where=joint > 0)
    return (joint * np.log2(ratio)).sum(axis=(1, 2))


def top_expert_per_token(model: Transformer, tokenizer, text: str) -> np.ndarray:
    """``(MoE layers, characters)``: the best-scoring expert of every character of ``text`` (at most
    ``block_size`` characters) in each MoE layer."""
    idx = tokenizer.encode(text[:model.config.block_size])[None].to(model.device)
    with evaluating(model):
        model(idx)
    return np.stack([moe.indices[0, :, 0].cpu().numpy() for moe in model.moe_layers])


def token_identity_share(model: Transformer, data: TextData, split: str = "val", batch_size: int = 16,
                         seed: int = 0, shuffle: bool = False) -> np.ndarray:
    """``(MoE layers,)``: the share of tokens whose first-choice expert is the one most often chosen for that
    same token id, over one batch from each domain. 1 means the router decides by the token alone, whatever its
    context — the "context-independent specialisation" OpenMoE found (Xue et al. 2024, §4); lower values mean the
    context matters. With ``shuffle=True`` the first choices are randomly permuted among the tokens first: the
    share that chance alone gives with the same expert loads, the baseline to compare with."""
    x = torch.cat([data.batch(split, batch_size, model.config.block_size, seed, domain)[0] for domain in data.domains])
    with evaluating(model):
        model(x.to(model.device))
    V, E = model.config.vocab_size, model.config.n_routed_experts
    generator = torch.Generator().manual_seed(seed)
    shares = []
    for moe in model.moe_layers:
        first = moe.indices[..., 0].flatten().cpu()
        if shuffle:
            first = first[torch.randperm(len(first), generator=generator)]
        pairs = torch.bincount(x.flatten() * E + first, minlength=V * E).view(V, E)
        shares.append((pairs.max(1).values.sum() / pairs.sum()).item())
    return np.array(shares)
