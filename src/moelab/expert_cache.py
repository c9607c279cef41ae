"""Experts that do not fit: an LRU expert cache per layer, speculative prefetch, and the tokens/s they allow.

When the routed experts do not fit in the fast tier (GPU memory) they live in a slower one (host memory, disk), and
each MoE layer keeps a few resident in an LRU cache: a resident expert runs at once, any other is a *miss* that
waits for a load over the slow link. A trained router favours some experts and repeats some choices from token to
token, which is what makes the cache pay. *Speculative expert loading* hides more loads: layer ``l``'s gate,
applied to the hidden state layer ``l − 1``'s gate reads (the residual stream changes little between layers),
guesses layer ``l``'s experts while layer ``l − 1`` computes. Source: Eliseev & Mazur 2023, "Fast Inference of
Mixture-of-Experts Language Models with Offloading" (arXiv:2312.17238, §3.1 LRU cache, §3.2 speculative loading;
github.com/dvmazur/mixtral-offloading).

Each of the ``B`` sequences of a trace is decoded alone (batch size 1, the paper's setting), with its own caches.
Shapes: ``T`` decode steps, ``B`` sequences, ``k`` = ``top_k``, ``L`` MoE layers, ``E`` routed experts per layer.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .config import check, check_float, check_int
from .model import Transformer, evaluating
from .moe import MoE


@dataclass(frozen=True)
class CacheStats:
    """One layer's cache over a trace: ``tokens`` decoded, expert ``uses`` (``tokens · k``), ``hits`` among them,
    and ``loads`` from the slow tier. A token waits for its misses (:attr:`misses_per_token`); prefetched experts,
    right or wrong guesses, load off that critical path (:attr:`prefetched_per_token`)."""

    tokens: int
    uses: int
    hits: int
    loads: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses

    @property
    def misses_per_token(self) -> float:
        return (self.uses - self.hits) / self.tokens

    @property
    def prefetched_per_token(self) -> float:
        return (self.loads - self.uses + self.hits) / self.tokens


def routing_trace(model: Transformer, idx: torch.Tensor) -> list[torch.Tensor]:
    """The experts each MoE layer chooses at each step of decoding ``idx`` ``(B, T)`` token by token: one
    ``(T, B, k)`` long tensor per layer, best choice first.

    The model is causal, so one forward pass over the whole sequence routes position ``t`` as a token-by-token
    decode with a KV cache does at step ``t`` (up to float rounding at near ties): this runs that one pass, in
    eval mode, and reads each layer's :attr:`moelab.moe.MoE.indices`.
    """
    with evaluating(model):
        model(idx)
    return [moe.indices.transpose(0, 1).clone() for moe in model.moe_layers]


def _gate_inputs(model: Transformer, idx: torch.Tensor) -> list[torch.Tensor]:
    """Run ``model`` on ``idx`` ``(B, T)`` in eval mode; return what each MoE router read, ``(B·T, d_model)``."""
    seen: list[torch.Tensor] = []
    hooks = [moe.router.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
             for moe in model.moe_layers]
    try:
        with evaluating(model):
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return seen


def prefetch_guesses(model: Transformer, idx: torch.Tensor, n_guess: int | None = None) -> list[torch.Tensor]:
    """Speculative guesses for layers ``1 … L−1``: element ``l − 1`` is ``(T, B, n_guess)``, the experts layer
    ``l``'s router ranks highest when applied to the hidden state that layer ``l − 1``'s router reads.

    This is the variant of Eliseev & Mazur §3.2: the next layer's gate on the *same* hidden state the current
    gate uses (normalised by the current block's ``ffn_norm``), so the guess is known before the current layer's
    experts run and their load overlaps that compute. Layer 0 has no earlier layer and gets no guess. Experts
    are ranked as the router selects them (score plus its balancing bias; group limiting is not applied);
    ``n_guess`` defaults to ``top_k``.
    """
    moes = model.moe_layers
    E, k = moes[0].config.n_routed_experts, moes[0].config.top_k
    n_guess = k if n_guess is None else n_guess
    check(check_int("prefetch_guesses", "n_guess", n_guess) <= E, "prefetch_guesses", "n_guess", n_guess,
          f"allowed: 1..n_routed_experts = {E}")
    hidden, (B, T) = _gate_inputs(model, idx), idx.shape
    guesses = []
    with torch.no_grad():
        for moe, h in zip(moes[1:], hidden[:-1]):
            router = moe.router
            choice = router.scores(router(h).logits) + router.bias                  # (B·T, E)
            guesses.append(choice.topk(n_guess, dim=-1).indices.view(B, T, n_guess).transpose(0, 1))
    return guesses


def guess_accuracy(guesses: torch.Tensor, trace: torch.Tensor) -> float:
    """Fraction of the experts a layer actually used (``trace`` ``(T, B, k)``) that were among its guesses
    ``(T, B, g)`` at the same step: the recall of the prefetch."""
    _check_ids("guess_accuracy", "trace", trace, None)
    _check_ids("guess_accuracy", "guesses", guesses, None, tuple(trace.shape[:2]))
    return (trace[..., :, None] == guesses[..., None, :]).any(-1).float().mean().item()


def lru_hit_rate(trace: torch.Tensor, capacity: int, n_experts: int) -> CacheStats:
    """Simulate one layer's LRU cache of ``capacity`` of its ``n_experts`` experts over ``trace`` ``(T, B, k)``:
    a used expert that is resident is a hit (and becomes the most recently used), any other is loaded, evicting
    the least recently used one when the cache is full. Each sequence starts from an empty cache."""
    return _simulate("lru_hit_rate", trace, None, capacity, n_experts)


def lru_with_prefetch(trace: torch.Tensor, guesses: torch.Tensor, capacity: int, n_experts: int) -> CacheStats:
    """:func:`lru_hit_rate` where, before each step, the guessed experts ``(T, B, g)`` are brought into the cache
    (loaded if absent, made most recent if resident). Their loads overlap the previous layer's compute, so a
    correct guess is a hit; a wrong one costs a load and may evict an expert the token needs."""
    return _simulate("lru_with_prefetch", trace, guesses, capacity, n_experts)


def offload_tokens_per_s(expert_bytes: float, misses_per_token: float, resident_bytes_per_token: float,
                         fast_bw: float, slow_bw: float, prefetched_per_token: float = 0.0) -> float:
    """Decode tokens/s when moving weights is the cost (bandwidths in bytes/s, sizes in bytes).

    A token reads ``resident_bytes_per_token`` from the fast tier and waits for ``misses_per_token`` experts
    (summed over layers) over the slow link: ``resident / fast_bw + misses · expert_bytes / slow_bw``. Prefetched
    experts are loaded behind compute, off that path, but the link still carries them: the time is at least
    ``(misses + prefetched_per_token) · expert_bytes / slow_bw``, and a token takes the larger of the two.
    """
    owner, inf = "offload_tokens_per_s", float("inf")
    for name, value in (("expert_bytes", expert_bytes), ("misses_per_token", misses_per_token),
                        ("resident_bytes_per_token", resident_bytes_per_token),
                        ("prefetched_per_token", prefetched_per_token)):
        check_float(owner, name, value, 0.0, inf, high_open=True)
    for name, value in (("fast_bw", fast_bw), ("slow_bw", slow_bw)):
        check_float(owner, name, value, 0.0, inf, low_open=True, high_open=True)
    critical = resident_bytes_per_token / fast_bw + misses_per_token * expert_bytes / slow_bw
    link = (misses_per_token + prefetched_per_token) * expert_bytes / slow_bw
    check(critical > 0, owner, "resident_bytes_per_token", resident_bytes_per_token,
          "allowed: a number > 0 when nothing is loaded (a token must read something)")
    return 1.0 / max(critical, link)


def bytes_per_expert(moe: MoE) -> int:
    """Bytes of one routed expert's weights (``w_gate``, ``w_up``, ``w_down``): what a miss moves."""
    return sum(p[0].numel() * p.element_size() for p in moe.experts.parameters())


def _check_ids(owner: str, name: str, ids: torch.Tensor, n_experts: int | None,
               steps: tuple[int, int] | None = None) -> None:
    ok = isinstance(ids, torch.Tensor) and ids.dim() == 3 and ids.dtype == torch.long
    ok = ok and (ids.numel() > 0 if steps is None else tuple(ids.shape[:2]) == steps)
    check(ok, owner, name, tuple(ids.shape) if isinstance(ids, torch.Tensor) else ids, "allowed: a non-empty "
          f"(T, B, k) torch.long tensor of expert ids{'' if steps is None else f' with (T, B) = {steps}'}")
    if n_experts is not None and ids.numel():
        low, high = ids.min().item(), ids.max().item()
        check(0 <= low and high < n_experts, owner, name, f"ids {low}..{high}",
              f"allowed: expert ids 0..n_experts - 1 = {n_experts - 1}")


def _simulate(owner: str, trace: torch.Tensor, guesses: torch.Tensor | None, capacity: int,
              n_experts: int) -> CacheStats:
    n_experts = check_int(owner, "n_experts", n_experts)
    check(check_int(owner, "capacity", capacity) <= n_experts, owner, "capacity", capacity,
          f"allowed: 1..n_experts = {n_experts}")
    _check_ids(owner, "trace", trace, n_experts)
    guesses = trace[..., :0] if guesses is None else guesses                     # no guesses: plain LRU
    _check_ids(owner, "guesses", guesses, n_experts, tuple(trace.shape[:2]))
    T, B, k = trace.shape
    uses, ahead = trace.transpose(0, 1).tolist(), guesses.transpose(0, 1).tolist()
    hits = loads = 0
    for b in range(B):
        cache: OrderedDict[int, None] = OrderedDict()
        for t in range(T):
            loads += sum(_touch(cache, e, capacity) for e in ahead[b][t])
            missed = sum(_touch(cache, e, capacity) for e in uses[b][t])
            hits, loads = hits + k - missed, loads + missed
    return CacheStats(tokens=T * B, uses=T * B * k, hits=hits, loads=loads)


def _touch(cache: OrderedDict[int, None], expert: int, capacity: int) -> int:
    """Make ``expert`` the most recently used, loading it (evicting the least recent if full); 1 if it loaded."""
    if expert in cache:
        cache.move_to_end(expert)
        return 0
    if len(cache) == capacity:
        cache.popitem(last=False)
    cache[expert] = None
    return 1
