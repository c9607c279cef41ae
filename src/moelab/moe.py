"""The MoE layer: a router, routed experts, optional shared experts, and the balancing that keeps them in use.

``y = Σ_{i ∈ TopK(x)} g_i(x) · E_i(x) + Σ_j S_j(x)``: every token passes through the shared experts (a dense
SwiGLU of width ``n_shared_experts · d_expert``, DeepSeekMoE: Dai et al. 2024) and through its ``top_k`` routed
experts, weighted by the router's gates. It fills the FFN slot of :class:`moelab.model.Block`:
:func:`ffn_for_layer` puts one in every layer from ``first_k_dense`` on. Built in notebooks/02_moe_layer.ipynb.

Shapes: ``T`` tokens (the input's leading dimensions, ``…``, flattened), ``E`` routed experts, ``k`` = ``top_k``
choices per token.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .balance import router_z_loss, sequence_aux_loss, switch_aux_loss, tokens_per_expert, update_bias
from .config import ModelConfig
from .dispatch import LocalDispatcher
from .ffn import Experts, SwiGLU
from .router import SigmoidRouter, SoftmaxRouter

ROUTER_CLASSES = {"softmax": SoftmaxRouter, "sigmoid": SigmoidRouter}   # the names of config.ROUTERS


class MoE(nn.Module):
    """A mixture-of-experts FFN configured by the MoE fields of :class:`~moelab.config.ModelConfig`: a router,
    routed experts, optional shared experts and a *dispatcher* that moves the tokens to their experts.

    The dispatcher is a seam, as torchtitan's ``token_dispatcher`` and Megatron's ``MoETokenDispatcher`` are: by
    default a :class:`~moelab.dispatch.LocalDispatcher` that runs ``config.dispatch`` on the experts in this
    process; :func:`moelab.ep.shard` keeps this rank's slice of the experts and swaps in a dispatcher that sends
    tokens to the ranks holding theirs (flat or in two hops, in a wire format, over an emulated network). The
    layer itself knows nothing of processes.

    After each forward pass: ``aux_loss`` holds the weighted balancing losses (to add to the training loss),
    ``indices`` the experts each token chose ``(…, k)``, best first, ``counts`` how many assignments chose each
    expert ``(E,)`` (before any capacity drop) and ``dropped`` the fraction of assignments capacity dispatch
    dropped. In training, counts accumulate until :meth:`after_step` applies the aux-loss-free bias update (if
    ``bias_update_speed > 0``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        self.router = ROUTER_CLASSES[c.router](c.d_model, c.n_routed_experts, c.top_k, c.norm_topk_prob,
                                               c.routed_scaling_factor, c.n_group, c.topk_group)
        self.experts = Experts(c.n_routed_experts, c.d_model, c.d_expert)
        self.shared = SwiGLU(c.d_model, c.n_shared_experts * c.d_expert) if c.n_shared_experts else None
        self.dispatcher = LocalDispatcher(c.dispatch, c.capacity_factor)
        self.register_buffer("step_counts", torch.zeros(c.n_routed_experts, dtype=torch.long), persistent=False)
        self.aux_loss = torch.zeros(())
        self.counts = torch.zeros(c.n_routed_experts, dtype=torch.long)
        self.kept = torch.ones(0, c.top_k, dtype=torch.bool)
        self.indices = torch.zeros(0, c.top_k, dtype=torch.long)

    @property
    def expert_parallel(self) -> bool:
        """Whether other processes hold some of this layer's experts (its dispatcher exchanges tokens)."""
        return self.dispatcher.expert_parallel

    @property
    def dropped(self) -> float:
        """Fraction of the last forward pass's assignments that capacity dispatch dropped."""
        return 1.0 - self.kept.float().mean().item() if self.kept.numel() else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        rows = x.reshape(-1, x.shape[-1])                                          # (T, d_model)
        if rows.shape[0] == 0 and not self.expert_parallel:   # with expert parallelism, still join the exchanges
            self.aux_loss = torch.zeros((), device=x.device)
            return torch.zeros_like(x)
        with self.dispatcher.phase("route"):
            routing = self.router(rows)
        y, self.kept = self.dispatcher(rows, routing, self.experts, self.training)
        self.indices = routing.indices.view(*x.shape[:-1], c.top_k)               # (…, k), best choice first
        self.counts = tokens_per_expert(routing.indices, c.n_routed_experts)
        self.aux_loss = self.balance_loss(routing, x.shape[:-1])
        if self.training and c.bias_update_speed > 0:
            self.step_counts += self.counts
        if self.shared is not None:
            y = y + self.shared(rows)
        return y.view_as(x)

    def balance_loss(self, routing, batch_shape: torch.Size) -> torch.Tensor:
        """``aux_loss_coef · Switch + z_loss_coef · z-loss + seq_aux_coef · sequence-wise`` (zero if all are 0).

        Each MoE layer adds its own; :attr:`moelab.model.Transformer.aux_loss` sums them over layers (Hugging
        Face instead computes one Switch loss over all layers' router logits together, closer to a mean).
        The sequence-wise loss counts the experts actually chosen (with the bias), as the load it balances is.
        """
        c, loss = self.config, torch.zeros((), device=routing.logits.device)
        if c.aux_loss_coef:
            loss = loss + c.aux_loss_coef * switch_aux_loss(routing.probs, routing.indices)
        if c.z_loss_coef:
            loss = loss + c.z_loss_coef * router_z_loss(routing.logits)
        if c.seq_aux_coef:
            B = batch_shape[0] if len(batch_shape) > 1 else 1
            loss = loss + c.seq_aux_coef * sequence_aux_loss(routing.probs.view(B, -1, c.n_routed_experts),
                                                             routing.indices.view(B, -1, c.top_k))
        return loss

    @torch.no_grad()
    def after_step(self) -> None:
        """Apply DeepSeek-V3's bias update for the loads counted since the last optimizer step, then reset them.
        The dispatcher totals the loads over the layer (with expert parallelism, over all ranks), so that every
        rank applies the same update."""
        if self.config.bias_update_speed > 0:
            update_bias(self.router.bias, self.dispatcher.total_counts(self.step_counts),
                        self.config.bias_update_speed)
        self.step_counts.zero_()


def ffn_for_layer(config: ModelConfig, layer: int) -> nn.Module:
    """The FFN of block ``layer``: a dense SwiGLU of width ``d_ff`` for a dense model and for the first
    ``first_k_dense`` layers (DeepSeek-V3 keeps 3, Kimi K2 1), an :class:`MoE` everywhere else."""
    if config.n_routed_experts and layer >= config.first_k_dense:
        return MoE(config)
    return SwiGLU(config.d_model, config.d_ff, config.dropout)
