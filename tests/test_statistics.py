"""The statistics that make a gap a measurement (quantlab.statistics, and Compare's confidence): standard
errors against a bootstrap over windows, percentiles and Δp against a direct numpy computation, the
paired (McNemar) accuracy difference, and pass / fail / inconclusive on the one-sided bound."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab import statistics
from quantlab.evaluate import WindowPass, kl_per_position, next_token_log_probs, paired_statistics, token_nll
from quantlab.metrics import lookup, resolve
from quantlab.results import SchemeResult, TaskResult
from quantlab.spec import check, parse_spec
from quantlab.spec.checks import Compare, Expectation


def bootstrap_se(per_window: np.ndarray, stat, resamples: int = 2000, seed: int = 0) -> float:
    """Standard deviation of ``stat`` over resamples of whole windows (rows), with replacement."""
    rng = np.random.default_rng(seed)
    n = len(per_window)
    return float(np.std([stat(per_window[rng.integers(0, n, n)]) for _ in range(resamples)], ddof=1))


def paired_nlls(windows: int, spread: float, seed: int):
    """Per-window mean NLLs of a baseline and of a scheme that is worse by a noisy, correlated amount."""
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.4, windows)
    return base + 0.1 + rng.normal(0.0, spread, windows), base


@settings(max_examples=15)
@given(windows=st.integers(8, 40), spread=st.floats(0.01, 0.5), seed=st.integers(0, 2 ** 16))
def test_log_ratio_and_gap_standard_errors_agree_with_a_bootstrap_over_windows(windows, spread, seed):
    q, base = paired_nlls(windows, spread, seed)
    stats = statistics.log_ppl_ratio(q.tolist(), base.tolist())
    pairs = np.stack([q, base], axis=1)
    # The bootstrap resamples with n, not n - 1, in the variance: it is sqrt((n - 1) / n) of the ddof=1 se.
    shrink = math.sqrt((windows - 1) / windows)
    boot_r = bootstrap_se(pairs, lambda p: np.mean(p[:, 0] - p[:, 1]))
    boot_gap = bootstrap_se(pairs, lambda p: math.exp(np.mean(p[:, 0] - p[:, 1])) - 1)
    assert stats["ln_ppl_ratio"] == pytest.approx(np.mean(q) - np.mean(base))
    assert stats["ln_ppl_ratio_stderr"] * shrink == pytest.approx(boot_r, rel=0.12)
    assert stats["ppl_gap_stderr"] * shrink == pytest.approx(boot_gap, rel=0.12)
    assert stats["ppl_gap_stderr"] == pytest.approx(math.exp(stats["ln_ppl_ratio"]) * stats["ln_ppl_ratio_stderr"])
    assert stats["nll_correlation"] == pytest.approx(np.corrcoef(q, base)[0, 1])


@settings(max_examples=10)
@given(windows=st.integers(6, 30), tokens=st.integers(2, 12), seed=st.integers(0, 2 ** 16))
def test_kld_top1_and_delta_p_standard_errors_agree_with_a_bootstrap_over_windows(windows, tokens, seed):
    rng = np.random.default_rng(seed)
    kld = rng.gamma(0.5, 0.02, (windows, tokens)) * rng.uniform(0.2, 3.0, (windows, 1))
    agree = rng.random((windows, tokens)) < rng.uniform(0.6, 0.99, (windows, 1))
    nll = rng.gamma(2.0, 1.0, (windows, tokens))
    base = np.abs(nll + rng.normal(0, 0.3, (windows, tokens)))
    shrink = math.sqrt((windows - 1) / windows)
    kl = statistics.kl_statistics(kld, agree)
    dp = statistics.delta_p_statistics(nll, base)
    assert kl["kld_stderr"] * shrink == pytest.approx(bootstrap_se(kld, np.mean), rel=0.12)
    top1_boot = bootstrap_se(agree.astype(float), np.mean)
    assert kl["top1_agreement_stderr"] * shrink == pytest.approx(top1_boot, rel=0.12, abs=1e-9)
    diffs = np.exp(-nll) - np.exp(-base)
    assert dp["delta_p_stderr"] * shrink == pytest.approx(bootstrap_se(diffs, np.mean), rel=0.12)
    assert dp["delta_p_rms_stderr"] * shrink == pytest.approx(
        bootstrap_se(diffs, lambda d: math.sqrt(np.mean(d * d))), rel=0.2)


def test_percentiles_and_probability_deltas_match_numpy_on_small_logits():
    gen = torch.Generator().manual_seed(0)
    base_logits = torch.randn(3, 6, 7, generator=gen)                     # (W, T, V)
    logits = base_logits + 0.3 * torch.randn(3, 6, 7, generator=gen)
    tokens = torch.randint(0, 7, (3, 6), generator=gen)
    base_lp, lp = next_token_log_probs(base_logits), next_token_log_probs(logits)
    targets = tokens[:, 1:]
    nll, base_nll = token_nll(lp, targets), token_nll(base_lp, targets)
    kld = kl_per_position(base_lp, lp)
    agree = base_lp.argmax(-1) == lp.argmax(-1)
    stats = paired_statistics(WindowPass(nll=nll, baseline_nll=base_nll, kld=kld, top1_agree=agree,
                                         nonfinite_logits=0, forward_tokens=18, seconds=1.0))

    # Directly, in float64 numpy: softmax probabilities, KL(p || q), p(correct), percentiles.
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p = softmax(base_logits[:, :-1].double().numpy())
    q = softmax(logits[:, :-1].double().numpy())
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    t = targets.numpy()[..., None]
    dp = np.take_along_axis(q, t, -1)[..., 0] - np.take_along_axis(p, t, -1)[..., 0]
    for name, frac in statistics.KLD_PERCENTILES.items():
        assert stats["kld_percentiles"][name] == pytest.approx(np.percentile(kl, 100 * frac), rel=1e-4, abs=1e-7)
    for name, frac in statistics.DELTA_P_PERCENTILES.items():
        assert stats["delta_p_percentiles"][name] == pytest.approx(np.percentile(dp, 100 * frac), abs=1e-6)
    assert stats["kld_percentiles"]["max"] == pytest.approx(kl.max(), rel=1e-4)
    assert stats["delta_p_mean"] == pytest.approx(dp.mean(), abs=1e-6)
    assert stats["delta_p_rms"] == pytest.approx(math.sqrt((dp ** 2).mean()), abs=1e-6)
    assert stats["delta_p_stderr"] == pytest.approx(dp.mean(1).std(ddof=1) / math.sqrt(3), abs=1e-6)
    assert stats["window_nll"] == pytest.approx((-np.log(np.take_along_axis(q, t, -1)[..., 0])).mean(1).tolist())
    assert stats["window_top1"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean(1).tolist())
    assert stats["window_kld"] == pytest.approx(kl.mean(1).tolist(), rel=1e-4)


def test_percentile_members_are_metrics_that_resolve_from_a_result_read_back_from_json():
    result = SchemeResult(kld_percentiles={"p99_9": 0.5, "max": float("nan")}, window_nll=[1.0, float("inf")],
                          tasks={"t": TaskResult(0.5, 0.5, 2, correct=[True, 0])})
    back = SchemeResult.from_json(json.loads(json.dumps(result.to_json(), allow_nan=False)))
    assert back == result and back.window_nll == [1.0, None] and back.tasks["t"].correct == [1, 0]
    assert resolve(back, "kld_percentiles.p99_9") == 0.5 and resolve(back, "kld_percentiles.max") is None
    assert lookup("kld_percentiles.p99_9").unit == "nats" and lookup("kld_percentiles.p99_9").higher_is_better is False
    assert lookup("delta_p_percentiles.p75") is not None and lookup("kld_percentiles.p75") is None
    assert lookup("kld_percentiles") is None          # the family itself is not one number


def test_mcnemar_standard_error_comes_from_the_discordant_items():
    # 100 items: 80 both right, 6 only A, 2 only B, 12 both wrong.
    a = [1] * 80 + [1] * 6 + [0] * 2 + [0] * 12
    b = [1] * 80 + [0] * 6 + [1] * 2 + [0] * 12
    diff, se = statistics.mcnemar(a, b)
    assert diff == pytest.approx(0.04)
    assert se == pytest.approx(math.sqrt(6 + 2 - (6 - 2) ** 2 / 100) / 100)
    # the same number as the ddof=0 spread of the per-item differences, and 0 without discordant items
    assert se == pytest.approx(np.std(np.subtract(a, b)) / 10)
    assert statistics.mcnemar(a, a) == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Assertions with confidence


def run_with_gap(shift: float, windows: int = 64, spread: float = 0.02, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.3, windows)
    q = base + shift + rng.normal(0.0, spread, windows)
    entry = lambda nll: {"window_nll": nll.tolist(), "ppl": float(np.exp(nll.mean()))}   # noqa: E731
    return {"baseline": "fp32", "health": [], "sweeps": [],
            "results": {"fp32": entry(base), "q": {**entry(q), "ppl_gap": float(np.exp((q - base).mean()) - 1)}}}


GAP_SPEC = {"schemes": {"fp32": "fp32", "q": "int4-g64"},
            "expect": [{"metric": "ppl_gap", "scheme": "q", "<": 0.15, "confidence": 0.95}]}


@pytest.mark.parametrize("shift, passed, words", [
    (0.08, True, "95% upper bound"),            # gap ~ 8%: clearly below
    (0.20, False, "fails at 95%"),              # gap ~ 22%: clearly above
    (0.137, False, "inconclusive at 95%: evaluate more tokens ("),   # gap 14.8%: straddles 15%
])
def test_a_gap_clearly_below_clearly_above_and_straddling_the_threshold(shift, passed, words):
    spec = parse_spec(GAP_SPEC, source="s.yaml")
    assert spec.expect[0].options == {"confidence": 0.95}
    outcome = check(spec.expect[0], run_with_gap(shift), spec)
    assert outcome.passed is passed and words in outcome.message, outcome.message
    assert outcome.inconclusive is ("inconclusive" in words)


def test_inconclusive_names_the_windows_that_would_settle_it_at_this_spread():
    results = run_with_gap(0.137)
    spec = parse_spec(GAP_SPEC, source="s.yaml")
    outcome = check(spec.expect[0], results, spec)
    needed = int(outcome.message.split("(")[-1].split(" windows needed at this spread")[0])
    d = np.subtract(results["results"]["q"]["window_nll"], results["results"]["fp32"]["window_nll"])
    gap, sd = math.exp(d.mean()) - 1, math.exp(d.mean()) * d.std(ddof=1)     # delta method, per window
    z = statistics.z_value(0.95)
    assert z * sd / math.sqrt(needed) < abs(0.15 - gap) <= z * sd / math.sqrt(needed - 1)
    assert needed > 64 and ", 64 evaluated)" in outcome.message


def test_without_confidence_nothing_changes():
    spec = parse_spec({**GAP_SPEC, "expect": [{"metric": "ppl_gap", "scheme": "q", "<": 0.15}]}, source="s.yaml")
    outcome = check(spec.expect[0], run_with_gap(0.137), spec)
    assert spec.expect[0].options == {} and outcome.passed and "margin" in outcome.message


def test_two_schemes_compare_by_their_paired_difference():
    results = run_with_gap(0.05, spread=0.01)
    spec = parse_spec({"schemes": {"fp32": "fp32", "q": "int4-g64"},
                       "expect": [{"metric": "ppl", "scheme": "q", "<": {"metric": "ppl", "scheme": "fp32", "times": 1.02},
                                   "confidence": 0.95},
                                  {"metric": "ppl", "scheme": "q", ">": {"metric": "ppl", "scheme": "fp32"},
                                   "confidence": 0.99}]}, source="s.yaml")
    worse = check(spec.expect[0], results, spec)
    assert not worse.passed and "paired over 64 windows" in worse.message and "fails at 95%" in worse.message
    assert "fp32's" in worse.message and "\u00d7 1.02" in worse.message
    # Unpaired, the windows' own spread (sd 0.3 in NLL) would hide a 5% difference; paired it is clear.
    assert check(spec.expect[1], results, spec).passed


def test_accuracy_against_another_scheme_uses_mcnemar_and_says_what_it_compared():
    a = [1] * 80 + [1] * 6 + [0] * 2 + [0] * 12
    b = [1] * 80 + [0] * 6 + [1] * 2 + [0] * 12
    results = {"baseline": "fp32", "health": [], "sweeps": [],
               "results": {"fp32": {"tasks": {"t": {"acc": 0.82, "correct": b}}},
                           "q": {"tasks": {"t": {"acc": 0.86, "correct": a}}}}}
    item = {"metric": "tasks.t.acc", "scheme": "q", ">=": {"metric": "tasks.t.acc", "scheme": "fp32", "plus": -0.05}}
    plain = Compare().evaluate(Expectation("compare", 1, "q", "tasks.t.acc", ">=", {**item[">="], "times": 1.0}), results)
    # item 7: fp32's accuracy, the offset and the threshold, not the threshold passed off as fp32's accuracy
    assert "tasks.t.acc of q = 0.86 >= fp32's 0.82 - 0.05 = 0.77 (margin 0.09)" == plain.message
    sure = Compare().evaluate(Expectation("compare", 1, "q", "tasks.t.acc", ">=", {**item[">="], "times": 1.0},
                                          options={"confidence": 0.95}), results)
    diff, se = statistics.mcnemar(a, b)
    assert f"se {se:.6g}" in sure.message and "paired over 100 items" in sure.message
    assert sure.passed is (diff + 0.05 - statistics.z_value(0.95) * se >= 0)
