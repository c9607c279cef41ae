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
