"""Multi-token prediction (MTP): DeepSeek-V3's modules that predict the token after the next one.

Module ``k`` (``k = 1…D``, ``D = mtp_depth``) at position ``i`` joins the previous depth's hidden state
``h_i^{k−1}`` to the embedding of token ``t_{i+k}`` — ``h^0`` is the main model's last block output, before the
final norm — through ``M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k−1})]`` (``eh_proj`` over ``enorm`` and
``hnorm``), passes the result through one transformer block ``TRM_k`` and predicts token ``t_{i+k+1}`` with the
main model's output head after a norm of its own (``shared_head.norm``). Embedding and output head are the main
model's, shared rather than copied. The modules run in sequence, so each prediction keeps its full causal chain,
and training adds ``λ · (1/D) · Σ_k CE_k`` to the loss (DeepSeek-V3 §2.2; V3 trains ``D = 1``, λ = 0.3 for the
first 10 T tokens, then 0.1, §4.2). The paper writes the concatenation hidden state first; the released checkpoints'
``eh_proj``, as vLLM's ``DeepSeekMultiTokenPredictorLayer`` reads it, takes the embedding first, the order used
here (the two differ by a permutation of ``M_k``'s columns).

The MTP blocks' MoE layers are not in :attr:`moelab.model.Transformer.moe_layers`: that list describes the main
model, the one served when the modules are dropped, and routing statistics, expert parallelism, expert placement
and the ``active`` parameter count read it. They are balanced all the same: their balancing losses are part of
:func:`mtp_loss`, and :meth:`~moelab.model.Transformer.after_step` applies their aux-loss-free bias updates
(:attr:`~moelab.model.Transformer.mtp_moe_layers`). Data-parallel training sums only the main layers' expert loads
over the ranks (:func:`moelab.dp.sum_expert_loads`), so there the MTP layers' biases follow each rank's own loads.

At inference the modules can be dropped — the main model does not read them — or used to speculate (§5.4.3):
module 1 drafts the token after next from the hidden state the main model has just computed, and the main model's
next pass verifies the draft along with the token it had to process anyway. DeepSeek reports 85–90% of the drafts
of the second token accepted and 1.8× the tokens per second. :func:`moelab.speculative.speculative_decode` does
this greedily, so its output is greedy decoding's, token for token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import RMSNorm
from .moe import MoE


class MTPModule(nn.Module):
    """MTP module ``k``: ``enorm``, ``hnorm``, the projection ``eh_proj`` (``M_k``, ``2·d_model → d_model``), one
    transformer ``block`` (``TRM_k``) and ``shared_head.norm``; the Hugging Face and vLLM names.

    ``block`` is a :class:`moelab.model.Block` that the model builds as its layer ``n_layer + k − 1`` (DeepSeek-V3's
    checkpoint stores its MTP layer as ``model.layers.61``), so an MoE config gets an MoE block.
    """

    def __init__(self, config: ModelConfig, block: nn.Module):
        super().__init__()
        d, eps = config.d_model, config.norm_eps
        self.enorm, self.hnorm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(d, eps)})   # shared_head.head is the main model's output

    @property
    def moe(self) -> MoE | None:
        """The block's MoE layer, or None when its FFN is dense."""
        return self.block.ffn if isinstance(self.block.ffn, MoE) else None

    def combine(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``M_k [RMSNorm(emb); RMSNorm(h)]``: the block's input ``(B, T, d_model)``."""
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], -1))

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``h^k``: this depth's hidden states ``(B, T, d_model)``, before ``shared_head.norm``."""
        return self.block(self.combine(h, emb), cos, sin)

    def logits(self, h: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        """Logits of this depth's hidden states through ``shared_head.norm`` and the shared output ``head``."""
        return head(self.shared_head["norm"](h))


def depth_logits(model: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """Every MTP depth's logits on a sequence whose main-model hidden states are ``h`` ``(B, T, d_model)`` and next
    tokens ``targets`` ``(B, T)``. Module ``k`` at position ``i`` reads ``h_i^{k−1}`` and token ``i + k``
    (``targets[:, i+k−1]``) and predicts token ``i + k + 1`` (``targets[:, i+k]``), at the first ``T − k``
    positions: depth ``k``'s logits are ``(B, T − k, vocab)``. Depths that leave no position (``k ≥ T``) are left
    out."""
    out = []
    for k, module in enumerate(model.mtp[:h.shape[1] - 1], start=1):
        T = h.shape[1] - 1
        h = module(h[:, :T], model.tok_embeddings(targets[:, k - 1:k - 1 + T]), model.rope_cos, model.rope_sin)
        out.append(module.logits(h, model.output))
    return out


def depth_losses(model: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """``CE_k`` of every depth of :func:`depth_logits`: the mean cross-entropy of token ``i + k + 1``."""
    return [F.cross_entropy(logits.flatten(0, 1).float(), targets[:, k:].flatten())
            for k, logits in enumerate(depth_logits(model, h, targets), start=1)]


def mtp_loss(model: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What the MTP modules add to the training loss: ``λ · mean_k CE_k`` (:func:`depth_losses`; DeepSeek-V3 §2.2)
    plus the balancing losses of the MoE layers in the blocks that ran. Zero for a model without MTP."""
    losses = depth_losses(model, h, targets)
    zero = torch.zeros((), device=h.device)
    if not losses:
        return zero
    balance = sum((m.moe.aux_loss for m in model.mtp[:len(losses)] if m.moe is not None), zero)
    return model.config.mtp_loss_weight * torch.stack(losses).mean() + balance
