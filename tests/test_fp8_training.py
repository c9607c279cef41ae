"""The 8-bit training race: same start for every run, torchao as the peer, every run trains."""
import pytest
import torch

from moelab.experiments.fp8_training import build, torchao_convert
from moelab.mixed_precision import Linear8

VOCAB = 120


def test_every_run_starts_from_the_same_weights_and_converts_what_its_recipe_converts():
    reference = build("fp32", 0, VOCAB).state_dict()
    for run in ("fine", "torchao_tensorwise"):
        model = build(run, 0, VOCAB)
        assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    kinds = {n: type(m).__name__ for n, m in build("torchao_rowwise", 0, VOCAB).named_modules()}
    assert kinds["layers.0.attn.wq"] == "Float8Linear" and kinds["output"] == "Linear"
    assert kinds["layers.0.ffn.experts"] == "Experts"                 # torchao converts nn.Linear only
    assert type(build("int8", 0, VOCAB).layers[0].ffn.experts).__name__ == "Experts8"
    with pytest.raises(ValueError, match="run = 'fp16' is not allowed; allowed: fp32, fine"):
        build("fp16", 0, VOCAB)


def test_moelab_tensorwise_with_e5m2_gradients_is_torchaos_tensorwise_recipe():
    torch.manual_seed(0)
    base = torch.nn.Linear(128, 64, bias=False)
    ours = Linear8(128, 64, "tensorwise", "fp8_e5m2")
    ours.load_state_dict(base.state_dict())
    theirs = torchao_convert(torch.nn.Sequential(base), "tensorwise")[0]
    x, dy = torch.randn(32, 128), torch.randn(32, 64)
    results = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, layer.weight.grad))
    exact = x @ base.weight.detach().t()
    for a, b in zip(*results):      # same operands, same scales: only fp32 summation order may differ
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    assert float((results[0][0] - exact).norm() / exact.norm()) > 1e-2     # and it is 8-bit, not fp32
