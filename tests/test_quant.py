"""Unit and Hypothesis property tests of the quantizers, grids, packing and byte accounting."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantlab.quant import (
    MSE_SHRINK_GRID, PRESETS, FloatScheme, QTensor, Scheme, compute_scales, expand, expected_nbytes, fp16_ceil, pack,
    group_index, packed_nbytes, quantize_rtn, unpack,
)

# Weights whose scales are normal float16 numbers: |w| in [2^-6, 2^6] or exactly 0.
weight_values = st.one_of(
    st.just(0.0),
    st.floats(0.015625, 64.0, width=32),
    st.floats(-64.0, -0.015625, width=32),
)


@st.composite
def weights(draw, min_side=1, max_side=48):
    out_features = draw(st.integers(min_side, max_side))
    in_features = draw(st.integers(min_side, max_side))
    W = draw(arrays(np.float32, (out_features, in_features), elements=weight_values))
    return torch.from_numpy(W)


@st.composite
def int_schemes(draw, symmetric=None, grid=None):
    bits = draw(st.integers(2, 8))
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    group_size = draw(st.integers(1, 40)) if granularity == "group" else None
    sym = draw(st.booleans()) if symmetric is None else symmetric
    g = (draw(st.sampled_from(["restricted", "full"])) if grid is None else grid) if sym else "restricted"
    return Scheme(bits, group_size=group_size, granularity=granularity, symmetric=sym, grid=g)


def stored_scale_per_weight(q: QTensor) -> torch.Tensor:
    """The float16 scale that applies to each weight, broadcast to W's shape."""
    return q.scales.to(torch.float32)[:, q.group_of_column()].expand(q.shape)


# ---------------------------------------------------------------------------------------------
# Scheme validation


def test_int4_restricted_grid_is_minus7_to_7_and_full_grid_is_minus8_to_7():
    assert (Scheme(4).qmin, Scheme(4).qmax) == (-7, 7)
    assert (Scheme(8).qmin, Scheme(8).qmax) == (-127, 127)
    assert (Scheme(4, grid="full").qmin, Scheme(4, grid="full").qmax) == (-8, 7)
    assert (Scheme(4, symmetric=False).qmin, Scheme(4, symmetric=False).qmax) == (0, 15)


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "bits must be an integer in 2..8"),
    ({"bits": 9}, "bits must be an integer in 2..8"),
    ({"bits": 4.0}, "bits must be an integer in 2..8"),
    ({"bits": 4, "granularity": "group"}, "needs group_size"),
    ({"bits": 4, "group_size": 0}, "positive integer"),
    ({"bits": 4, "group_size": 64, "granularity": "channel"}, "only applies to granularity 'group'"),
    ({"bits": 4, "granularity": "row"}, "granularity must be one of"),
    ({"bits": 4, "grid": "wide"}, "grid must be"),
    ({"bits": 4, "symmetric": False, "grid": "full"}, "asymmetric always uses"),
    ({"bits": 4, "scale_search": "l2"}, "scale_search must be 'absmax'"),
])
def test_invalid_schemes_raise_a_value_error_saying_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scheme(**kwargs)


def test_group_size_implies_group_granularity_and_default_is_per_channel():
    assert Scheme(4, group_size=64).granularity == "group"
    assert Scheme(8).granularity == "channel"


def test_presets_cover_the_seed_schemes():
    assert set(PRESETS) == {"fp32", "fp16", "int8-per-tensor", "int8-per-channel", "int4-g64", "int4-g128"}
    assert PRESETS["int4-g64"] == Scheme(4, group_size=64)
    assert PRESETS["fp16"] == FloatScheme("float16") and PRESETS["fp16"].bits == 16


# ---------------------------------------------------------------------------------------------
# RTN: fixed cases


def test_last_group_smaller_than_group_size_is_quantized_on_its_own():
    torch.manual_seed(0)
    W = torch.randn(4, 576)  # SmolLM2's hidden size: 4 full groups of 128 and one of 64
    W[:, 512:] *= 100  # a last group with a much larger range must get its own scale
    q = quantize_rtn(W, Scheme(4, group_size=128))
    assert q.scales.shape == (4, 5)
    assert torch.allclose(q.scales[:, 4].float(), W[:, 512:].abs().amax(1) / 7, rtol=1e-3)
    assert (q.dequantize() - W).abs()[:, :512].max() < 1.0


