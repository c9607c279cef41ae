"""The checks of notebook 01's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import pytest
import torch
from solutions import load

from moelab import exercises

NS = load("01_dense_baseline.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_attention_params(NS["attention_params"])
    assert exercises.check_rope_cache(NS["rope_cache"])
    assert exercises.check_generate(NS["generate"])


def test_attention_counted_as_multi_head_fails_with_a_hint():
    verdict = exercises.check_attention_params(lambda d_model, n_head, n_kv_head: 4 * d_model * d_model)
    assert repr(verdict) == ("✗ check_attention_params: on input 1 of 8 (d_model=128, n_head=4, n_kv_head=1) the "
                             "result is 65,536, expected 40,960. Hint: with n_kv_head < n_head, wk and wv have only "
                             "n_kv_head · head_dim outputs.")


def test_rope_in_float32_passes_and_without_the_factor_two_fails_with_a_hint():
    def float32(head_dim, max_len, theta):
        angles = torch.outer(torch.arange(max_len).float(), theta ** (-torch.arange(0, head_dim, 2).float() / head_dim))
        return angles.cos(), angles.sin()

    def without_two(head_dim, max_len, theta):
        angles = torch.outer(torch.arange(max_len).float(), theta ** (-torch.arange(head_dim // 2).float() / head_dim))
        return angles.cos(), angles.sin()

    assert exercises.check_rope_cache(float32)
    verdict = exercises.check_rope_cache(without_two)
    assert repr(verdict).startswith("✗ check_rope_cache: on input 1 of 8 (head_dim=8, max_len=16, theta=1e+04) the "
                                    "result[0][1, 1] is 0.950415, expected 0.995004")
    assert "−2i / head_dim" in repr(verdict)


def test_rope_with_full_width_angles_names_the_shape():
    def full_width(head_dim, max_len, theta):
        angles = torch.outer(torch.arange(max_len).float(), theta ** (-torch.arange(head_dim).float() / head_dim))
        return angles.cos(), angles.sin()

    assert "the result[0] has shape (16, 8), expected (16, 4)" in repr(exercises.check_rope_cache(full_width))


@torch.no_grad()
def sample(model, idx, max_new_tokens, temperature, seed, scale):
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        last = model(idx[:, -model.config.block_size:])[0][:, -1].float()
        nxt = (last.argmax(-1, keepdim=True) if temperature == 0 else
               torch.multinomial(torch.softmax(last * scale(temperature), -1), 1, generator=g))
        idx = torch.cat([idx, nxt], 1)
    return idx


def test_sampling_without_the_temperature_fails_with_a_hint():
    verdict = exercises.check_generate(lambda **kw: sample(**kw, scale=lambda t: 1.0))
    assert repr(verdict).startswith("✗ check_generate: on input 1 of 5 (model=Transformer(vocab_size=12, "
                                    "block_size=8), idx=tensor(2, 3) int64, max_new_tokens=4, temperature=1.5")
    assert "divide the logits by the temperature before the softmax" in repr(verdict)


def test_sampling_times_the_temperature_fails_with_a_hint():
    assert "multiplying sharpens" in repr(exercises.check_generate(lambda **kw: sample(**kw, scale=lambda t: t)))


def test_sampling_without_cropping_the_context_is_reported_not_raised():
    @torch.no_grad()
    def uncropped(model, idx, max_new_tokens, temperature, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(max_new_tokens):
            last = model(idx)[0][:, -1].float()
            nxt = (last.argmax(-1, keepdim=True) if temperature == 0 else
                   torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=g))
            idx = torch.cat([idx, nxt], 1)
        return idx

    verdict = exercises.check_generate(uncropped)
    assert repr(verdict).startswith("✗ check_generate: on input 3 of 5 (model=Transformer(vocab_size=7, block_size=4)")
    assert "your function raised ValueError: sequence length 5 exceeds ModelConfig.block_size = 4" in repr(verdict)


def test_an_unfilled_stub_raises_not_implemented():
    def stub(d_model, n_head, n_kv_head):
        raise NotImplementedError("exercise 01.1: write attention_params")

    with pytest.raises(NotImplementedError, match="exercise 01.1"):
        exercises.check_attention_params(stub)
