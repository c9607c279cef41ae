"""8-bit tiles: the cast is torch's own, scales are per 1×block tile, and packing keeps every byte."""
import pytest
import torch

from moelab.quant import FORMAT_MAX, dequantize, pack, quantize, unpack


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_quantize_scales_each_tile_by_its_own_max_and_round_trips_within_half_a_step(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g)
    x[0, 7] = 1000.0                                       # an outlier: only its own tile's scale grows
    q, scales = quantize(x, fmt, block=128)
    assert q.shape == x.shape and scales.shape == (5, 3)   # 300 = 128 + 128 + 44 (last tile padded)
    assert scales[0, 0] == pytest.approx(1000.0 / FORMAT_MAX[fmt])
    assert scales[0, 1] < 10 / FORMAT_MAX[fmt]
    back = dequantize(q, scales, block=128)
    tiles = torch.nn.functional.pad(x, (0, 84)).view(5, 3, 128)
    step = {"int8": 1.0, "fp8_e4m3": 2 ** -3, "fp8_e5m2": 2 ** -2}[fmt]   # relative spacing near the max
    bound = (0.5 * step * scales.unsqueeze(-1) * (1 if fmt == "int8" else FORMAT_MAX[fmt])).expand(5, 3, 128)
    err = torch.nn.functional.pad(back - x, (0, 84)).view(5, 3, 128).abs()
    assert (err <= bound + 1e-6).all()
    assert torch.equal(tiles.abs().amax(-1) > 0, torch.ones(5, 3, dtype=torch.bool))


def test_in_range_values_are_cast_exactly_as_torch_casts_them():
    x = torch.linspace(-448, 448, 1001).view(7, 143)
    x[:, 0] = 448.0                                        # every tile's max is 448: its scale is exactly 1
    q, scales = quantize(x, "fp8_e4m3", block=143)
    assert torch.equal(scales, torch.ones(7, 1))
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_an_all_zero_tile_gets_scale_one_and_inf_is_refused():
    q, scales = quantize(torch.zeros(2, 128), "fp8_e4m3")
    assert torch.equal(scales, torch.ones(2, 1)) and not q.float().any()
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="fmt = 'fp4' is not allowed"):
        quantize(torch.zeros(1, 4), "fp4")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_pack_and_unpack_keep_every_byte(fmt):
    q, scales = quantize(torch.randn(4, 256), fmt)
    packed = pack(q, scales)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 256 + 2 * 4)
    q2, s2 = unpack(packed, 256, fmt)
    assert q2.dtype == q.dtype and torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s2, scales)


from moelab.quant import (  # noqa: E402
    block_scales,
    dequantize_blocks,
    fp8_block_gemm,
    int8_mm,
    quantize_blocks,
    scaled_mm,
    scaled_mm_available,
    w8a8_linear,
)

MANTISSA = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14)}                 # mantissa bits, smallest normal exponent


def half_step(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Half the spacing of the format's grid around each value ``v`` (in scaled units)."""
    if fmt == "int8":
        return torch.full_like(v, 0.5)
    m, emin = MANTISSA[fmt]
    e = torch.floor(torch.log2(v.abs().clamp(min=1e-30))).clamp(min=emin)
    return torch.exp2(e - m - 1)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (1, 300), (200, 300), (7, 5)])
@pytest.mark.parametrize("pow2", [False, True])
def test_every_granularity_round_trips_within_half_a_step_of_its_grid(fmt, block, pow2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 300, generator=g) * torch.logspace(-3, 2, 300)   # channels of very different sizes
    x[3, 17] = 5000.0
    q, scales = quantize_blocks(x, fmt, block, pow2)
    assert q.dtype == FORMATS_[fmt] and q.shape == x.shape
    assert scales.shape == (-(-200 // block[0]), -(-300 // block[1]))
    full = scales.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:200, :300].double()
    back = dequantize_blocks(q, scales, block).double()
    assert ((back - x.double()).abs() <= half_step(x.double() / full, fmt) * full * (1 + 1e-6)).all()
    if pow2:
        assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)


FORMATS_ = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8}


def test_power_of_two_scales_only_shift_exponents_so_the_cast_is_torchs_own():
    x = torch.randn(4, 128) * 3
    q, scales = quantize_blocks(x, "fp8_e4m3", (1, 128), pow2=True)
    assert torch.equal(q.view(torch.uint8), (x / scales).to(torch.float8_e4m3fn).view(torch.uint8))
    assert (scales >= x.abs().amax(1, keepdim=True) / 448).all()


