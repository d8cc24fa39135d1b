"""AWQ's scale search on one input group: alpha = 0 is RTN, scaling preserves the function before
rounding, outlier channels make AWQ beat RTN, the chosen error never exceeds RTN's, GPTQ on the scaled
weights against the scaled Hessian, and clipping."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.awq import (DEFAULT_ALPHAS, apply_clip, awq_scales, awq_search, clip_search, group_error,
                          scaled_hessian)
from quantlab.gptq import gptq_quantize, output_loss
from quantlab.quant import Scheme, quantize_rtn

pytestmark = pytest.mark.usefixtures("one_thread")


def outlier_inputs(n_tokens: int, in_features: int, seed: int, n_outliers: int = 3, gain: float = 30.0):
    """X (tokens, in): Gaussian channels, a few of them ``gain`` times larger, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, in_features, generator=g)
    outliers = torch.randperm(in_features, generator=g)[:n_outliers]
    X[:, outliers] *= gain
    return X


def group_of(seed: int, in_features: int = 64, outs=(48, 32)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(out, in_features, generator=g) for out in outs]


def stats(X):
    return X.T @ X / X.shape[0], X.abs().mean(dim=0)


def test_alpha_zero_is_rtn_exactly():
    X = outlier_inputs(256, 64, seed=0)
    H, absmean = stats(X)
    weights = group_of(1)
    scheme = Scheme(4, group_size=16)
    assert torch.equal(awq_scales(absmean, 0.0), torch.ones(64))
    result = awq_search(weights, H, absmean, scheme, alphas=[0.0])
    assert result.alpha == 0.0
    rtn = [quantize_rtn(W, scheme).dequantize() for W in weights]
    assert result.error == group_error(weights, rtn, H) == result.rtn_error
    # And code for code: quantizing W * 1 is quantizing W.
    for W in weights:
        assert torch.equal(quantize_rtn(W * awq_scales(absmean, 0.0), scheme).codes, quantize_rtn(W, scheme).codes)


def test_scaling_preserves_the_function_before_rounding():
    X = outlier_inputs(128, 64, seed=2)
    _, absmean = stats(X)
    W = group_of(3)[0]
    for alpha in (0.25, 0.5, 1.0):
        s = awq_scales(absmean, alpha)
        assert not torch.allclose(s, torch.ones_like(s))
        torch.testing.assert_close((X / s) @ (W * s).T, X @ W.T, rtol=1e-5, atol=1e-4)


def test_scaled_hessian_is_the_hessian_of_scaled_inputs():
    X = outlier_inputs(128, 32, seed=4)
    H, absmean = stats(X)
    s = awq_scales(absmean, 0.5)
    Xs = X / s
    torch.testing.assert_close(scaled_hessian(H, s), Xs.T @ Xs / Xs.shape[0], rtol=1e-4, atol=1e-4)


def test_awq_beats_rtn_with_outlier_channels():
    X = outlier_inputs(512, 64, seed=5)
    H, absmean = stats(X)
    weights = group_of(6)
    result = awq_search(weights, H, absmean, Scheme(4, group_size=32))
    assert result.alpha > 0
    assert result.error < 0.8 * result.rtn_error   # measured: 0.18 x RTN (alpha 0.32) on this layer
    # The reported error is the empirical output error on X.
    s = result.scales
    empirical = sum(float(((X @ W.T - X @ (quantize_rtn(W * s, Scheme(4, group_size=32)).dequantize() / s).T) ** 2)
                          .sum(dim=1).mean()) for W in weights)
    assert result.error == pytest.approx(empirical, rel=1e-3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), group_size=st.sampled_from([None, 8, 16]),
       symmetric=st.booleans(), duo=st.booleans(), clip=st.booleans())
def test_chosen_error_never_exceeds_rtn(seed, bits, group_size, symmetric, duo, clip):
    X = outlier_inputs(64, 32, seed=seed, gain=1 + seed % 50)
    H, absmean = stats(X)
    weights = group_of(seed + 1, in_features=32, outs=(8, 4))
    result = awq_search(weights, H, absmean, Scheme(bits, group_size=group_size, symmetric=symmetric),
                        alphas=DEFAULT_ALPHAS[::3], duo_scaling=duo, clip=clip)
    assert result.error <= result.rtn_error
    assert result.errors[0] == (0.0, result.rtn_error)
    assert min(e for _, e in result.errors) >= result.error or clip


def test_gptq_on_scaled_weights_reports_the_original_output_error():
    """GPTQ on W s against diag(1/s) H diag(1/s) measures tr(D H D^T) of the unscaled W_hat = Q(W s) / s."""
    X = outlier_inputs(512, 64, seed=7)
    H, absmean = stats(X)
    W = group_of(8, outs=(32,))[0]
    scheme = Scheme(4, group_size=16)
    s = awq_search([W], H, absmean, scheme).scales
    result = gptq_quantize(W * s, scaled_hessian(H, s), scheme)
    W_hat = result.qtensor.dequantize() / s
    assert result.loss == pytest.approx(output_loss(W, W_hat, H), rel=1e-3)
    assert result.loss < output_loss(W, quantize_rtn(W * s, scheme).dequantize() / s, H)


