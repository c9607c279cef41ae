"""Multi-token prediction: config fields, the model without MTP unchanged, the loss against a hand computation,
gradients, the MTP blocks' MoE layers, speculative decoding equal to greedy decoding, and the committed results."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from moelab.config import ConfigError, ModelConfig
from moelab.data import build, load_corpus
from moelab.decode import greedy_decode
from moelab.experiments import moe_vs_dense
from moelab.experiments import mtp as experiment
from moelab.model import Transformer, parameter_counts
from moelab.mtp import depth_losses
from moelab.speculative import speculative_decode
from moelab.train import History, TrainConfig, make_optimizer, train, train_step

MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
MOE = dict(n_routed_experts=4, top_k=2, d_expert=16, router="sigmoid", bias_update_speed=0.01, seq_aux_coef=0.01)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 17, "block_size": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                          "d_model": 32, **kw})


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(mtp_depth=-1), "mtp_depth", "an integer >= 0"),
    (dict(mtp_depth=1.0), "mtp_depth", "an integer >= 0"),
    (dict(mtp_depth=True), "mtp_depth", "an integer >= 0"),
    (dict(mtp_loss_weight=-0.1), "mtp_loss_weight", "a number in [0, inf)"),
    (dict(mtp_loss_weight=float("nan")), "mtp_loss_weight", "a number in [0, inf)"),
    (dict(mtp_loss_weight="0.3"), "mtp_loss_weight", "a number in [0, inf)"),
])
def test_bad_mtp_field_is_named(kwargs, field, allowed):
    with pytest.raises(ConfigError) as err:
        ModelConfig(vocab_size=10, **kwargs)
    assert f"ModelConfig.{field} = " in str(err.value) and allowed in str(err.value)


def test_defaults_are_no_mtp_and_deepseek_v3_weight():
    cfg = ModelConfig(vocab_size=10)
    assert (cfg.mtp_depth, cfg.mtp_loss_weight) == (0, 0.3)
    with_mtp = dataclasses.replace(cfg, mtp_depth=2, mtp_loss_weight=0.1)
    assert ModelConfig.from_dict(with_mtp.to_dict()) == with_mtp


def test_depth_zero_is_the_model_without_mtp():
    torch.manual_seed(0)
    model = Transformer(tiny())
    assert len(model.mtp) == 0 and not [k for k in model.state_dict() if k.startswith("mtp")]
    idx = torch.randint(17, (2, 9))
    model(idx, idx)
    assert model.mtp_loss.item() == 0.0 and parameter_counts(model)["mtp"] == 0
    committed = moe_vs_dense.load_trained()                      # a checkpoint written before the MTP fields
    assert committed.config.mtp_depth == 0 and len(committed.mtp) == 0


@pytest.mark.parametrize("kw", [{}, MOE], ids=["dense", "moe"])
def test_the_main_model_starts_from_the_same_weights_and_computes_the_same(kw):
    torch.manual_seed(0)
    plain = Transformer(tiny(**kw))
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=2, **kw))
    main = model.state_dict()
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(main[name], tensor, rtol=0, atol=0)
    idx = torch.randint(17, (2, 12))
    (logits, loss), (plain_logits, plain_loss) = model(idx, idx), plain(idx, idx)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
    assert loss.item() == plain_loss.item() and model.mtp_loss.item() > 0
    counts, plain_counts = parameter_counts(model), parameter_counts(plain)
    assert (counts["total"], counts["active"]) == (plain_counts["total"], plain_counts["active"])
    assert counts["mtp"] == sum(p.numel() for p in model.mtp.parameters()) > 0


def test_mtp_loss_equals_a_hand_computation():
    """DeepSeek-V3 §2.2 on the full token sequence t_0…t_T: depth k at position i joins RMSNorm(Emb(t_{i+k}))
    and RMSNorm(h_i^{k−1}), and its loss is the cross-entropy of t_{i+k+1}."""
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=2, mtp_loss_weight=0.5)).eval()
    with torch.no_grad():
        for p in model.mtp.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)                         # norm gains that matter, and differ between norms
    tokens = torch.randint(17, (3, 11))
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    model(idx, targets)
    h, cos, sin = model.tok_embeddings(idx), model.rope_cos, model.rope_sin
    for layer in model.layers:
        h = layer(h, cos, sin)

    def rms(x, module):
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)

    losses = []
    for k, module in enumerate(model.mtp, start=1):
        n = idx.shape[1] - k
        joined = torch.cat([rms(model.tok_embeddings(tokens[:, k:k + n]), module.enorm), rms(h[:, :n], module.hnorm)],
                           -1)
        h = module.block(joined @ module.eh_proj.weight.T, cos, sin)
        logits = rms(h, module.shared_head["norm"]) @ model.output.weight.T
        losses.append(F.cross_entropy(logits.reshape(-1, 17), tokens[:, k + 1:k + 1 + n].reshape(-1)))
    torch.testing.assert_close(model.mtp_loss, 0.5 * (losses[0] + losses[1]) / 2)


def test_a_sequence_too_short_for_a_depth_leaves_it_out():
    model = Transformer(tiny(mtp_depth=3))
    idx = torch.randint(17, (2, 3))
    model(idx, idx)
    assert math.isfinite(model.mtp_loss.item())
    h = torch.randn(2, 3, 32)
    assert len(depth_losses(model, h, idx)) == 2 and depth_losses(model, h[:, :1], idx[:, :1]) == []


def test_gradients_reach_the_mtp_module_and_the_shared_embedding_and_head():
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=1))
    idx = torch.randint(17, (2, 10))
    _, loss = model(idx, idx)
    loss.backward(retain_graph=True)
    assert all(p.grad is None for p in model.mtp.parameters())          # the main loss never reads the module
    model.zero_grad(set_to_none=True)
    model.mtp_loss.backward()
    for name, p in model.named_parameters():               # all but the main model's final norm, which h^0 skips
        assert (p.grad is None) if name == "norm.weight" else (p.grad is not None and p.grad.abs().sum() > 0), name


def test_mtp_moe_layers_are_outside_moe_layers_and_balanced():
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=1, **MOE))
    assert len(model.moe_layers) == 2 and model.mtp_moe_layers == [model.mtp[0].block.ffn]
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(17, (4, 16))
    bias = model.mtp_moe_layers[0].router.bias.clone()
    train_step(model, opt, x, x, grad_clip=1.0)
    moe = model.mtp_moe_layers[0]
    assert not torch.equal(moe.router.bias, bias) and moe.step_counts.sum() == 0    # updated, counts reset
    assert all(p.grad is not None for p in model.mtp.parameters())                     # train_step added mtp_loss
    with torch.no_grad():
        model(x, x)
        h = model.tok_embeddings(x)
        for layer in model.layers:
            h = layer(h, model.rope_cos, model.rope_sin)
        ce = depth_losses(model, h, x)[0]
    assert moe.aux_loss > 0
    torch.testing.assert_close(model.mtp_loss, 0.3 * ce + moe.aux_loss)


def test_train_records_the_mtp_loss():
    data = build({"a": "abcab\n" * 40, "b": "bcabc\n" * 40})
    model = Transformer(tiny(vocab_size=4, block_size=8, mtp_depth=1))
    history = train(model, data, TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, eval_batches=1),
                    progress=False)
    assert len(history.mtp_loss) == 3 and all(v > 0 for v in history.mtp_loss)
    assert History.from_dict(history.to_dict()) == history


def check_against_greedy(model: Transformer, idx: torch.Tensor, n: int):
    out, stats = speculative_decode(model, idx, n)
    assert torch.equal(out, greedy_decode(model, idx, n))
    assert torch.equal(out, model.generate(idx, n, temperature=0))
    assert stats.accepted <= stats.proposed and out.shape[1] - idx.shape[1] == n
    if n:
        assert n == stats.forward_passes + stats.accepted                # each pass one token, each accepted one more
        assert stats.forward_passes - 2 <= stats.proposed <= stats.forward_passes - 1    # the last may not draft
    return stats


@pytest.mark.parametrize("kw", [{}, MLA, MOE], ids=["gqa", "mla", "moe"])
def test_speculative_decoding_equals_greedy_decoding(kw):
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=1, **kw))
    for T, n in [(1, 0), (1, 1), (3, 2), (5, 3), (4, 20), (9, 24)]:
        check_against_greedy(model, torch.randint(17, (1, T)), n)


def test_a_trained_drafter_gets_accepted():
    """On a repeating text both the main model and the MTP module learn the continuation: drafts are accepted."""
    torch.manual_seed(0)
    data = build({"a": "abcdefg\n" * 60, "b": "gfedcba\n" * 60})
    model = Transformer(tiny(vocab_size=data.tokenizer.vocab_size, block_size=24, mtp_depth=1))
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    for step in range(60):
        train_step(model, opt, *data.batch("train", 16, 24, seed=step), grad_clip=1.0)
    stats = check_against_greedy(model, data.tokenizer.encode("abcdefg\nab")[None], 14)
    assert stats.acceptance_rate > 0.5


def test_speculative_decoding_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="ModelConfig.mtp_depth = 0"):
        speculative_decode(Transformer(tiny()), torch.zeros(1, 2, dtype=torch.long), 3)
    model = Transformer(tiny(mtp_depth=1))
    with pytest.raises(ConfigError, match="speculative_decode.idx = "):
        speculative_decode(model, torch.zeros(2, 2, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match="speculative_decode.idx = "):
        speculative_decode(model, torch.zeros(2, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match="speculative_decode.max_new_tokens = 32"):
        speculative_decode(model, torch.zeros(1, 2, dtype=torch.long), 32)


def test_the_committed_results_load_with_the_fields_the_chapter_reads():
    results = experiment.load_results()
    domains = results["domains"]
    assert results["mtp"]["config"]["mtp_depth"] == 1 and results["mtp"]["config"]["mtp_loss_weight"] == 0.3
    for name in ("mtp", "baseline"):
        assert set(results[name]["val_loss_by_domain"]) == set(domains) and results[name]["final_val_loss"] > 0
    for key in ("mtp_val_loss", "main_val_loss_same_tokens", "draft_agreement"):
        assert set(results["mtp"][f"{key}_by_domain"]) == set(domains) and 0 < results["mtp"][key] < 2
    assert len(results["mtp"]["curve"]["mtp_loss"]) == results["train_config"]["max_steps"]
    spec = results["speculative"]
    assert spec["matches_greedy"] and 0 < spec["acceptance_rate"] <= 1 and spec["speedup"] > 0
    assert spec["accepted"] <= spec["proposed"] and set(spec["by_domain"]) == set(domains)
    n = len(domains) * spec["prompts_per_domain"] * spec["new_tokens"]
    assert n == spec["forward_passes"] + spec["accepted"]
    assert results["params"]["mtp"] > 0 and results["deepseek_v3"]["speedup"] == 1.8


def test_the_committed_mtp_model_decodes_as_greedy():
    model, results = experiment.load_trained(), experiment.load_results()
    assert parameter_counts(model) == results["params"]
    tokenizer = load_corpus().tokenizer
    stats = check_against_greedy(model, tokenizer.encode(results["speculative"]["examples"]["english"]["prompt"])[None],
                                 32)
    assert stats.accepted > 0
