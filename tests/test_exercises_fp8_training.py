"""The checks of notebook 09's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import pytest
import torch
from solutions import load

from moelab import exercises

NS = load("09_fp8_training.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_fine_grained_gemms(NS["fine_grained_gemms"])
    assert exercises.check_promoted_sum(NS["promoted_sum"])
    assert exercises.check_adamw_bf16(NS["adamw_bf16"])


def test_weight_gradient_with_the_forward_tiles_fails_with_a_hint():
    e4m3 = NS["e4m3"]

    def forward_tiles(x, w, dy):
        y, dx, _ = NS["fine_grained_gemms"](x, w, dy)
        return y, dx, e4m3(dy, (1, 128)).t() @ e4m3(x, (1, 128))

    verdict = repr(exercises.check_fine_grained_gemms(forward_tiles))
    assert verdict.startswith("✗ check_fine_grained_gemms: on input 1 of 5 (x=tensor(256, 256) float32, "
                              "w=tensor(256, 256) float32, dy=tensor(256, 256) float32) the result[2]")
    assert "sums over tokens" in verdict


def test_gradients_in_e5m2_fail_with_a_hint():
    e4m3 = NS["e4m3"]

    def e5m2(t, block):
        (R, C), (br, bc) = t.shape, block
        padded = torch.nn.functional.pad(t, (0, -C % bc, 0, -R % br))
        blocks = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
        scale = blocks.abs().amax(dim=(1, 3), keepdim=True) / 57344
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return ((blocks / scale).to(torch.float8_e5m2).float() * scale).view(padded.shape)[:R, :C]

    def wide_gradients(x, w, dy):
        y = e4m3(x, (1, 128)) @ e4m3(w, (128, 128)).t()
        return y, e5m2(dy, (1, 128)) @ e4m3(w.t(), (128, 128)).t(), e5m2(dy.t(), (1, 128)) @ e4m3(x.t(), (1, 128)).t()

    verdict = repr(exercises.check_fine_grained_gemms(wide_gradients))
    assert "result[1]" in verdict and "E4M3 too" in verdict


def test_per_tensor_weights_fail():
    e4m3 = NS["e4m3"]

    def per_tensor_weight(x, w, dy):
        y, dx, dw = NS["fine_grained_gemms"](x, w, dy)
        return e4m3(x, (1, 128)) @ e4m3(w, tuple(w.shape)).t(), dx, dw

    verdict = repr(exercises.check_fine_grained_gemms(per_tensor_weight))
    assert verdict.startswith("✗ check_fine_grained_gemms: on input 1 of 5") and "the result[0]" in verdict


def _accumulate(products, interval, keep=torch.trunc, restart=True):
    """A learner's 14-bit accumulator: ``keep`` rounds the mantissa; without ``restart`` a promoted sum keeps going."""
    partial = torch.zeros(products.shape[0], dtype=torch.float64)
    total = torch.zeros(products.shape[0], dtype=torch.float32)
    for k in range(products.shape[1]):
        m, e = torch.frexp(partial + products[:, k])
        partial = torch.ldexp(keep(m * 2.0 ** 14) / 2.0 ** 14, e)
        if (k + 1) % interval == 0:
            total = total + partial.float()
            partial = torch.zeros_like(partial) if restart else partial
    return (total + partial.float()).double()


def test_the_accumulator_written_out_passes():
    assert exercises.check_promoted_sum(_accumulate)


def test_promotion_without_restarting_fails_with_a_hint():
    verdict = repr(exercises.check_promoted_sum(lambda products, interval: _accumulate(products, interval,
                                                                                          restart=False)))
    assert verdict.startswith("✗ check_promoted_sum: on input 1 of 5 (products=tensor(8, 512) float64, interval=128)")
    assert "starts again from zero" in verdict


def test_rounding_to_nearest_fails_with_a_hint():
    verdict = repr(exercises.check_promoted_sum(lambda products, interval: _accumulate(products, interval,
                                                                                          keep=torch.round)))
    assert "does not round to nearest" in verdict


def test_fp32_moments_fail_with_a_hint():
    def fp32_moments(params, grads, lr):
        params = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    verdict = repr(exercises.check_adamw_bf16(fp32_moments))
    assert verdict.startswith("✗ check_adamw_bf16: on input 2 of 4")  # one step from zero moments: equal
    assert "store the moments in BF16" in verdict


def test_an_unfilled_stub_raises_for_the_learner():
    def stub(x, w, dy):
        raise NotImplementedError("exercise 09.1: write fine_grained_gemms")

    with pytest.raises(NotImplementedError, match="exercise 09.1"):
        exercises.check_fine_grained_gemms(stub)
