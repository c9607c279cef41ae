"""The dense model: shapes, causality, RoPE's relative-position property, components against references."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.config import ModelConfig
from moelab.ffn import SwiGLU
from moelab.model import CausalSelfAttention, RMSNorm, Transformer, apply_rope, complete, evaluating, rope_cache


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 17, "block_size": 16, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                          "d_model": 32, **kw})


def test_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = torch.randint(17, (3, 11))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 11, 17) and loss.shape == ()
    assert abs(loss.item() - math.log(17)) < 0.1  # small init: close to a uniform guess
    assert model(idx)[1] is None


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_changing_a_later_token_never_changes_earlier_logits(n_kv_head):
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_head=n_kv_head))
    idx = torch.randint(17, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 17
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 9:], before[:, 9:])


def test_rmsnorm_matches_torch_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-6)
    nn.init.normal_(norm.weight)
    x = torch.randn(4, 8)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), norm.weight, 1e-6))
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = rope_cache(16, 64)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])

    for m, n, shift in [(5, 2, 10), (0, 0, 40), (30, 7, 20)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-5, rtol=0)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # ...and does depend on it
    torch.testing.assert_close(apply_rope(q, cos[0], sin[0]), q)  # position 0: no rotation
    torch.testing.assert_close(apply_rope(q, cos[33], sin[33]).norm(), q.norm())  # a rotation keeps length


def test_rope_matches_complex_multiplication():
    x = torch.randn(2, 3, 10, 8)
    cos, sin = rope_cache(8, 10, theta=500.0)
    angles = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 10, 4, 2)) * angles).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)


def test_attention_matches_explicit_masked_softmax():
    torch.manual_seed(0)
    cfg = tiny()
    attn = CausalSelfAttention(cfg)
    x = torch.randn(2, 7, 32)
    cos, sin = rope_cache(cfg.head_dim, 16)
    q = apply_rope(attn.wq(x).view(2, 7, 4, 8).transpose(1, 2), cos[:7], sin[:7])
    k = apply_rope(attn.wk(x).view(2, 7, 2, 8).transpose(1, 2), cos[:7], sin[:7]).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(torch.ones(7, 7).triu(1).bool(), -math.inf)
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-6, rtol=1e-5)


def test_swiglu_formula():
    ffn = SwiGLU(6, 10)
    x = torch.randn(3, 6)
    expected = (F.silu(x @ ffn.w_gate.weight.T) * (x @ ffn.w_up.weight.T)) @ ffn.w_down.weight.T
    torch.testing.assert_close(ffn(x), expected)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = torch.randint(17, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_weight_tying_shares_one_matrix():
    untied, tied = Transformer(tiny()), Transformer(tiny(tie_embeddings=True))
    assert tied.output.weight is tied.tok_embeddings.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == 17 * 32


def test_residual_outputs_get_smaller_init():
    torch.manual_seed(0)
    model = Transformer(tiny(d_model=256, n_head=4, n_kv_head=4, n_layer=8))
    wq, wo = model.layers[0].attn.wq.weight, model.layers[0].attn.wo.weight
    assert abs(wq.std().item() - 0.02) < 0.001
    assert abs(wo.std().item() - 0.02 / math.sqrt(16)) < 0.0005


def test_ffn_slot_is_pluggable():
    calls = []

    class Probe(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            calls.append(self.layer)
            return torch.zeros_like(x)

    model = Transformer(tiny(n_layer=3), make_ffn=lambda cfg, i: Probe(i))
    model(torch.zeros(1, 4, dtype=torch.long))
    assert calls == [0, 1, 2]
    assert all(isinstance(layer.ffn, Probe) for layer in model.layers)


def test_bad_inputs_are_explained():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="exceeds ModelConfig.block_size = 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids \(torch.long\) .* dtype torch.float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"token ids must lie in 0..16 .* got ids from 0 to 17"):
        model(torch.tensor([[0, 17]]))
    with pytest.raises(ValueError, match=r"a 1-D prompt needs idx\[None\]"):
        model.generate(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="time >= 1"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens = -1 is not allowed"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k = 0"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_k=0)


def test_generate_is_deterministic_greedy_and_crops_context():
    torch.manual_seed(0)
    model = Transformer(tiny())
    start = torch.zeros(2, 1, dtype=torch.long)
    sample = lambda seed: model.generate(start, 30, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert sample(1).shape == (2, 31) and torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    greedy = model.generate(start, 3, temperature=0)
    expected = start
    for _ in range(3):
        expected = torch.cat([expected, model(expected)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, expected)
    top1 = model.generate(start, 5, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, model.generate(start, 5, temperature=0))


class Chars:
    def encode(self, text):
        return torch.tensor([ord(c) - 97 for c in text])

    def decode(self, ids):
        return "".join(chr(int(i) + 97) for i in ids)


def test_complete_returns_only_the_continuation():
    model = Transformer(tiny())
    text = complete(model, Chars(), "abc", max_new_tokens=5, seed=0)
    assert len(text) == 5 and text == complete(model, Chars(), "abc", max_new_tokens=5, seed=0)
    with pytest.raises(ValueError, match="prompt = '' is not allowed"):
        complete(model, Chars(), "")


def test_a_model_on_the_meta_device_builds_and_runs_without_memory():
    with torch.device("meta"):
        model = Transformer(tiny(d_model=4096, n_head=32, n_kv_head=8, n_layer=8))
    assert model.device.type == "meta"
    logits, loss = model(torch.zeros(2, 16, dtype=torch.long, device="meta"),
                         torch.zeros(2, 16, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 16, 17) and loss.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_on_cuda_matches_cpu_greedy():
    torch.manual_seed(0)
    model = Transformer(tiny())
    start = torch.zeros(1, 1, dtype=torch.long)
    cpu = model.generate(start, 8, temperature=0)
    gpu = model.cuda().generate(start.cuda(), 8, temperature=0).cpu()
    assert torch.equal(cpu, gpu)


def test_evaluating_switches_to_eval_without_gradients_and_restores_the_mode_even_on_error():
    model = torch.nn.Linear(2, 2)
    with evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
    model.eval()
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("inside")
    assert not model.training
