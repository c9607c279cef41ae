"""The checks of notebook 08's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import math

import pytest
import torch
from solutions import load

from moelab import exercises, quant
from moelab.exercises.ranks import exchange

NS = load("08_quantization.ipynb")


def test_the_published_solutions_pass():
    assert exercises.check_quantize_int8(NS["quantize_int8"])
    assert exercises.check_round_trip_error(NS["round_trip_error"])


def test_a_float32_quantize_int8_passes_too():
    def in_float32(x, block):
        d = x.shape[-1]
        tiles = torch.nn.functional.pad(x, (0, (-d) % block)).view(*x.shape[:-1], -1, block)
        scales = tiles.abs().amax(-1, keepdim=True) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        return (tiles / scales).round().clamp(-127, 127).to(torch.int8).flatten(-2)[..., :d], scales.squeeze(-1)

    assert exercises.check_quantize_int8(in_float32)


def test_quantize_int8_that_truncates_fails_with_a_hint():
    def truncating(x, block):
        d = x.shape[-1]
        tiles = torch.nn.functional.pad(x, (0, (-d) % block)).view(*x.shape[:-1], -1, block)
        scales = tiles.abs().amax(-1, keepdim=True) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        return (tiles / scales).to(torch.int8).flatten(-2)[..., :d], scales.squeeze(-1)

    verdict = exercises.check_quantize_int8(truncating)
    assert not verdict
    assert repr(verdict).startswith("✗ check_quantize_int8: on input 1 of 8 (x=tensor(1, 256) float32, block=128) "
                                    "the result[0][0, 1] is 31, expected 32")
    assert "truncates towards zero; round first" in repr(verdict)


def test_quantize_int8_with_one_scale_per_row_fails_on_the_tiled_input():
    def per_row(x, block):
        scales = x.abs().amax(-1, keepdim=True) / 127
        return (x / scales).round().to(torch.int8), scales.expand(*x.shape[:-1], math.ceil(x.shape[-1] / block))

    verdict = repr(exercises.check_quantize_int8(per_row))
    assert verdict.startswith("✗ check_quantize_int8: on input 1 of 8 (x=tensor(1, 256) float32, block=128) the "
                              "result[0][0, ")


def test_quantize_int8_with_a_zero_scale_for_an_empty_tile_fails_with_a_hint():
    def zero_scale(x, block):
        d = x.shape[-1]
        tiles = torch.nn.functional.pad(x.double(), (0, (-d) % block)).view(*x.shape[:-1], -1, block)
        scales = tiles.abs().amax(-1, keepdim=True) / 127
        q = (tiles / scales).nan_to_num(0.0).round().to(torch.int8)
        return q.flatten(-2)[..., :d], scales.squeeze(-1).float()

    verdict = repr(exercises.check_quantize_int8(zero_scale))
    assert verdict.startswith("✗ check_quantize_int8: on input 8 of 8 (x=tensor(2, 256) float32, block=128) the "
                              "result[1][1, 1] is 0, expected 1")
    assert "an all-zero tile gets scale 1" in verdict


def test_round_trip_error_over_every_column_fails_with_a_hint():
    def every_column(x, fmt, block, keep):
        return NS["round_trip_error"](x, fmt, block, torch.ones_like(keep))

    verdict = repr(exercises.check_round_trip_error(every_column))
    assert verdict.startswith("✗ check_round_trip_error: on input 3 of 8 (x=tensor(16, 256) float32, fmt='int8', "
                              "block=(16, 256), keep=tensor(256,) bool) the result is 0.0636")
    assert "expected 0.2956" in verdict and "where keep is True" in verdict


def test_round_trip_error_with_one_scale_per_tensor_fails_with_a_hint():
    def per_tensor(x, fmt, block, keep):
        return NS["round_trip_error"](x, fmt, tuple(x.shape), keep)

    verdict = repr(exercises.check_round_trip_error(per_tensor))
    assert verdict.startswith("✗ check_round_trip_error: on input 1 of 8 (x=tensor(16, 256) float32, fmt='int8', "
                              "block=(1, 128)")
    assert "not one for the whole tensor" in verdict


def test_round_trip_error_as_a_mean_relative_error_fails_with_a_hint():
    def mean_relative(x, fmt, block, keep):
        (R, C), (br, bc) = x.shape, block
        blocks = x.double().view(R // br, br, C // bc, bc)
        top = 127.0 if fmt == "int8" else 448.0
        scales = (blocks.abs().amax(dim=(1, 3), keepdim=True) / top).float().double()
        q = (blocks / scales).round() if fmt == "int8" else (blocks / scales).to(torch.float8_e4m3fn).double()
        back = (q * scales).view(R, C).float()
        return float(((back - x).abs() / x.abs())[:, keep].mean())

    verdict = repr(exercises.check_round_trip_error(mean_relative))
    assert "✗ check_round_trip_error: on input 1 of 8" in verdict and "not the mean of |diff| / |x|" in verdict


@pytest.mark.slow
def test_the_published_rank_code_passes():
    assert exercises.check_fp8_all_to_all(NS["fp8_all_to_all"])


def sent_in_fp32(x, send_splits, recv_splits):
    return exchange(x, send_splits, recv_splits)


def without_scales(x, send_splits, recv_splits):
    """The FP8 values arrive but are never multiplied back by their tiles' scales."""
    q, _ = quant.quantize(x, "fp8_e4m3", 128)
    return sent_in_fp32(q.float(), send_splits, recv_splits)


@pytest.mark.slow
def test_fp8_rows_sent_unrounded_or_without_their_scales_fail_naming_the_input_and_rank():
    verdict = repr(exercises.check_fp8_all_to_all(sent_in_fp32))
    assert verdict.startswith("✗ check_fp8_all_to_all: on input 1 of 6 (2 ranks, splits random, rows of 256) rank 0: "
                              "the result[0, 0] is ")
    assert verdict.endswith("Hint: round each row to FP8 before it travels: what arrives is the sender's round trip, "
                            "not its fp32 values.")
    verdict = repr(exercises.check_fp8_all_to_all(without_scales))
    assert verdict.startswith("✗ check_fp8_all_to_all: on input 1 of 6 (2 ranks, splits random, rows of 256) rank 0:")
    assert verdict.endswith("Hint: multiply each FP8 value by its tile's scale, which travels behind the row.")


def test_an_unfilled_stub_raises_not_implemented_error():
    def stub(x, block):
        raise NotImplementedError("exercise 08.1: write quantize_int8")

    with pytest.raises(NotImplementedError, match="exercise 08.1"):
        exercises.check_quantize_int8(stub)
