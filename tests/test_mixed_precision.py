"""8-bit training GEMMs: the recipes' scaling directions, the paths that must agree, and bad input."""
import pytest
import torch

from moelab import quant
from moelab.config import ModelConfig
from moelab.ffn import Experts
from moelab.mixed_precision import (
    AdamW,
    Experts8,
    Linear8,
    block_for,
    convert,
    gemm,
    matmul8,
)
from moelab.model import Transformer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def fake(t: torch.Tensor, block, fmt: str = "fp8_e4m3") -> torch.Tensor:
    return quant.dequantize_blocks(*quant.quantize_blocks(t, fmt, block), block)


def test_blocks_follow_each_recipe_and_role():
    assert block_for("fine", "activation", (512, 256)) == (1, 128)
    assert block_for("fine", "weight", (512, 256)) == (128, 128)
    assert block_for("rowwise", "weight", (512, 256)) == (1, 256)
    assert block_for("tensorwise", "activation", (512, 256)) == (512, 256)
    with pytest.raises(ValueError, match="recipe = 'fp4' is not allowed; allowed: 'fine', 'rowwise'"):
        block_for("fp4", "weight", (1, 1))
    with pytest.raises(ValueError, match="role = 'bias' is not allowed"):
        block_for("fine", "bias", (1, 1))


def test_fine_forward_equals_deepseeks_block_gemm():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(256, 256, generator=g)
    xq, xs = quant.quantize_blocks(x, "fp8_e4m3", (1, 128))
    wq, ws = quant.quantize_blocks(w, "fp8_e4m3", (128, 128))
    torch.testing.assert_close(gemm(x, "activation", w, "weight", "fine", "forward"),
                               quant.fp8_block_gemm(xq, xs, wq, ws), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_dequantise_path_equals_torchs_scaled_mm_where_it_runs(recipe):
    if not quant.scaled_mm_available():
        pytest.skip("torch._scaled_mm does not run on this CPU")
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    xq, xs = quant.quantize_blocks(x, "fp8_e4m3", block_for(recipe, "activation", x.shape))
    wq, ws = quant.quantize_blocks(w, "fp8_e4m3", block_for(recipe, "weight", w.shape))
    scale = (lambda s: s.view(())) if recipe == "tensorwise" else (lambda s: s)
    kernel = quant.scaled_mm(xq, scale(xs), wq, scale(ws), kernel=True)
    torch.testing.assert_close(gemm(x, "activation", w, "weight", recipe, "forward"), kernel, rtol=1e-5, atol=1e-4)


def test_fine_backward_switches_the_tiles_to_run_along_tokens_for_wgrad():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 128, generator=g, requires_grad=True)
    w = torch.randn(64, 128, generator=g, requires_grad=True)
    dy = torch.randn(256, 64, generator=g)
    matmul8(x, w, "fine").backward(dy)
    torch.testing.assert_close(w.grad, fake(dy.t(), (1, 128)) @ fake(x.detach().t(), (1, 128)).t())
    torch.testing.assert_close(x.grad, fake(dy, (1, 128)) @ fake(w.detach(), (128, 128)))
    assert rel(w.grad, dy.t() @ x.detach()) < 0.05 and rel(x.grad, dy @ w.detach()) < 0.05


def test_tiles_keep_an_outlier_channel_from_flushing_the_rest():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(128, 512, generator=g), torch.randn(128, 512, generator=g)
    x[:, 7] *= 1e5              # beyond E4M3's range below the outlier (448 / 2^-6 = 28672): the rest underflows
    w[:, 7] = 0                 # the product is the ordinary channels' alone
    exact = x @ w.t()
    errors = {r: rel(gemm(x, "activation", w, "weight", r, "forward"), exact) for r in ("fine", "rowwise",
                                                                                         "tensorwise")}
    assert errors["fine"] < errors["rowwise"] / 1.5 and errors["rowwise"] < errors["tensorwise"] / 2


