"""The MoE-vs-dense experiment: matched configurations, FLOP counts, routing statistics, committed results."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from moelab.analysis import domain_expert_information, routing_by_domain, token_identity_share, top_expert_per_token
from moelab.config import ModelConfig
from moelab.data import build, load_corpus
from moelab.experiments import moe_vs_dense
from moelab.experiments.moe_vs_dense import load_results, load_trained, matched_configs
from moelab.model import Transformer, flops_per_token, parameter_counts


def test_matched_models_have_equal_active_parameters_within_one_percent():
    counts = {name: parameter_counts(Transformer(cfg)) for name, cfg in matched_configs(120).items()}
    active = [c["active"] for c in counts.values()]
    assert max(active) / min(active) - 1 < 0.01
    assert counts["coarse"]["total"] > 2.5 * counts["dense"]["total"]  # the MoEs hold more parameters
    # both store four times the dense FFN; the coarse experts are a little wider to match the fine router
    assert abs(counts["fine"]["total"] / counts["coarse"]["total"] - 1) < 0.03


def test_wide_control_holds_the_fine_grained_moe_parameters_all_active():
    configs = moe_vs_dense.experiment_configs(120)
    wide, fine = (parameter_counts(Transformer(configs[name])) for name in ("wide", "fine"))
    assert wide["active"] == wide["total"] and abs(wide["total"] / fine["total"] - 1) < 0.02
    assert configs["wide"].n_routed_experts == 0


def test_flops_per_token_follows_kaplan():
    cfg = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, d_model=16, d_ff=64)
    model = Transformer(cfg)
    non_embedding = sum(p.numel() for p in model.parameters()) - 50 * 16
    assert flops_per_token(model) == 6 * non_embedding + 6 * 2 * 32 * 16


@pytest.fixture
def toy():
    """One MoE layer whose routing is known: 'a' goes to expert 0, 'b' to expert 1, the newline to expert 2."""
    data = build({"first": "aaab\n" * 60, "second": "bbba\n" * 60})
    cfg = ModelConfig(vocab_size=3, block_size=8, n_layer=1, n_head=1, d_model=8, n_routed_experts=4, top_k=1,
                      d_expert=4)
    model = Transformer(cfg)
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.eye(3, 8))       # token i -> basis vector i ('\n' = 0, a, b)
        model.layers[0].attn.wo.weight.zero_()                   # the MoE sees the embedding itself
        model.layers[0].ffn.router.weight.copy_(10 * torch.eye(4, 8)[[1, 2, 0, 3]])
    return data, model


def test_routing_by_domain_counts_the_known_routing(toy):
    data, model = toy
    fractions = routing_by_domain(model, data, n_batches=3, batch_size=4)
    expected = np.zeros((2, 4))
    for d, domain in enumerate(data.domains):
        for seed in range(3):
            x, _ = data.batch("val", 4, 8, seed, domain)
            for token, expert in ((1, 0), (2, 1), (0, 2)):               # 'a' -> 0, 'b' -> 1, '\n' -> 2
                expected[d, expert] += int((x == token).sum())
    np.testing.assert_allclose(fractions[0], expected / expected.sum(-1, keepdims=True))
    assert top_expert_per_token(model, data.tokenizer, "ab\n").tolist() == [[0, 1, 2]]


def test_token_identity_share_is_one_for_a_router_that_looks_at_the_token_only(toy):
    data, model = toy
    assert token_identity_share(model, data, batch_size=4).tolist() == [1.0]
    assert token_identity_share(model, data, batch_size=4, shuffle=True)[0] < 0.9   # chance, same loads
    torch.manual_seed(0)
    with torch.no_grad():                        # now let the context (an average over the prefix) dominate
        model.layers[0].attn.wv.weight.normal_()
        model.layers[0].attn.wo.weight.normal_(std=10.0)
    assert token_identity_share(model, data, batch_size=4)[0] < 1.0


def test_domain_expert_information_bounds():
    assert domain_expert_information(np.full((1, 2, 4), 0.25)).item() == 0.0
    specialised = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert domain_expert_information(specialised).item() == pytest.approx(1.0)


def test_committed_results_match_the_schema_the_notebook_reads():
    results = load_results()
    assert results["experiment"] == "moe_vs_dense" and results["command"].startswith("python -m moelab.experiments")
    domains = results["domains"]
    budgets = sorted(results["budgets"], key=int)
    assert len(budgets) >= 2
    for budget in budgets:
        run = results["budgets"][budget]
        steps = run["train_config"]["max_steps"]
        assert steps == int(budget) and set(run["models"]) == {"dense", "coarse", "fine", "wide"}
        if budget != budgets[-1]:
            seeded = run["seeds"]["models"]
            assert set(seeded) == {"dense", "coarse", "fine"} and len(run["seeds"]["seeds"]) >= 3
            for name, m in seeded.items():
                assert m["final_val_loss"][0] == run["models"][name]["final_val_loss"]
                assert all(len(v) == len(run["seeds"]["seeds"]) for v in m["val_loss_by_domain"].values())
        active = [run["models"][name]["active_params"] for name in ("dense", "coarse", "fine")]
        assert max(active) / min(active) - 1 < 0.01
        for name, m in run["models"].items():
            assert set(m["val_loss_by_domain"]) == set(domains)
            assert len(m["curve"]["train_loss"]) == steps and m["curve"]["eval_step"][-1] == steps
            assert all(math.isfinite(v) for v in m["curve"]["train_loss"] + m["curve"]["eval_val"])
            if name in ("dense", "wide") or budget != budgets[-1]:
                assert m["routing"] is None
                continue
            fractions = np.array(m["routing"]["domain_expert_fraction"])
            E = m["config"]["n_routed_experts"]
            assert fractions.shape == (4, len(domains), E)
            np.testing.assert_allclose(fractions.sum(-1), 1.0, atol=1e-3)
            assert np.array(m["routing"]["load"]).shape == (len(m["routing"]["load_steps"]), 4, E)
            for example in m["routing"]["examples"].values():
                assert np.array(example["top_expert"]).shape == (4, len(example["text"]))


def test_committed_model_reproduces_the_committed_routing():
    results = load_results()
    model = load_trained()
    data = load_corpus()
    fine = results["budgets"][max(results["budgets"], key=int)]["models"]["fine"]
    assert model.config == ModelConfig.from_dict(fine["config"])     # fields added since take their defaults
    assert not model.training
    fractions = routing_by_domain(model, data, n_batches=4)
    np.testing.assert_allclose(fractions, fine["routing"]["domain_expert_fraction"], atol=1e-4)


@pytest.mark.slow
def test_script_writes_results_and_a_rerun_resumes_from_its_checkpoints(tmp_path, monkeypatch):
    # the script's own logic at a fraction of its evaluation cost: small batches, one evaluation batch each
    small = moe_vs_dense.train_config
    monkeypatch.setattr(moe_vs_dense, "train_config",
                        lambda steps, seed=0: dataclasses.replace(small(steps, seed), batch_size=4, eval_batches=1))
    by_domain, routing = moe_vs_dense.domain_losses, moe_vs_dense.routing_by_domain
    monkeypatch.setattr(moe_vs_dense, "domain_losses", lambda model, data, *_: by_domain(model, data, 4, 1))
    monkeypatch.setattr(moe_vs_dense, "routing_by_domain", lambda model, data, **_: routing(model, data, n_batches=1))
    out = tmp_path / "results.json"
    args = ["--steps", "3", "2", "--models", "dense,fine", "--out", str(out), "--runs", str(tmp_path / "runs")]
    moe_vs_dense.main(args)
    first = json.loads(out.read_text(encoding="utf-8"))
    assert first["command"].endswith("--steps 2 3 --models dense,fine") and list(first["budgets"]) == ["2", "3"]
    assert first["budgets"]["2"]["models"]["fine"]["routing"] is None
    seeds = first["budgets"]["2"]["seeds"]                   # the shorter budget, repeated with 3 seeds
    assert seeds["seeds"] == [0, 1, 2] and "seeds" not in first["budgets"]["3"]
    for name in ("dense", "fine"):
        losses = seeds["models"][name]["final_val_loss"]
        assert len(losses) == 3 and losses[0] == first["budgets"]["2"]["models"][name]["final_val_loss"]
        assert len(set(losses)) == 3                         # other seeds, other runs
    assert first["budgets"]["3"]["models"]["fine"]["routing"]["examples"]
    assert (tmp_path / "runs" / "3" / "fine.pt").is_file() and out.with_name(moe_vs_dense.WEIGHTS.name).is_file()
    moe_vs_dense.main(args)                                  # every model is at its last step: nothing trains
    second = json.loads(out.read_text(encoding="utf-8"))
    for budget in ("2", "3"):
        for name in ("dense", "fine"):
            again, before = second["budgets"][budget]["models"][name], first["budgets"][budget]["models"][name]
            assert again["curve"] == before["curve"] and again["val_loss_by_domain"] == before["val_loss_by_domain"]


@pytest.mark.parametrize("args, message", [
    (["--models", "dense,sparse"], "--models sparse is not allowed; allowed: dense, coarse, fine, wide"),
    (["--steps", "0"], "--steps 0 is not allowed; allowed: positive step counts"),
    (["--seeds", "0"], "--seeds 0 is not allowed; allowed: 1 or more")])
def test_script_rejects_bad_arguments_naming_what_is_allowed(args, message, capsys):
    with pytest.raises(SystemExit):
        moe_vs_dense.main(args)
    assert message in capsys.readouterr().err
