"""Multi-head latent attention: shapes and parameter count (DeepSeek-V3's at full size, on the meta device),
causality, attention from the cached latents alone, the cache size, and training on the course corpus."""
import dataclasses

import pytest
import torch

from moelab.config import ConfigError, ModelConfig
from moelab.data import load_corpus
from moelab.mla import MultiHeadLatentAttention
from moelab.model import Transformer, rope_cache
from moelab.train import TrainConfig, make_optimizer, train_step

SMALL = dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, d_model=32, attention="mla", q_lora_rank=24,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
DEEPSEEK_V3 = dict(vocab_size=129280, d_model=7168, n_head=128, attention="mla", q_lora_rank=1536,
                   kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


def mla_parameters(d, H, q_lora, kv_lora, nope, rope, v):
    """The count by hand (DeepSeek-V3's inference/model.py shapes; the norms' weights included)."""
    q = d * q_lora + q_lora + q_lora * H * (nope + rope) if q_lora else d * H * (nope + rope)
    return q + d * (kv_lora + rope) + kv_lora + kv_lora * H * (nope + v) + H * v * d


def test_deepseek_v3_mla_on_the_meta_device_has_the_hand_counted_parameters():
    with torch.device("meta"):
        attn = MultiHeadLatentAttention(ModelConfig(**DEEPSEEK_V3))
    count = sum(p.numel() for p in attn.parameters())
    assert count == mla_parameters(7168, 128, 1536, 512, 128, 64, 128) == 187_107_328
    assert dict(attn.named_parameters())["wkv_a.weight"].shape == (512 + 64, 7168)
    assert ModelConfig(**DEEPSEEK_V3).kv_cache_elements() == 576               # per token and layer
    assert ModelConfig(vocab_size=10, d_model=4096, n_head=32, n_kv_head=8).kv_cache_elements() == 2 * 8 * 128


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_output_shapes_and_parameter_count(q_lora_rank):
    config = ModelConfig(**{**SMALL, "q_lora_rank": q_lora_rank})
    attn = MultiHeadLatentAttention(config)
    cos, sin = rope_cache(config.rope_head_dim, config.block_size)
    assert attn(torch.randn(3, 10, 32), cos, sin).shape == (3, 10, 32)
    assert sum(p.numel() for p in attn.parameters()) == mla_parameters(32, 4, q_lora_rank, 16, 8, 4, 6)
    assert hasattr(attn, "wq_a") == bool(q_lora_rank) and hasattr(attn, "wq") == (not q_lora_rank)


def test_an_mla_transformer_is_causal():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL)).eval()
    a = torch.randint(0, 40, (2, 12))
    b = a.clone()
    b[:, 7:] = torch.randint(0, 40, (2, 5))                   # change the future of position 6
    la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, :7], lb[:, :7])
    assert not torch.allclose(la[:, 7:], lb[:, 7:])


def test_a_new_token_attends_from_the_cached_latents_alone():
    """Decoding: the last position's output computed from the cache (c_kv and k_pe of every position:
    kv_lora_rank + qk_rope_head_dim values each) equals the full causal forward's."""
    torch.manual_seed(0)
    config = ModelConfig(**SMALL)
    attn = MultiHeadLatentAttention(config).eval()
    cos, sin = rope_cache(config.rope_head_dim, config.block_size)
    x = torch.randn(2, 9, 32)
    full = attn(x, cos, sin)
    c_kv, k_pe = attn.latent(x, cos, sin)
    assert c_kv.shape[-1] + k_pe.shape[-1] == config.kv_cache_elements() == 16 + 4
    q_nope, q_pe = attn.queries(x, cos, sin)
    last = attn.attend(q_nope[:, :, -1:], q_pe[:, :, -1:], c_kv, k_pe, causal=False)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)


def test_an_mla_moe_model_trains_on_the_course_corpus():
    data = load_corpus()
    config = ModelConfig(**{**SMALL, "vocab_size": data.tokenizer.vocab_size, "block_size": 32,
                            "n_routed_experts": 4, "top_k": 2, "d_expert": 32, "n_shared_experts": 1})
    torch.manual_seed(0)
    model = Transformer(config)
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5)
    opt = make_optimizer(model, cfg)
    losses = [train_step(model, opt, *data.batch("train", 16, 32, seed=step), cfg.grad_clip)[0].item()
              for step in range(cfg.max_steps)]
    assert losses[-1] < losses[0] - 1.0                          # from ln(vocab) ≈ 4.8 to well below


@pytest.mark.parametrize("fields, message", [
    (dict(attention="mqa"), "attention = 'mqa' is not allowed; allowed: 'gqa', 'mla'"),
    (dict(kv_lora_rank=0), "kv_lora_rank = 0 is not allowed"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim = 5 is not allowed; allowed: an even number"),
    (dict(attention="gqa"), "q_lora_rank = 24 is not allowed; allowed: 0 unless attention = 'mla'")])
def test_bad_attention_settings_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**SMALL, **fields})


def test_configs_saved_before_mla_still_load():
    old = {k: v for k, v in dataclasses.asdict(ModelConfig(vocab_size=40)).items()
           if k not in ("attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                        "v_head_dim")}
    assert ModelConfig.from_dict(old).attention == "gqa"