def test_all_zero_group_gives_zero_scale_zero_codes_and_no_nan():
    W = torch.zeros(3, 8)
    W[0, 4:] = torch.tensor([1.0, -2.0, 3.0, 0.5])
    for scheme in (Scheme(4, group_size=4), Scheme(4, group_size=4, symmetric=False), Scheme(4, granularity="tensor")):
        q = quantize_rtn(W, scheme)
        assert torch.isfinite(q.dequantize()).all()
        assert (q.dequantize()[1:] == 0).all()
    q = quantize_rtn(W, Scheme(4, group_size=4))
    assert (q.scales[1:] == 0).all() and (q.codes[1:] == 0).all()


def test_scales_are_float16_and_dequantize_is_exactly_codes_times_stored_scale():
    torch.manual_seed(1)
    W = torch.randn(16, 64)
    q = quantize_rtn(W, Scheme(4, group_size=16))
    assert q.scales.dtype == torch.float16
    assert torch.equal(q.dequantize(), q.codes.float() * stored_scale_per_weight(q))


def test_quantize_rtn_does_not_modify_w_and_rejects_nan():
    W = torch.randn(4, 8)
    before = W.clone()
    quantize_rtn(W, Scheme(4, group_size=4))
    assert torch.equal(W, before)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rtn(W, Scheme(4))


