"""Load balancing: the losses and the bias update that keep experts evenly used, and the statistics to watch.

With no pressure to spread tokens, a router tends to send most tokens to a few experts that then learn fastest
("routing collapse"). The remedies the course compares, each with its source:

- :func:`switch_aux_loss` — Switch Transformer (Fedus et al. 2021, eq. 4), ``E · Σ_i f_i P_i``;
- :func:`router_z_loss` — ST-MoE (Zoph et al. 2022, eq. 5), keeps router logits small;
- :func:`sequence_aux_loss` — DeepSeek-V3's complementary sequence-wise balance loss (arXiv:2412.19437 eq. 17–20);
- :func:`update_bias` — DeepSeek-V3's auxiliary-loss-free balancing (§2.1.2): after each step, lower the
  selection bias of overloaded experts by γ and raise that of underloaded ones.

Built in notebooks/03_load_balancing.ipynb.

Shapes: ``T`` tokens, ``E`` experts, ``k`` choices per token; the sequence-wise loss sees ``B`` sequences
of ``S`` tokens.
"""
from __future__ import annotations

import torch


def tokens_per_expert(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many of the ``(…, k)`` assignments went to each expert: ``(E,)``."""
    return torch.bincount(indices.flatten(), minlength=n_experts)


def switch_aux_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``E · Σ_i f_i · P_i``: ``f_i`` the fraction of the ``T·k`` assignments sent to expert ``i``, ``P_i`` the
    mean router probability of ``i``. Equals 1 when both are uniform, and grows as routing concentrates.

    With top-k, Switch's ``f_i`` (top-1 fraction) becomes the fraction of all k assignments. Hugging Face's
    ``load_balancing_loss_func`` (Mixtral, Qwen3) divides the counts by ``T`` instead of ``T·k``, so its value
    is ``k`` at perfect balance: the same loss scaled by ``k``.
    """
    E = probs.shape[-1]
    f = tokens_per_expert(indices, E).float() / indices.numel()
    return E * (f * probs.reshape(-1, E).mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean over tokens of (log Σ_j exp(logit_j))²`` (ST-MoE): penalises large logits, which make the
    softmax brittle in low precision."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def sequence_aux_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``Σ_i f_i P_i``, computed per sequence and averaged.

    ``probs`` ``(B, S, E)`` are each token's affinities normalised to sum to 1; ``indices`` ``(B, S, k)``.
    ``f_i = E / (k·S) · #{t : i ∈ TopK_t}`` and ``P_i = (1/S) · Σ_t s'_{i,t}``, so the loss is 1 for a
    perfectly balanced sequence. DeepSeek-V3 weights it by α = 0.0001: a safety net, not the main mechanism.
    ``indices`` are the experts actually chosen (with the balancing bias), whose load is what it balances; the
    report's eq. 18 writes the top-k of the unbiased scores.
    """
    B, S, E = probs.shape
    k = indices.shape[-1]
    counts = torch.zeros(B, E, device=probs.device).scatter_add_(
        1, indices.reshape(B, S * k), torch.ones(B, S * k, device=probs.device))
    f = counts * E / (k * S)
    return (f * probs.mean(1)).sum(-1).mean()


@torch.no_grad()
def update_bias(bias: torch.Tensor, counts: torch.Tensor, speed: float) -> None:
    """DeepSeek-V3 aux-loss-free update, in place: ``b_i -= γ`` if expert ``i`` got more than the mean load
    in the last step, ``b_i += γ`` if it got less (γ = ``speed``; DeepSeek-V3 used 0.001). The rule as the
    report states it; torchtitan also subtracts the update's mean, so that the biases cannot drift together."""
    bias += speed * torch.sign(counts.float().mean() - counts.float())


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """Summary of a load vector: max/mean (1 is perfect), coefficient of variation, and idle experts."""
    c = counts.float()
    mean = c.mean()
    return {"max_over_mean": (c.max() / mean).item(), "cv": (c.std(unbiased=False) / mean).item(),
            "idle_experts": int((c == 0).sum())}
