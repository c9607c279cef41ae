"""Model configuration with validation that names the bad field and what is allowed.

Field names follow the papers the course builds on: ``d_model`` and ``d_ff`` (Vaswani et al. 2017),
``n_head`` / ``n_kv_head`` for grouped-query attention (Ainslie et al. 2023, GQA), ``rope_theta`` for
rotary embeddings (Su et al. 2021, RoFormer). Built in notebooks/01_dense_baseline.ipynb.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration field holds a value that is not allowed; the message names the field and the allowed values."""


def check(ok: bool, owner: str, field: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` naming ``owner.field`` and what is allowed, unless ``ok``."""
    if not ok:
        raise ConfigError(f"{owner}.{field} = {value!r} is not allowed; {allowed}")


def check_int(owner: str, field: str, value: Any, minimum: int = 1) -> int:
    """``value`` must be an integer (Python or NumPy, not a bool) of at least ``minimum``; returns it as ``int``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    check(ok, owner, field, value, f"allowed: an integer >= {minimum}")
    return int(value)


def check_float(owner: str, field: str, value: Any, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` must be a finite real number between ``low`` and ``high``; returns it as ``float``.

    The interval is closed unless ``low_open`` / ``high_open`` say otherwise, and the message prints it so.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    check(ok, owner, field, value, f"allowed: a number in {interval}")
    return float(value)


def set_checked(obj: Any, field: str, value: Any) -> None:
    """Store a validated (normalised) value on a frozen dataclass from its ``__post_init__``."""
    object.__setattr__(obj, field, value)


def from_dict(cls: type, values: dict[str, Any]):
    """Build the dataclass ``cls`` from a dict (e.g. one stored in a checkpoint), naming any unknown field."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field {unknown[0]!r}; allowed fields: {', '.join(allowed)}")
    return cls(**values)


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` in increasing order."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def swiglu_hidden(d_model: int, multiple_of: int = 32) -> int:
    """Llama's SwiGLU width: 2/3 of 4·d_model (same FLOPs as a 4·d GELU MLP), rounded up to ``multiple_of``.

    Source: Touvron et al. 2023 (LLaMA) §2, and ``FeedForward`` in meta-llama/llama ``model.py``.
    """
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def check_routing(owner: str, n_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """The routing shape must be satisfiable: ``k <= E``, groups divide ``E``, and the allowed groups hold at
    least ``k`` experts. Used by :class:`ModelConfig` and by the routers themselves."""
    E, names = n_experts, "n_routed_experts" if owner == "ModelConfig" else "n_experts"
    check(top_k <= E, owner, "top_k", top_k, f"allowed: 1..{names} = {E}")
    check(E % n_group == 0, owner, "n_group", n_group,
          f"it must divide {names} = {E} into equal groups; allowed: {', '.join(map(str, divisors(E)))}")
    check(topk_group <= n_group, owner, "topk_group", topk_group, f"allowed: 1..n_group = {n_group}")
    reachable = topk_group * (E // n_group)
    check(top_k <= reachable, owner, "top_k", top_k,
          f"only topk_group · {names} / n_group = {reachable} experts are reachable; allowed: 1..{reachable}")


ATTENTIONS = ("gqa", "mla")                          # moelab.model.CausalSelfAttention, moelab.mla
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
ROUTERS = ("softmax", "sigmoid")                      # moelab.router.SoftmaxRouter, SigmoidRouter
DISPATCHES = ("loop", "sorted", "grouped", "capacity")  # moelab.dispatch


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only language model. Frozen: derive variants with ``dataclasses.replace`` (which re-validates).

    ``n_kv_head = None`` means ``n_head`` (plain multi-head attention); a divisor of ``n_head`` gives GQA.
    ``head_dim = None`` means ``d_model // n_head``; Qwen3 sets it larger (``n_head · head_dim ≠ d_model``).
    ``qk_norm`` applies an RMSNorm to each head's queries and keys before RoPE (Qwen3's QK-norm).
    ``d_ff = None`` means :func:`swiglu_hidden` of ``d_model``.

    With ``n_routed_experts > 0`` every layer from ``first_k_dense`` on is a mixture of experts
    (:class:`moelab.moe.MoE`): ``top_k`` of ``n_routed_experts`` SwiGLU experts of width ``d_expert`` (default
    ``d_ff``, Mixtral-style full-width experts: a top-k layer then does k times the dense FFN's work; set it
    to ``d_ff // top_k`` to match active compute) plus ``n_shared_experts`` always-on ones; ``router``
    ``"softmax"`` (Mixtral, Qwen3) or ``"sigmoid"`` (DeepSeek-V3) with ``norm_topk_prob``,
    ``routed_scaling_factor`` and group limiting to the best ``topk_group`` of ``n_group`` groups; ``dispatch``
    one of :data:`DISPATCHES`, ``capacity_factor`` for ``"capacity"``. Balancing: ``aux_loss_coef`` (Switch),
    ``z_loss_coef`` (ST-MoE), ``seq_aux_coef`` (DeepSeek-V3 sequence-wise), ``bias_update_speed`` (DeepSeek-V3
    aux-loss-free γ).

    ``mtp_depth`` = ``D`` > 0 adds DeepSeek-V3's multi-token-prediction modules (:mod:`moelab.mtp`; Hugging Face's
    ``num_nextn_predict_layers``): module ``k`` predicts the token ``k + 1`` positions ahead, and training adds
    ``mtp_loss_weight`` (λ) times their mean cross-entropy to the loss. V3 uses ``D = 1`` and λ = 0.3, later 0.1.
    ``D = 0`` is the model without them.

    ``attention = "mla"`` replaces grouped-query attention by multi-head latent attention (:mod:`moelab.mla`,
    DeepSeek-V2/V3) with ``q_lora_rank`` (0: no query bottleneck), ``kv_lora_rank``, ``qk_nope_head_dim``,
    ``qk_rope_head_dim`` and ``v_head_dim``; ``n_kv_head`` does not apply to it, and ``head_dim`` is its query and
    key head size, ``qk_nope_head_dim + qk_rope_head_dim``.
    """

    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    head_dim: int | None = None
    d_model: int = 128
    d_ff: int | None = None
    dropout: float = 0.0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Attention: "gqa" (grouped-query, n_kv_head) or "mla" (multi-head latent attention, moelab.mla).
    attention: str = "gqa"
    qk_norm: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Mixture of experts (notebooks 02-03); n_routed_experts = 0 keeps every FFN dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    top_k: int = 2
    d_expert: int | None = None
    first_k_dense: int = 0
    router: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    dispatch: str = "grouped"
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    seq_aux_coef: float = 0.0
    bias_update_speed: float = 0.0
    # Multi-token prediction (DeepSeek-V3 §2.2, moelab.mtp); mtp_depth = 0 builds none.
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            set_checked(self, name, check_int(owner, name, getattr(self, name)))
        set_checked(self, "n_kv_head", check_int(owner, "n_kv_head", self.n_head if self.n_kv_head is None
                                                 else self.n_kv_head))
        set_checked(self, "d_ff", check_int(owner, "d_ff", swiglu_hidden(self.d_model) if self.d_ff is None
                                            else self.d_ff))
        check(self.attention in ATTENTIONS, owner, "attention", self.attention,
              f"allowed: {', '.join(map(repr, ATTENTIONS))}")
        if self.attention == "mla":
            self._check_mla(owner)
        else:
            self._check_gqa_heads(owner)
        check(isinstance(self.qk_norm, bool), owner, "qk_norm", self.qk_norm, "allowed: True or False")
        check(self.n_head % self.n_kv_head == 0, owner, "n_kv_head", self.n_kv_head,
              f"it must divide n_head = {self.n_head}; allowed: {', '.join(map(str, divisors(self.n_head)))}")
        set_checked(self, "dropout", check_float(owner, "dropout", self.dropout, 0.0, 1.0, high_open=True))
        set_checked(self, "rope_theta", check_float(owner, "rope_theta", self.rope_theta, 1.0, math.inf,
                                                    low_open=True, high_open=True))
        set_checked(self, "norm_eps", check_float(owner, "norm_eps", self.norm_eps, 0.0, 1.0, low_open=True))
        check(isinstance(self.tie_embeddings, bool), owner, "tie_embeddings", self.tie_embeddings,
              "allowed: True or False")
        set_checked(self, "init_std", check_float(owner, "init_std", self.init_std, 0.0, 1.0))
        self._check_moe(owner)
        set_checked(self, "mtp_depth", check_int(owner, "mtp_depth", self.mtp_depth, 0))
        set_checked(self, "mtp_loss_weight", check_float(owner, "mtp_loss_weight", self.mtp_loss_weight, 0.0,
                                                         math.inf, high_open=True))

    def _check_gqa_heads(self, owner: str) -> None:
        if self.head_dim is None:
            check(self.d_model % 2 == 0, owner, "d_model", self.d_model,
                  "allowed: an even number (RoPE rotates pairs of coordinates, so head_dim must be even)")
            heads = [h for h in divisors(self.d_model) if (self.d_model // h) % 2 == 0]
            shown = ", ".join(map(str, heads)) if len(heads) <= 12 else f"{', '.join(map(str, heads[:8]))}, …"
            check(self.n_head in heads, owner, "n_head", self.n_head,
                  f"it must divide d_model = {self.d_model} into an even head_dim (RoPE rotates pairs); "
                  f"allowed: {shown}")
            set_checked(self, "head_dim", self.d_model // self.n_head)
        set_checked(self, "head_dim", check_int(owner, "head_dim", self.head_dim, 2))
        check(self.head_dim % 2 == 0, owner, "head_dim", self.head_dim,
              "allowed: an even number (RoPE rotates pairs of coordinates)")
        for name in MLA_FIELDS:
            check(getattr(self, name) == 0, owner, name, getattr(self, name), "allowed: 0 unless attention = 'mla'")

    def _check_mla(self, owner: str) -> None:
        for name, minimum in (("q_lora_rank", 0), ("kv_lora_rank", 1), ("qk_nope_head_dim", 0),
                              ("qk_rope_head_dim", 2), ("v_head_dim", 1)):
            set_checked(self, name, check_int(owner, name, getattr(self, name), minimum))
        check(self.qk_rope_head_dim % 2 == 0, owner, "qk_rope_head_dim", self.qk_rope_head_dim,
              "allowed: an even number (RoPE rotates pairs of coordinates)")
        size = self.qk_nope_head_dim + self.qk_rope_head_dim
        check(self.head_dim in (None, size), owner, "head_dim", self.head_dim,
              f"allowed with attention = 'mla': None or qk_nope_head_dim + qk_rope_head_dim = {size}")
        set_checked(self, "head_dim", size)

    def _check_moe(self, owner: str) -> None:
        for name, minimum in (("n_routed_experts", 0), ("n_shared_experts", 0), ("top_k", 1), ("first_k_dense", 0),
                              ("n_group", 1), ("topk_group", 1)):
            set_checked(self, name, check_int(owner, name, getattr(self, name), minimum))
        set_checked(self, "d_expert", check_int(owner, "d_expert", self.d_ff if self.d_expert is None
                                                else self.d_expert))
        check(self.first_k_dense <= self.n_layer, owner, "first_k_dense", self.first_k_dense,
              f"allowed: 0..n_layer = {self.n_layer}")
        check(self.router in ROUTERS, owner, "router", self.router, f"allowed: {', '.join(map(repr, ROUTERS))}")
        check(self.dispatch in DISPATCHES, owner, "dispatch", self.dispatch,
              f"allowed: {', '.join(map(repr, DISPATCHES))}")
        check(isinstance(self.norm_topk_prob, bool), owner, "norm_topk_prob", self.norm_topk_prob,
              "allowed: True or False")
        for name in ("routed_scaling_factor", "capacity_factor"):
            set_checked(self, name, check_float(owner, name, getattr(self, name), 0.0, math.inf,
                                                low_open=True, high_open=True))
        for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_coef", "bias_update_speed"):
            set_checked(self, name, check_float(owner, name, getattr(self, name), 0.0, math.inf, high_open=True))
        if self.n_routed_experts:
            check_routing(owner, self.n_routed_experts, self.top_k, self.n_group, self.topk_group)

    @property
    def rope_head_dim(self) -> int:
        """The dimensions RoPE rotates per head: ``head_dim``, or MLA's decoupled ``qk_rope_head_dim``."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def kv_cache_elements(self) -> int:
        """Values a decoder caches per token and layer: ``2 · n_kv_head · head_dim`` (keys and values), or for
        MLA ``kv_lora_rank + qk_rope_head_dim`` (the latent and the shared RoPE key)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_head * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, values)