def test_asymmetric_codes_use_zero_points_and_represent_zero_exactly():
    W = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 5.0, 2.0]])
    q = quantize_rtn(W, Scheme(4, symmetric=False))
    assert q.zeros is not None and q.codes.min() >= 0 and q.codes.max() <= 15
    assert (q.dequantize()[W == 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# RTN: properties


@given(W=weights(), scheme=int_schemes())
def test_codes_lie_inside_the_grid(W, scheme):
    q = quantize_rtn(W, scheme)
    assert q.codes.min() >= scheme.qmin and q.codes.max() <= scheme.qmax


@given(W=weights(min_side=2), bits=st.integers(2, 8), granularity=st.sampled_from(["tensor", "channel"]))
def test_symmetric_restricted_grid_extremes_are_reached_when_the_data_has_both_signs(W, bits, granularity):
    peak = float(W.abs().max()) + 1.0
    W = W.clone()
    W[:, 0], W[:, 1] = peak, -peak  # every row has both signs at the same magnitude
    q = quantize_rtn(W, Scheme(bits, granularity=granularity))
    qmax = 2 ** (bits - 1) - 1
    assert (q.codes.amax(1) == qmax).all() and (q.codes.amin(1) == -qmax).all()
    # ... and the extreme code times the stored scale is the row's absmax (up to float16 rounding)
    assert torch.allclose(q.dequantize().amax(1), torch.tensor(peak), rtol=2 ** -10)


@given(W=weights(min_side=2))
def test_int4_per_tensor_codes_span_exactly_minus7_to_7_on_two_signed_data(W):
    assume(W.max() > 0 and W.min() < 0)
    q = quantize_rtn(W, Scheme(4, granularity="tensor"))
    # the larger-magnitude side lands on +-7; nothing ever reaches -8.
    assert max(q.codes.max().item(), -q.codes.min().item()) == 7
    assert q.codes.min() >= -7


@given(W=weights(), scheme=int_schemes(), act_order=st.booleans())
def test_dequantize_is_each_code_minus_its_zero_times_its_groups_stored_scale(W, scheme, act_order):
    # dequantize() has a fast path for consecutive equal groups; every layout must give these products.
    g_idx = group_index(W.shape[1], scheme).flip(0) if act_order else None
    q = quantize_rtn(W, scheme, g_idx=g_idx)
    zero = 0.0 if q.zeros is None else expand(q.zeros, q.group_of_column(), q.shape).float()
    assert torch.equal(q.dequantize(), (q.codes.float() - zero) * stored_scale_per_weight(q))


@given(W=weights(), scheme=int_schemes())
def test_dequantization_error_is_at_most_half_the_stored_scale(W, scheme):
    q = quantize_rtn(W, scheme)
    err = (q.dequantize() - W).abs()
    # float32 arithmetic in the check itself may be off by an ulp of W
    bound = stored_scale_per_weight(q) / 2 + W.abs() * 2e-7
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"


@given(W=weights(), scheme=int_schemes(symmetric=True, grid="restricted"))
def test_quantization_is_idempotent_on_already_quantized_weights(W, scheme):
    q = quantize_rtn(W, scheme)
    again = quantize_rtn(q.dequantize(), scheme)
    assert torch.equal(again.codes, q.codes)
    assert torch.equal(again.scales, q.scales)


@given(W=weights(), scheme=int_schemes(), k=st.integers(-4, 4))
def test_scaling_w_by_a_power_of_two_scales_the_scales_and_keeps_the_codes(W, scheme, k):
    q = quantize_rtn(W, scheme)
    # below 2^-14 float16 turns subnormal and loses relative precision: not a power-of-two shift any more
    assume(not (q.scales > 0).any() or q.scales[q.scales > 0].float().min() * 2.0 ** k >= 2 ** -14)
    q2 = quantize_rtn(W * 2.0 ** k, scheme)
    assert torch.equal(q2.codes, q.codes)
    assert torch.equal(q2.scales.float(), q.scales.float() * 2.0 ** k)


@given(W=weights(), bits=st.integers(2, 8), symmetric=st.booleans())
def test_one_group_spanning_all_inputs_equals_per_channel(W, bits, symmetric):
    per_group = quantize_rtn(W, Scheme(bits, group_size=W.shape[1], symmetric=symmetric))
    per_channel = quantize_rtn(W, Scheme(bits, granularity="channel", symmetric=symmetric))
    assert torch.equal(per_group.codes, per_channel.codes)
    assert torch.equal(per_group.scales, per_channel.scales)


@given(W=weights(), scheme=int_schemes(), extra_bits=st.integers(1, 4))
def test_more_bits_never_increase_the_worst_case_error(W, scheme, extra_bits):
    # Grids of different widths are not nested, so one weight's error can grow with a bit more
    # (w=5 of absmax 14: 0.33 at INT3, 1.0 at INT4); the guaranteed max error, scale/2, cannot.
    assume(scheme.bits + extra_bits <= 8)
    wider = Scheme(scheme.bits + extra_bits, group_size=scheme.group_size, granularity=scheme.granularity,
                   symmetric=scheme.symmetric, grid=scheme.grid)
    narrow_q, wide_q = quantize_rtn(W, scheme), quantize_rtn(W, wider)
    assert (wide_q.scales.float() <= narrow_q.scales.float()).all()
    wide_err = (wide_q.dequantize() - W).abs()
    assert (wide_err <= stored_scale_per_weight(narrow_q) / 2 + W.abs() * 2e-7).all()


# ---------------------------------------------------------------------------------------------
# Scale search (scale_search='mse')


def per_group_squared_error(W: torch.Tensor, q: QTensor) -> torch.Tensor:
    """sum of (W - W_hat)^2 over each group: (rows, n_groups), rows 1 per tensor."""
    squared = (W - q.dequantize()).square()
    rows = 1 if q.scheme.granularity == "tensor" else W.shape[0]
    g = q.group_of_column()
    index = (g.repeat(W.shape[0]) if rows == 1 else g).expand(rows, -1)
    return torch.zeros(q.scales.shape).scatter_add_(1, index, squared.reshape(rows, -1))


def searched(scheme: Scheme) -> Scheme:
    return dataclasses.replace(scheme, scale_search="mse")


@given(W=weights(), scheme=int_schemes())
def test_mse_search_never_has_a_larger_group_error_than_absmax(W, scheme):
    # The grid starts at shrink 1.0, the absmax scale itself, so every group can only gain.
    absmax, mse = quantize_rtn(W, scheme), quantize_rtn(W, searched(scheme))
    assert (per_group_squared_error(W, mse) <= per_group_squared_error(W, absmax)).all()


@given(W=weights(), scheme=int_schemes())
def test_mse_search_codes_stay_in_the_grid_and_each_scale_is_a_shrunk_absmax_scale(W, scheme):
    absmax, mse = quantize_rtn(W, scheme), quantize_rtn(W, searched(scheme))
    assert mse.codes.min() >= scheme.qmin and mse.codes.max() <= scheme.qmax
    assert (mse.scales.float() <= absmax.scales.float()).all()
    # Shrinking the range by s is scaling W by s: the absmax scales of W * s are the candidates.
    candidates = torch.stack([compute_scales(W * shrink, scheme)[0] for shrink in MSE_SHRINK_GRID])
    assert (candidates == mse.scales).any(dim=0).all()


def test_mse_search_shrinks_the_scale_of_a_group_with_one_outlier():
    # 63 weights in [-1, 1] and one at 8: the absmax INT4 scale 8/7 rounds nearly all of them to 0 or +-1;
    # a shrunk scale trades a clipped outlier for a finer grid for the rest.
    W = torch.linspace(-1, 1, 64).reshape(1, 64).clone()
    W[0, 10] = 8.0
    scheme = Scheme(4, group_size=64)
    absmax, mse = quantize_rtn(W, scheme), quantize_rtn(W, searched(scheme))
    assert float(mse.scales[0, 0]) < float(absmax.scales[0, 0])
    assert float(per_group_squared_error(W, mse)) < float(per_group_squared_error(W, absmax))


def test_mse_grid_runs_from_absmax_down_to_half_in_21_steps():
    assert MSE_SHRINK_GRID[0] == 1.0 and MSE_SHRINK_GRID[-1] == pytest.approx(0.5) and len(MSE_SHRINK_GRID) == 21
    assert all(a > b for a, b in zip(MSE_SHRINK_GRID, MSE_SHRINK_GRID[1:]))


def test_absmax_is_the_default_and_its_scales_are_absmax_over_qmax():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    q = quantize_rtn(W, Scheme(4, group_size=16))
    absmax = W.abs().reshape(8, 2, 16).amax(dim=2)
    assert Scheme(4).scale_search == "absmax"
    assert torch.equal(q.scales, fp16_ceil(absmax / 7))


# ---------------------------------------------------------------------------------------------
# Packing and bytes


@given(bits=st.integers(1, 8), data=st.data())
def test_pack_then_unpack_round_trips_for_every_bit_width(bits, data):
    n = data.draw(st.integers(0, 300))
    values = torch.tensor(data.draw(st.lists(st.integers(0, 2 ** bits - 1), min_size=n, max_size=n)), dtype=torch.int64)
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), values)