def test_values_beyond_the_format_and_subnormal_inputs_are_scaled_not_lost():
    big = torch.tensor([[1e6, -3e6, 5.0]])
    back = dequantize_blocks(*quantize_blocks(big, "fp8_e5m2", (1, 3)), (1, 3))
    assert torch.isfinite(back).all() and (back - big).abs().max() <= 3e6 * 2 ** -3
    small = torch.tensor([[1e-30, -3e-30, 2e-31]])                         # far below 1, above fp32's tiny·127
    back = dequantize_blocks(*quantize_blocks(small, "int8", (1, 3)), (1, 3))
    assert (back - small).abs().max() <= 3e-30 / 127 / 2 * 1.01 and back[0, 1] < 0


def test_int8_mm_equals_an_exact_integer_product():
    g = torch.Generator().manual_seed(0)
    for M in (1, 17, 64):
        a = torch.randint(-127, 128, (M, 96), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8)
        got = int8_mm(a, b)
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), (a.long()[:, None, :] * b.long()[None]).sum(-1))
    with pytest.raises(ValueError, match="allowed: torch.int8 both"):
        int8_mm(a.float(), b)


def test_block_scaled_fp8_gemm_equals_a_float64_product_of_the_dequantised_operands():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(33, 300, generator=g), torch.randn(200, 300, generator=g)
    a_q, a_s = quantize_blocks(a, "fp8_e4m3", (1, 128))
    w_q, w_s = quantize_blocks(w, "fp8_e4m3", (128, 128))
    got = fp8_block_gemm(a_q, a_s, w_q, w_s)
    ref = dequantize_blocks(a_q, a_s, (1, 128)).double() @ dequantize_blocks(w_q, w_s, (128, 128)).double().t()
    bound = 300 * 2 ** -23 * (a.abs().double() @ w.abs().double().t()) * 2        # fp32 sums of 128 products
    assert ((got.double() - ref).abs() <= bound).all()
    assert ((got - a @ w.t()).abs() / (a.abs() @ w.abs().t())).max() < 0.05       # and FP8 is close to fp32


@pytest.mark.parametrize("rowwise", [False, True])
def test_scaled_mm_equals_the_emulated_product(rowwise):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    block_a, block_b = ((1, 64), (1, 64)) if rowwise else ((32, 64), (48, 64))
    (a_q, a_s), (b_q, b_s) = quantize_blocks(a, "fp8_e4m3", block_a), quantize_blocks(b, "fp8_e4m3", block_b)
    if not rowwise:
        a_s, b_s = a_s.view(()), b_s.view(())
    expected = (a_q.float() @ b_q.float().t()) * a_s * (b_s.view(1, -1) if rowwise else b_s)
    torch.testing.assert_close(scaled_mm(a_q, a_s, b_q, b_s), expected, rtol=1e-5, atol=1e-4)
    if scaled_mm_available():                                  # torch's kernel, asked for, gives the same numbers
        torch.testing.assert_close(scaled_mm(a_q, a_s, b_q, b_s, kernel=True), expected, rtol=1e-5, atol=1e-4)
    else:
        with pytest.raises(ValueError, match="kernel = True is not allowed: torch._scaled_mm does not run on cpu"):
            scaled_mm(a_q, a_s, b_q, b_s, kernel=True)


def test_w8a8_linear_is_close_to_the_fp32_product():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g)
    w_q, w_s = quantize_blocks(w, "int8", (1, 256))
    got, exact = w8a8_linear(x, w_q, w_s), x @ w.t()
    assert ((got - exact).abs() / (x.abs() @ w.abs().t())).max() < 0.01
    assert block_scales(w, "int8", (1, 256)).shape == (128, 1)


def test_tiny_inputs_get_a_normal_scale_and_never_nan():
    from moelab.quant import round_trip_error, wire_ratio

    tiny = torch.tensor([[1e-44, 0.0, -5e-45]])                            # fp32 subnormals
    q, scales = quantize_blocks(tiny, "fp8_e4m3", (1, 3))
    assert torch.isfinite(q.float()).all() and scales.item() == torch.finfo(torch.float32).tiny
    back = dequantize_blocks(q, scales, (1, 3))                            # rounded towards zero, never NaN
    assert torch.isfinite(back).all() and (back - tiny).abs().max() <= torch.finfo(torch.float32).tiny
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    assert round_trip_error(x, "int8", (1, 128)) < 0.01 < round_trip_error(x, "fp8_e5m2", (1, 128)) < 0.1
    assert wire_ratio(256, 128) == (256 + 8) / 1024 and wire_ratio(7168, 128) == pytest.approx(0.2578, abs=1e-4)