def test_clip_search_never_worse_per_group_and_clamps():
    X = outlier_inputs(256, 32, seed=9, n_outliers=0)
    H, _ = stats(X)
    g = torch.Generator().manual_seed(10)
    W = torch.randn(16, 32, generator=g)
    W[0, 3] = 12.0   # one large weight: clipping its group pays
    scheme = Scheme(3, group_size=8)
    clipped, factors = clip_search(W, H, scheme)
    assert factors.shape == (16, 4) and bool((factors <= 1).all()) and bool((factors >= 0.55 - 1e-6).all())
    torch.testing.assert_close(clipped, apply_clip(W, factors, scheme))
    assert output_loss(W, quantize_rtn(clipped, scheme).dequantize(), H) <= output_loss(
        W, quantize_rtn(W, scheme).dequantize(), H)
    assert float(factors[0, 0]) < 1.0


def test_invalid_inputs_are_refused():
    H, absmean = torch.eye(8), torch.ones(8)
    with pytest.raises(ValueError, match="share an input"):
        awq_search([], H, absmean, Scheme(4))
    with pytest.raises(ValueError, match=r"\(out, 8\)"):
        awq_search([torch.ones(2, 8), torch.ones(2, 4)], H, absmean, Scheme(4))
    with pytest.raises(ValueError, match="alphas"):
        awq_search([torch.ones(2, 8)], H, absmean, Scheme(4), alphas=[1.5])
    with pytest.raises(ValueError, match="mean"):
        awq_search([torch.ones(2, 8)], H, -absmean, Scheme(4))


# ----------------------------------------------------------------------------------------------
# In the pipeline (quantlab.calibrate)


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def test_method_awq_in_the_pipeline_records_alpha_beats_rtn_and_counts_its_scales(minigpt, calibration):
    from quantlab.calibrate import quantize_model

    scheme = Scheme(4, group_size=16)
    rtn = quantize_model(minigpt, scheme, calibration, method="rtn")
    awq = quantize_model(minigpt, scheme, calibration, method="awq")
    alphas = [layer["awq_alpha"] for layer in awq.layers.values()]
    assert all(a is not None and 0 <= a <= 1 for a in alphas) and any(a > 0 for a in alphas)
    # The error before AWQ is RTN's on the same Hessian (the first layer's is the float model's in both
    # runs), and never below the error after: MiniGPT's groups are single Linears (fused c_attn).
    first = minigpt.all_linear_names()[0]
    assert awq.layers[first]["rtn_rel_loss"] == pytest.approx(rtn.layers[first]["rel_loss"], rel=1e-6)
    for layer in awq.layers.values():
        assert layer["rel_loss"] <= layer["rtn_rel_loss"] * (1 + 1e-6)
    assert awq.mean("rel_loss") < rtn.mean("rel_loss")
    # Each stored scale is float16, shared by its input group, and 2 bytes per input feature.
    scales = {id(s): s for s in awq.input_scales.values()}
    assert all(s.dtype == torch.float16 for s in scales.values())
    extra = sum(2 * s.numel() for s in scales.values())
    assert extra > 0 and awq.bytes["bytes_linear"] == rtn.bytes["bytes_linear"] + extra
    # The model computes with Q(W s) / s.
    name = next(iter(awq.input_scales))
    expected = awq.qtensors[name].dequantize() / awq.input_scales[name].to(torch.float32)
    torch.testing.assert_close(awq.dequantized(name), expected)
    with torch.no_grad():
        logits = awq.model.logits(calibration[:2])
        materialized = awq.materialize()
        torch.testing.assert_close(materialized.module.get_submodule(name).weight, expected)
        torch.testing.assert_close(materialized.logits(calibration[:2]), logits)


def test_gptq_with_awq_solves_the_scaled_problem(minigpt, calibration):
    from quantlab.calibrate import quantize_model
    from quantlab.gptq import relative_loss

    scheme = Scheme(4, group_size=16)
    both = quantize_model(minigpt, scheme, calibration, method="gptq", awq=True)
    assert both.input_scales and all(layer["awq_alpha"] is not None for layer in both.layers.values())
    assert all(layer["rel_loss"] is not None for layer in both.layers.values())
    with pytest.raises(ValueError, match="awq=True applies to method 'gptq'"):
        quantize_model(minigpt, scheme, calibration, method="rtn", awq=True)


def test_awq_schemes_are_not_exported(minigpt, calibration, tmp_path):
    from quantlab.calibrate import quantize_model
    from quantlab.export import export_compressed_tensors

    awq = quantize_model(minigpt, Scheme(4, group_size=16), calibration, method="awq")
    with pytest.raises(ValueError, match="AWQ input scales are not folded"):
        export_compressed_tensors(awq, tmp_path / "out")


def test_awq_spec_keys():
    from quantlab.spec.schemes import SchemeConfig

    awq = SchemeConfig("a", bits=4, group_size=64, method="awq")
    assert awq.awq and awq.needs_calibration and not awq.is_integer and awq.describe()["awq"] is True
    both = SchemeConfig("b", bits=4, group_size=64, method="gptq", awq=True)
    assert both.describe()["method"] == "gptq" and both.describe()["awq"] is True
    assert "awq" not in SchemeConfig("c", bits=4, group_size=64, method="gptq").describe()   # cache keys unchanged
    with pytest.raises(ValueError, match="write method: awq"):
        SchemeConfig("d", bits=4, group_size=64, method="rtn", awq=True)
