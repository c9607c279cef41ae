"""The MoE layer: a router, routed experts, optional shared experts, and the balancing that keeps them in use.

``y = Σ_{i ∈ TopK(x)} g_i(x) · E_i(x) + Σ_j S_j(x)``: every token passes through the shared experts (a dense
SwiGLU of width ``n_shared_experts · d_expert``, DeepSeekMoE: Dai et al. 2024) and through its ``top_k`` routed
experts, weighted by the router's gates. It fills the FFN slot of :class:`moelab.model.Block`:
:func:`ffn_for_layer` puts one in every layer from ``first_k_dense`` on. Built in notebooks/02_moe_layer.ipynb.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .balance import router_z_loss, sequence_aux_loss, switch_aux_loss, tokens_per_expert, update_bias
from .config import ModelConfig
from .dispatch import DROPLESS, capacity_dispatch
from .ep import WIRES, expert_parallel
from .ffn import Experts, SwiGLU
from .network import Network, Topology
from .router import SigmoidRouter, SoftmaxRouter
from .timeline import Timeline, phase
from .twohop import two_hop_expert_parallel

ROUTER_CLASSES = {"softmax": SoftmaxRouter, "sigmoid": SigmoidRouter}   # the names of config.ROUTERS


class MoE(nn.Module):
    """A mixture-of-experts FFN configured by the MoE fields of :class:`~moelab.config.ModelConfig`.

    After each forward pass: ``aux_loss`` holds the weighted balancing losses (to add to the training loss),
    ``indices`` the experts each token chose ``(…, k)``, best first, ``counts`` how many assignments chose each
    expert ``(E,)`` (before any capacity drop) and ``dropped`` the fraction of assignments capacity dispatch
    dropped. In training, counts accumulate until
    :meth:`after_step` applies the aux-loss-free bias update (if ``bias_update_speed > 0``). Set ``timeline`` to
    a :class:`~moelab.timeline.Timeline` to record the route phase of every forward pass and, with expert
    parallelism, the dispatch, expert and combine phases with their bytes, and in backward the combine, expert
    and dispatch phases (the router's backward is not timed on its own).

    Capacity dispatch applies in training only. It is not causal (a later token can take an earlier token's
    place in an expert), so evaluation and generation run the dropless grouped path, as Switch-style models can
    at inference with a capacity large enough to drop nothing.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        self.router = ROUTER_CLASSES[c.router](c.d_model, c.n_routed_experts, c.top_k, c.norm_topk_prob,
                                        c.routed_scaling_factor, c.n_group, c.topk_group)
        self.experts = Experts(c.n_routed_experts, c.d_model, c.d_expert)
        self.shared = SwiGLU(c.d_model, c.n_shared_experts * c.d_expert) if c.n_shared_experts else None
        self.register_buffer("step_counts", torch.zeros(c.n_routed_experts, dtype=torch.long), persistent=False)
        self.aux_loss = torch.zeros(())
        self.counts = torch.zeros(c.n_routed_experts, dtype=torch.long)
        self.kept = torch.ones(0, c.top_k, dtype=torch.bool)
        self.indices = torch.zeros(0, c.top_k, dtype=torch.long)
        self.expert_parallel, self.ep_group, self.wire = False, None, "fp32"
        self.net: Network | None = None
        self.two_hop: Topology | None = None
        self.timeline: Timeline | None = None

    @torch.no_grad()
    def shard_experts(self, group: dist.ProcessGroup | None = None, wire: str = "fp32", net: Network | None = None,
                      two_hop: Topology | None = None) -> None:
        """Expert parallelism, in place: keep only this rank's ``n_routed_experts / world_size`` experts (rank ``r``
        holds experts ``r·E_local … (r+1)·E_local − 1``) and exchange tokens with the other ranks in forward
        (:func:`moelab.ep.expert_parallel`). The router and shared experts stay whole on every rank. ``wire``
        is what the exchanges send (:data:`moelab.ep.WIRES`): fp32 rows, or DeepSeek-V3's FP8 dispatch and BF16
        combine. With ``net`` the exchanges cross an emulated network; with ``two_hop``, a topology of nodes, they
        go in two hops, one copy of a token per node (:func:`moelab.twohop.two_hop_expert_parallel`)."""
        if wire not in WIRES:
            raise ValueError(f"wire = {wire!r} is not allowed; allowed: {', '.join(WIRES)}")
        c, world, rank = self.config, dist.get_world_size(group), dist.get_rank(group)
        if c.n_routed_experts % world:
            raise ValueError(f"n_routed_experts = {c.n_routed_experts} cannot be split over {world} ranks; allowed: "
                             f"a multiple of the world size")
        if c.dispatch == "capacity":
            raise ValueError("dispatch = 'capacity' is not supported with expert parallelism; allowed: a dropless "
                             "dispatch ('loop', 'sorted', 'grouped'), which all run as grouped")
        E_local = c.n_routed_experts // world
        local = Experts(E_local, c.d_model, c.d_expert).to(self.experts.w_gate)
        for name, p in local.named_parameters():
            p.copy_(getattr(self.experts, name)[rank * E_local:(rank + 1) * E_local])
        self.experts, self.expert_parallel, self.ep_group, self.wire = local, True, group, wire
        self.net, self.two_hop = net, two_hop

    @property
    def dropped(self) -> float:
        """Fraction of the last forward pass's assignments that capacity dispatch dropped."""
        return 1.0 - self.kept.float().mean().item() if self.kept.numel() else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        rows = x.reshape(-1, x.shape[-1])                                          # (B·T, d_model)
        if rows.shape[0] == 0 and not self.expert_parallel:       # with EP, still join the all-to-alls
            self.aux_loss = torch.zeros((), device=x.device)
            return torch.zeros_like(x)
        with phase(self.timeline, "route"):
            routing = self.router(rows)
        if self.expert_parallel:
            if self.two_hop is not None:
                y = two_hop_expert_parallel(rows, routing, self.experts, c.n_routed_experts, self.two_hop, self.net,
                                            self.timeline, self.wire)
            else:
                y = expert_parallel(rows, routing, self.experts, c.n_routed_experts, self.ep_group, self.timeline,
                                    self.wire, self.net)
            self.kept = torch.ones_like(routing.indices, dtype=torch.bool)
        elif c.dispatch == "capacity" and self.training:
            y, self.kept = capacity_dispatch(rows, routing, self.experts, c.capacity_factor)
        else:
            y, self.kept = DROPLESS["grouped" if c.dispatch == "capacity" else c.dispatch](rows, routing, self.experts)
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
        With expert parallelism the loads of all ranks are summed first, so every rank applies the same update."""
        if self.config.bias_update_speed > 0:
            if self.expert_parallel:
                dist.all_reduce(self.step_counts, group=self.ep_group)
            update_bias(self.router.bias, self.step_counts, self.config.bias_update_speed)
        self.step_counts.zero_()


def ffn_for_layer(config: ModelConfig, layer: int) -> nn.Module:
    """The FFN of block ``layer``: a dense SwiGLU of width ``d_ff`` for a dense model and for the first
    ``first_k_dense`` layers (DeepSeek-V3 keeps 3, Kimi K2 1), an :class:`MoE` everywhere else."""
    if config.n_routed_experts and layer >= config.first_k_dense:
        return MoE(config)
    return SwiGLU(config.d_model, config.d_ff, config.dropout)
