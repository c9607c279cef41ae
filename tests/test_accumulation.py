"""The limited-precision accumulator: rounding, swamping, and what promotion every 128 terms buys."""
import pytest
import torch

from moelab.accumulation import accumulation_error, keep_bits, limited_sum


def test_keep_bits_rounds_the_significand_toward_zero_or_to_nearest():
    x = torch.tensor([1.75, -1.75, 1.0 + 2.0 ** -20], dtype=torch.float64)
    assert keep_bits(x, 2).tolist() == [1.5, -1.5, 1.0]
    assert keep_bits(x, 2, "nearest").tolist() == [2.0, -2.0, 1.0]


def test_enough_bits_give_the_exact_sum_and_exact_terms_stay_exact():
    products = torch.rand(8, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(limited_sum(products, bits=53), products.sum(1), rtol=1e-12, atol=0)
    assert limited_sum(torch.ones(3, 100), bits=14).tolist() == [100.0] * 3


def test_small_terms_are_swamped_without_promotion_and_kept_with_it():
    products = torch.full((1, 1025), 2.0 ** -16, dtype=torch.float64)
    products[0, 0] = 1.0                              # a large first term: later ones fall below the 14 bits
    assert limited_sum(products, bits=14).item() == 1.0
    # with promotion only the 127 terms that share the 1.0's block of 128 are lost; the other 897 arrive
    assert limited_sum(products, bits=14, interval=128).item() == 1.0 + 897 * 2.0 ** -16


def test_promotion_every_128_cuts_the_error_at_k_4096_at_least_fivefold():
    without = accumulation_error(4096, bits=14, n=64)
    with_promotion = accumulation_error(4096, bits=14, interval=128, n=64)
    assert without >= 5 * with_promotion and with_promotion < 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=1), "bits = 1 is not allowed; allowed: an integer from 2 to 53"),
    (dict(interval=0), "interval = 0 is not allowed; allowed: None or an integer >= 1"),
    (dict(rounding="up"), "rounding = 'up' is not allowed; allowed: 'toward_zero', 'nearest'"),
])
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        limited_sum(torch.ones(1, 4), **kwargs)
    with pytest.raises(ValueError, match="products has 1 dimensions; allowed: 2"):
        limited_sum(torch.ones(4))
