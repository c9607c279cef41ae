"""Quantised experts: the same layer, its matmuls in 8 bits, close to the original and never touching it."""
import pytest
import torch

from moelab.config import ModelConfig
from moelab.model import Transformer
from moelab.qexperts import SCHEMES, QuantizedLinear, quantized_copy

TOLERANCE = {"fp32": 1e-6, "bf16": 0.02, "int8_weight_only": 0.02, "int8_channel": 0.03, "fp8_tensor": 0.1,
             "fp8_fine": 0.1}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantized_linear_is_close_to_the_fp32_product_and_its_weight_shrinks(scheme):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 200, generator=g), torch.randn(200, 96, generator=g)
    layer = QuantizedLinear(w, scheme)
    exact = x @ w
    rel = ((layer(x) - exact).abs() / (x.abs() @ w.abs())).max()
    assert rel <= TOLERANCE[scheme]
    assert layer(x[:0]).shape == (0, 96)
    bytes_per_value = {"fp32": 4, "bf16": 2}.get(scheme, 1)
    assert bytes_per_value * w.numel() <= layer.stored_bytes < bytes_per_value * w.numel() * 1.05
    assert ((layer.dequantized() - w).abs() <= TOLERANCE[scheme] * 4 * w.abs().max()).all()


def test_quantized_copy_changes_only_the_copy_and_fp32_equals_the_original():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, d_model=32, n_routed_experts=4, top_k=2,
                      d_expert=16, n_shared_experts=1)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 16, (3, 8))
    with torch.no_grad():
        reference = model(x)[0]
        for scheme in SCHEMES:
            out = quantized_copy(model, scheme)(x)[0]
            assert ((out - reference).abs().max() <= 1e-5) if scheme == "fp32" else \
                   ((out - reference).abs().max() < 0.5 and not torch.equal(out, reference))
        assert torch.equal(model(x)[0], reference)
    with pytest.raises(ValueError, match="scheme = 'fp4' is not allowed; allowed: fp32, bf16"):
        quantized_copy(model, "fp4")
