"""Checks for the exercises of notebooks/01_dense_baseline.ipynb: pieces of the dense baseline model.

Three checks: grouped-query attention's parameters, the RoPE angle cache, and sampling with a temperature.

References: :func:`moelab.presets.analytic_counts` (GQA, Ainslie et al. 2023), :func:`moelab.layers.rope_cache`
(RoFormer, Su et al. 2021, eq. 15) and :meth:`moelab.model.Transformer.generate` (nanoGPT's ``generate``).

Shapes: ``B`` sequences of ``T`` tokens.
"""
from __future__ import annotations

import torch

from .. import presets
from ..config import ModelConfig
from ..layers import rope_cache
from ..model import Transformer
from .core import Case, Verdict, case, describe, run_check, seeded

__all__ = ["check_attention_params", "check_rope_cache", "check_generate"]


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """One integer in ``[low, high)`` from a check's generator."""
    return int(torch.randint(low, high, (1,), generator=g))


def _attention_params(d_model: int, n_head: int, n_kv_head: int) -> int:
    config = ModelConfig(vocab_size=2, n_layer=1, n_head=n_head, n_kv_head=n_kv_head, d_model=d_model)
    return presets.analytic_counts(config)["attention"]


def _attention_as_mha(d_model: int, n_head: int, n_kv_head: int) -> int:
    return 4 * d_model * d_model


