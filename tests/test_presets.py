"""Real model presets: the analytic count from the config equals the count of moelab's model built on the meta
device, and both reproduce the published totals within 1% under each publisher's convention."""
import pytest
import torch

from moelab.presets import PRESETS, PUBLISHED, analytic_counts, meta_counts, meta_model


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_analytic_count_equals_the_model_built_on_the_meta_device(name):
    config = PRESETS[name]()
    analytic, built = analytic_counts(config), meta_counts(config)
    assert (analytic["total"], analytic["active"], analytic["embedding"]) == \
        (built["total"], built["active"], built["embedding"])
    assert analytic["total"] == sum(v for k, v in analytic.items() if k not in ("total", "active"))
    assert all(p.is_meta for p in meta_model(config).parameters())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_totals_are_reproduced_within_one_percent(name):
    total, active, with_embedding = PUBLISHED[name]
    counts = analytic_counts(PRESETS[name]())
    assert counts["total"] == pytest.approx(total, rel=0.01)
    if active is not None:
        ours = counts["active"] - (0 if with_embedding else counts["embedding"])
        assert ours == pytest.approx(active, rel=0.01)


def test_the_convention_matters_deepseek_v3_active_with_the_input_embedding_is_not_its_figure():
    counts = analytic_counts(PRESETS["DeepSeek-V3"]())
    assert counts["active"] == pytest.approx(37.55e9, rel=1e-3) and counts["active"] > 36.7e9 * 1.01


def test_kimi_k2_is_1_026_t_by_its_config():
    counts = analytic_counts(PRESETS["Kimi K2"]())
    assert counts["total"] == pytest.approx(1.0264e12, rel=1e-4)           # "1T" in the README
    assert counts["active"] == pytest.approx(32.86e9, rel=1e-3)            # "32B activated"


def test_building_on_the_meta_device_leaves_torch_init_as_it_was():
    normal, uniform = torch.nn.init.normal_, torch.nn.init.uniform_
    meta_model(PRESETS["Mixtral-8x7B"]())
    assert (torch.nn.init.normal_, torch.nn.init.uniform_) == (normal, uniform)
    x = torch.zeros(1000)
    torch.nn.init.normal_(x)
    assert x.std() > 0.5                                    # real initialisation works again


def test_the_course_presets_are_the_models_the_notebooks_train():
    from moelab.data import load_corpus
    from moelab.presets import lm_config, matched_configs
    vocab = load_corpus().tokenizer.vocab_size
    assert PRESETS["course fine MoE"]() == matched_configs(vocab)["fine"]
    assert PRESETS["course LM"]() == lm_config(vocab)