def test_int8_runs_forward_and_dgrad_on_int8_and_wgrad_in_fp32():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 96, generator=g, requires_grad=True)
    w = torch.randn(24, 96, generator=g, requires_grad=True)
    y = matmul8(x, w, "int8")
    wq, ws = quant.quantize_blocks(w.detach(), "int8", (1, 96))
    torch.testing.assert_close(y, quant.w8a8_linear(x.detach(), wq, ws))
    dy = torch.randn(40, 24, generator=g)
    y.backward(dy)
    torch.testing.assert_close(w.grad, dy.t() @ x.detach())
    assert 0 < rel(x.grad, dy @ w.detach()) < 0.03


def test_a_dimension_off_the_tile_pads_and_zero_tiles_stay_zero():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(10, 200, generator=g), torch.randn(30, 200, generator=g)
    assert rel(matmul8(x, w, "fine"), x @ w.t()) < 0.05
    zero = matmul8(torch.zeros(4, 200), w, "fine")
    assert torch.equal(zero, torch.zeros(4, 30))


def test_non_finite_values_are_refused_naming_the_gemm_and_operand():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(4, 16)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="forward's activation operand holds inf or NaN"):
        matmul8(x, w, "fine")
    y = matmul8(torch.randn(4, 16, requires_grad=True), w, "fine")
    with pytest.raises(ValueError, match="dgrad's activation operand holds inf or NaN"):
        y.backward(torch.full((4, 8), float("inf")))
    with pytest.raises(ValueError, match="x has 15 features and w 16 columns"):
        matmul8(torch.randn(2, 15), w, "fine")


def test_experts8_equals_experts_up_to_fp8_rounding_and_handles_an_empty_expert():
    torch.manual_seed(0)
    experts = Experts(4, 128, 64)
    ours = Experts8(4, 128, 64, "fine")
    ours.load_state_dict(experts.state_dict())
    x = torch.randn(10, 128)
    offsets = torch.tensor([3, 3, 7, 10], dtype=torch.int32)          # expert 1 gets no rows
    scale = torch.rand(10)
    expected = torch.cat([experts.expert(e, x[a:b]) for e, (a, b) in enumerate([(0, 3), (3, 3), (3, 7), (7, 10)])])
    assert rel(ours.grouped(x, offsets, scale), expected * scale[:, None]) < 0.1


def tiny_moe() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, d_model=128, n_head=4, n_kv_head=2,
                                   n_routed_experts=4, top_k=2, d_expert=128,
                                   n_shared_experts=1))


def test_convert_swaps_linears_and_experts_but_keeps_head_and_router_and_the_state_dict():
    model, reference = tiny_moe(), tiny_moe()
    keys = set(model.state_dict())
    convert(model, "fine")
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["layers.0.attn.wq"] == "Linear8" and kinds["layers.0.ffn.shared.w_gate"] == "Linear8"
    assert kinds["layers.1.ffn.experts"] == "Experts8" and kinds["output"] == "Linear"
    assert set(model.state_dict()) == keys
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, ref = model(idx, idx)[1], reference(idx, idx)[1]
    assert abs(loss.item() / ref.item() - 1) < 0.01
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_adamw_with_fp32_moments_is_torchs_and_bf16_moments_stay_close():
    torch.manual_seed(0)
    start = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(5)]
    results = {}
    for name, make in {"torch": lambda p: torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
                       "fp32": lambda p: AdamW([p], lr=1e-2, weight_decay=0.1, moment_dtype=torch.float32),
                       "bf16": lambda p: AdamW([p], lr=1e-2, weight_decay=0.1)}.items():
        p = torch.nn.Parameter(start.clone())
        opt = make(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results[name] = p.detach()
    torch.testing.assert_close(results["fp32"], results["torch"], rtol=1e-6, atol=1e-6)
    assert 0 < rel(results["bf16"] - start, results["torch"] - start) < 0.02
    with pytest.raises(ValueError, match="moment_dtype = torch.float16 is not allowed"):
        AdamW([torch.nn.Parameter(start)], moment_dtype=torch.float16)


def test_linear8_refuses_an_unknown_recipe():
    with pytest.raises(ValueError, match="recipe = 'fp8' is not allowed"):
        Linear8(4, 4, "fp8")