def _keys_only_shrunk(d_model: int, n_head: int, n_kv_head: int) -> int:
    return 3 * d_model * d_model + d_model * n_kv_head * (d_model // n_head)


def check_attention_params(fn) -> Verdict:
    """Exercise 01.1: ``fn(d_model, n_head, n_kv_head) -> int``, the parameters of one grouped-query attention
    block without biases: ``wq`` and ``wo`` of ``d_model × n_head · head_dim``, ``wk`` and ``wv`` of
    ``d_model × n_kv_head · head_dim``, ``head_dim = d_model / n_head``. Against
    :func:`moelab.presets.analytic_counts` (the shapes of :class:`moelab.model.CausalSelfAttention`)."""
    g = seeded(1100)
    cases = [case(d_model=128, n_head=4, n_kv_head=1), case(d_model=128, n_head=4, n_kv_head=2),
             case(d_model=128, n_head=4, n_kv_head=4), case(d_model=4096, n_head=32, n_kv_head=8)]
    for _ in range(4):
        n_head = 2 ** _randint(g, 0, 5)
        n_kv_head = 2 ** _randint(g, 0, n_head.bit_length())            # a power of two dividing n_head
        cases.append(case(d_model=n_head * 2 * _randint(g, 1, 33), n_head=n_head, n_kv_head=n_kv_head))
    hints = [(_attention_as_mha, "with n_kv_head < n_head, wk and wv have only n_kv_head · head_dim outputs."),
             (_keys_only_shrunk, "both wk and wv shrink to n_kv_head · head_dim outputs, not just one of them.")]
    return run_check("check_attention_params", fn, _attention_params, cases,
                     against="moelab.presets.analytic_counts", hints=hints)


def _rope_cache(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cache(head_dim, max_len, theta)


def _rope_without_the_two(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = theta ** -(torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _rope_from_position_one(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(1, max_len + 1, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def check_rope_cache(fn) -> Verdict:
    """Exercise 01.2: ``fn(head_dim, max_len, theta) -> (cos, sin)``, each ``(max_len, head_dim / 2)`` float32:
    the cosines and sines of the angles ``m · θ_i`` for positions ``m = 0 … max_len − 1`` and frequencies
    ``θ_i = theta^(−2i / head_dim)``, ``i = 0 … head_dim/2 − 1``. Against :func:`moelab.layers.rope_cache`
    (RoFormer, arXiv:2104.09864 eq. 15). Compared within 1e-4: float32 angles are fine."""
    g = seeded(1101)
    cases = [case(head_dim=8, max_len=16, theta=10_000.0), case(head_dim=64, max_len=128, theta=100.0),
             case(head_dim=2, max_len=1, theta=10_000.0), case(head_dim=128, max_len=64, theta=1e6)]
    for _ in range(4):
        cases.append(case(head_dim=2 * _randint(g, 1, 65), max_len=_randint(g, 1, 257),
                          theta=float(10 ** (1 + 5 * torch.rand(1, generator=g).item()))))
    hints = [(_rope_without_the_two, "the exponent is −2i / head_dim: frequency i rotates the pair (2i, 2i+1)."),
             (_rope_from_position_one, "positions start at m = 0, whose rotation is the identity (cos 1, sin 0).")]
    return run_check("check_rope_cache", fn, _rope_cache, cases, against="moelab.layers.rope_cache", atol=1e-4,
                     hints=hints)


def _tiny_model(seed: int, vocab_size: int, block_size: int) -> Transformer:
    """A small random language model, built without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, d_model=16,
                             init_std=1.0)
        return Transformer(config).eval()


def _generate_case(seed: int, vocab_size: int, block_size: int, batch: int, prompt: int, max_new_tokens: int,
                   temperature: float) -> Case:
    g = seeded(seed)
    kwargs = dict(model=_tiny_model(seed, vocab_size, block_size),
                  idx=torch.randint(0, vocab_size, (batch, prompt), generator=g),
                  max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    label = (f"model=Transformer(vocab_size={vocab_size}, block_size={block_size}), idx={describe(kwargs['idx'])}, "
             f"max_new_tokens={max_new_tokens}, temperature={describe(temperature)}, seed={seed}")
    return Case(kwargs, label)


def _generate(model: Transformer, idx: torch.Tensor, max_new_tokens: int, temperature: float,
              seed: int) -> torch.Tensor:
    return model.generate(idx, max_new_tokens, temperature, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _generate_scaled_by(model: Transformer, idx: torch.Tensor, max_new_tokens: int, temperature: float, seed: int,
                        scale) -> torch.Tensor:
    """Sampling with the logits multiplied by ``scale(temperature)``: the wrong answers below."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[0][:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits * scale(temperature), dim=-1), 1, generator=g)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


def _generate_without_temperature(**kwargs) -> torch.Tensor:
    return _generate_scaled_by(**kwargs, scale=lambda t: 1.0)


def _generate_times_temperature(**kwargs) -> torch.Tensor:
    return _generate_scaled_by(**kwargs, scale=lambda t: t)


def check_generate(fn) -> Verdict:
    """Exercise 01.3: ``fn(model, idx, max_new_tokens, temperature, seed) -> idx``: append ``max_new_tokens``
    sampled tokens to ``idx`` ``(B, T)``, one at a time — the model sees at most its last ``block_size`` tokens;
    the next token is drawn from ``softmax(logits / temperature)`` with ``torch.multinomial(probs, 1,
    generator=torch.Generator().manual_seed(seed))`` (one generator for the whole call), and ``temperature = 0``
    means the argmax. Against :meth:`moelab.model.Transformer.generate` (nanoGPT's ``generate``)."""
    cases = [_generate_case(1110, 12, 8, 2, 3, 4, 1.5), _generate_case(1111, 12, 8, 1, 4, 3, 0.0),
             _generate_case(1112, 7, 4, 3, 2, 4, 0.5), _generate_case(1114, 9, 6, 2, 6, 2, 2.0),
             _generate_case(1115, 5, 8, 1, 1, 1, 0.8)]
    hints = [(_generate_without_temperature, "divide the logits by the temperature before the softmax."),
             (_generate_times_temperature, "divide the logits by the temperature; multiplying sharpens where it "
                                           "should flatten.")]
    return run_check("check_generate", fn, _generate, cases, against="moelab.model.Transformer.generate",
                     hints=hints)