TOP = torch.finfo(torch.float32).max


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("value", [3.2e38, 3.3e38, -3.4e38, TOP, -TOP])
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (7, 5)])
def test_values_at_the_top_of_fp32_come_back_finite(fmt, pow2, value, block):
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(0))
    x[0, 0], x[9, 13], x[15, 19] = value, -0.99 * value, 0.6 * value      # the amax of several blocks
    q, scales = quantize_blocks(x, fmt, block, pow2)
    back = dequantize_blocks(q, scales, block).double()
    assert torch.isfinite(scales).all() and torch.isfinite(back).all()
    full = scales.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:16, :20].double()
    assert ((back - x.double()).abs() <= half_step(x.double() / full, fmt) * full * (1 + 1e-6)).all()
    assert abs(back[0, 0].item() / value - 1) <= {"int8": 0.01, "fp8_e4m3": 2 ** -4, "fp8_e5m2": 2 ** -3}[fmt]
    q, scales = quantize(x, fmt, 8, pow2)                                   # 1×8 tiles, into fp32 and bf16
    assert torch.isfinite(dequantize(q, scales, 8)).all()
    assert torch.isfinite(dequantize(q, scales, 8, dtype=torch.bfloat16)).all()


def test_fp8_block_gemm_refuses_scales_of_another_block_size():
    a_q, a_s = quantize_blocks(torch.randn(4, 256), "fp8_e4m3", (1, 64))
    w_q, w_s = quantize_blocks(torch.randn(8, 256), "fp8_e4m3", (128, 128))
    with pytest.raises(ValueError, match=r"do not fit 1×128 tiles .* allowed: \(4, 2\) and \(1, 2\)"):
        fp8_block_gemm(a_q, a_s, w_q, w_s)


def test_zero_rows_quantise_pack_and_come_back_empty():
    q, scales = quantize(torch.zeros(0, 200), "fp8_e4m3")
    assert q.shape == (0, 200) and scales.shape == (0, 2)
    q2, s2 = unpack(pack(q, scales), 200, "fp8_e4m3")
    assert q2.shape == (0, 200) and s2.shape == (0, 2) and dequantize(q2, s2).shape == (0, 200)
    q3, s3 = unpack(pack(*quantize(torch.randn(3, 200), "int8"))[1:2], 200, "int8")   # one row: offset and strides
    assert q3.shape == (1, 200) and s3.shape == (1, 2)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_round_to_format_gives_the_casts_values_without_the_casts(fmt):
    from moelab.quant import FORMATS, round_to_format

    g = torch.Generator().manual_seed(0)
    top = FORMAT_MAX[fmt]
    edges = torch.tensor([0.0, -0.0, top, -top, 2 ** -6, 2 ** -9, 2 ** -10, 3 * 2 ** -10, 2 ** -14, 2 ** -16,
                          2 ** -17, 1.0625, 1.1875, -1.0625, 1.5 * 2 ** -17])       # grid points and ties
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-5, 1e-2, 1.0, 30.0)] + [edges]).clamp(-top, top)
    assert torch.equal(round_to_format(x, fmt), x.to(FORMATS[fmt]).float())
    with pytest.raises(ValueError, match="x is torch.float64; allowed: torch.float32"):
        round_to_format(x.double(), fmt)


@pytest.mark.parametrize("fmt, block", [("fp8_e4m3", (1, 128)), ("fp8_e4m3", (128, 128)), ("fp8_e5m2", (300, 200)),
                                        ("int8", (1, 200))])
def test_fake_quantize_equals_the_round_trip_through_8_bit_dtypes(fmt, block):
    from moelab.quant import dequantize_blocks, fake_quantize, quantize_blocks

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 200, generator=g)
    x[:, 7] *= 1e3
    x[:10] = 0.0                                                   # all-zero tiles stay zero
    torch.testing.assert_close(fake_quantize(x, fmt, block),
                               dequantize_blocks(*quantize_blocks(x, fmt, block), block), rtol=0, atol=0)


def test_int8_mm_gives_the_same_integers_whichever_path_is_faster():
    from moelab.quant import _emulated_int8_mm, int8_kernel_faster, int8_mm

    g = torch.Generator().manual_seed(2)
    a, b = (torch.randint(-127, 128, (64, 300), generator=g, dtype=torch.int8) for _ in range(2))
    assert isinstance(int8_kernel_faster(), bool)
    assert torch.equal(int8_mm(a, b), _emulated_int8_mm(a, b))
    assert torch.equal(int8_mm(a, b), (a.long() @ b.long().t()).int())