def test_int4_packs_two_codes_per_byte():
    packed = pack(torch.tensor([0x3, 0xA, 0xF, 0x1]), 4)
    assert packed.tolist() == [0xA3, 0x1F]


def test_pack_rejects_values_outside_the_bit_width():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.tensor([16]), 4)


@given(W=weights(), scheme=int_schemes())
def test_nbytes_matches_the_closed_form_and_the_packed_codes(W, scheme):
    q = quantize_rtn(W, scheme)
    out_features, in_features = W.shape
    assert q.nbytes == expected_nbytes(out_features, in_features, scheme)
    extra_zeros = 0 if q.zeros is None else packed_nbytes(q.zeros.numel(), scheme.bits)
    assert q.nbytes == q.packed_codes().numel() + 2 * q.scales.numel() + extra_zeros


def test_g_idx_is_counted_as_int32_when_columns_are_reordered():
    W = torch.randn(8, 32)
    g_idx = torch.randperm(32, generator=torch.Generator().manual_seed(0)) // 8
    q = quantize_rtn(W, Scheme(4, group_size=8), g_idx=g_idx)
    assert q.nbytes == expected_nbytes(8, 32, Scheme(4, group_size=8), reordered=True)
    assert q.nbytes == quantize_rtn(W, Scheme(4, group_size=8)).nbytes + 4 * 32


@pytest.mark.parametrize("name, expected", [
    ("fp32", 4096 * 4096 * 4),
    ("fp16", 4096 * 4096 * 2),
    ("int8-per-tensor", 4096 * 4096 + 2),
    ("int8-per-channel", 4096 * 4096 + 2 * 4096),
    ("int4-g64", 4096 * 4096 // 2 + 2 * 4096 * 64),
    ("int4-g128", 4096 * 4096 // 2 + 2 * 4096 * 32),
])
def test_bytes_of_a_4096x4096_linear_under_each_preset(name, expected):
    assert expected_nbytes(4096, 4096, PRESETS[name]) == expected


def test_quantized_4096_square_int4_g128_has_the_closed_form_bytes():
    W = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    assert quantize_rtn(W, PRESETS["int4-g128"]).nbytes == 4096 * 4096 // 2 + 2 * 4096 * 32
