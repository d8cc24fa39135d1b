"""Statistics that make a gap a measurement: pure numerics on per-window (or per-item) arrays.

The quantities are those llama.cpp's perplexity tool prints for a KL-divergence run
(``tools/perplexity/perplexity.cpp``, ``kl_divergence``): ln(PPL(Q)/PPL(base)) and its uncertainty,
the correlation of Q's and the baseline's NLLs, mean KLD and its percentiles, the change Δp in the
probability of the correct token (mean, RMS, percentiles), and the share of positions whose top-1
tokens agree. The definitions match llama.cpp's; one thing differs on purpose: llama.cpp takes its
standard errors across tokens, as if the tokens of a text were independent, and quantlab takes them
across windows (see ``quantlab.evaluate``): the unit of every standard error here is one window's mean
(or, for task accuracy, one item), so se = std(per-window values, ddof=1) / sqrt(windows).

- ln(PPL(Q)/PPL(base)) = mean NLL(Q) - mean NLL(base) = mean over windows of d_w, the paired per-window
  difference of mean NLLs (every window scores the same number of tokens). Its standard error is
  std(d) / sqrt(W): llama.cpp's sqrt(se_Q^2 + se_base^2 - 2 cov) at the window level, written as the
  spread of one paired difference.
- ppl_gap = exp(r) - 1 with r the log-ratio, so by the delta method se(gap) = exp(r) se(r).
- Percentiles interpolate linearly between order statistics at fraction * (n - 1), as llama.cpp's
  ``percentile`` lambda and numpy's default do.
- Δp = p_Q(correct token) - p_base(correct token) per position; RMS Δp = sqrt(mean Δp^2), whose
  standard error follows llama.cpp: se(RMS) = se(mean Δp^2) / (2 RMS).
- A paired accuracy difference (McNemar): with b items only A gets right and c only B,
  diff = (b - c) / n and se = sqrt(b + c - (b - c)^2 / n) / n (the ddof=0 spread of the per-item
  differences, so a single scheme's se is the binomial sqrt(acc (1 - acc) / n), acc_stderr).

Everything returns None rather than NaN where a number cannot be formed (one window, zero spread for
a correlation, non-finite inputs).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional, Sequence

import numpy as np

# name -> fraction, in llama.cpp's printing order. KLD: max, 99.9 ... 0.1, min; Δp adds 75 and 25.
KLD_PERCENTILES = {"max": 1.0, "p99_9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "median": 0.5,
                   "p10": 0.10, "p5": 0.05, "p1": 0.01, "p0_1": 0.001, "min": 0.0}
DELTA_P_PERCENTILES = {"max": 1.0, "p99_9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p75": 0.75,
                       "median": 0.5, "p25": 0.25, "p10": 0.10, "p5": 0.05, "p1": 0.01, "p0_1": 0.001, "min": 0.0}


def _finite(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _array(values) -> Optional[np.ndarray]:
    """values as a float64 array, or None when any is missing or not finite."""
    if values is None:
        return None
    arr = np.asarray(values)
    # Only a Python sequence holding None comes out as objects; a tensor's or float list's values do not
    # need looking at one by one (an evaluation's per-position KL: 65,536 of them).
    if arr.dtype == object and any(v is None for v in arr.ravel()):
        return None
    arr = arr.astype(np.float64)
    return arr if np.isfinite(arr).all() else None


def mean_and_stderr(values, ddof: int = 1) -> tuple[Optional[float], Optional[float]]:
    """(mean, std(values, ddof) / sqrt(n)); the standard error is None for fewer than ddof + 1 values."""
    arr = _array(values)
    if arr is None or arr.size == 0:
        return None, None
    mean = float(arr.mean())
    if arr.size <= ddof:
        return mean, None
    return mean, _finite(arr.std(ddof=ddof) / math.sqrt(arr.size))


def window_means(per_position) -> Optional[list]:
    """(W, T) per-position values -> the W per-window means, each a float or None where not finite."""
    arr = np.asarray(per_position, dtype=np.float64)
    return [_finite(v) for v in arr.mean(axis=1)]


def percentiles(values, fractions: dict) -> Optional[dict]:
    """name -> the value at that fraction (linear interpolation, as llama.cpp and numpy); None if not finite."""
    arr = _array(np.asarray(values, dtype=np.float64).ravel())
    if arr is None or arr.size == 0:
        return None
    qs = np.quantile(arr, list(fractions.values()))
    return {name: float(q) for name, q in zip(fractions, qs)}


def correlation(a, b) -> Optional[float]:
    """Pearson correlation of two paired samples; None when either has no spread (or < 2 values)."""
    a, b = _array(a), _array(b)
    if a is None or b is None or a.size < 2 or a.size != b.size:
        return None
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return _finite(float((da * db).sum()) / denom) if denom > 0 else None


def log_ppl_ratio(window_nll, baseline_window_nll) -> dict:
    """Per-window mean NLLs of Q and of the baseline (same windows) -> ln_ppl_ratio, its stderr (paired,
    across windows), ppl_gap_stderr (delta method: exp(r) se(r)) and nll_correlation."""
    q, base = _array(window_nll), _array(baseline_window_nll)
    out = dict.fromkeys(("ln_ppl_ratio", "ln_ppl_ratio_stderr", "ppl_gap_stderr", "nll_correlation"))
    if q is None or base is None or q.size == 0 or q.size != base.size:
        return out
    r, se = mean_and_stderr(q - base)
    out["ln_ppl_ratio"] = r
    out["ln_ppl_ratio_stderr"] = se
    out["ppl_gap_stderr"] = _finite(math.exp(r) * se) if r is not None and se is not None and r < 700 else None
    out["nll_correlation"] = correlation(q, base)
    return out


def kl_statistics(kld, agree) -> dict:
    """(W, T) per-position KL divergences and top-1 agreements -> kld_stderr, kld_percentiles,
    top1_agreement_stderr (across windows) and the per-window means window_kld, window_top1."""
    kld = np.asarray(kld, dtype=np.float64)
    agree = np.asarray(agree, dtype=np.float64)
    if not np.isfinite(kld).all():
        return dict.fromkeys(("kld_stderr", "kld_percentiles", "top1_agreement_stderr", "window_kld", "window_top1"))
    window_kld, window_top1 = window_means(kld), window_means(agree)
    return {"kld_stderr": mean_and_stderr(window_kld)[1],
            "kld_percentiles": percentiles(kld, KLD_PERCENTILES),
            "top1_agreement_stderr": mean_and_stderr(window_top1)[1],
            "window_kld": window_kld, "window_top1": window_top1}


def delta_p_statistics(nll, baseline_nll) -> dict:
    """(W, T) per-position NLLs of Q and of the baseline -> Δp = p_Q - p_base of the correct token:
    delta_p_mean and its stderr, delta_p_rms and its stderr (both across windows), delta_p_percentiles."""
    keys = ("delta_p_mean", "delta_p_stderr", "delta_p_rms", "delta_p_rms_stderr", "delta_p_percentiles")
    nll, baseline_nll = np.asarray(nll, dtype=np.float64), np.asarray(baseline_nll, dtype=np.float64)
    if not (np.isfinite(nll).all() and np.isfinite(baseline_nll).all()) or nll.size == 0:
        return dict.fromkeys(keys)
    dp = np.exp(-nll) - np.exp(-baseline_nll)                  # (W, T)
    mean, se = mean_and_stderr(dp.mean(axis=1))
    mse, se_mse = mean_and_stderr((dp * dp).mean(axis=1))
    rms = math.sqrt(mse)
    rms_se = _finite(0.5 / rms * se_mse) if se_mse is not None and rms > 0 else (0.0 if se_mse is not None else None)
    return dict(zip(keys, (mean, se, rms, rms_se, percentiles(dp, DELTA_P_PERCENTILES))))


def mcnemar(correct_a: Sequence, correct_b: Sequence) -> tuple[Optional[float], Optional[float]]:
    """Paired accuracy difference acc_A - acc_B on the same items and its standard error from the
    discordant items: sqrt(b + c - (b - c)^2 / n) / n, b = only A right, c = only B right."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    n = a.size
    if n == 0 or b.size != n:
        return None, None
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return (only_a - only_b) / n, math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n


# ----------------------------------------------------------------------------------------------
# Deciding an assertion at a confidence level


def z_value(confidence: float) -> float:
    """The one-sided normal quantile: 1.645 at 0.95."""
    return NormalDist().inv_cdf(confidence)


def units_needed(sd: float, margin: float, z: float) -> Optional[int]:
    """The smallest n with z * sd / sqrt(n) < |margin|: how many units (windows, items) would settle an
    estimate ``margin`` away from its threshold at this spread. None when margin is 0 (nothing settles it)."""
    if margin == 0 or not math.isfinite(margin):
        return None
    return max(2, math.floor((z * sd / abs(margin)) ** 2) + 1)


def decide(difference: float, stderr: float, op: str, z: float) -> str:
    """'pass', 'fail' or 'inconclusive' for ``estimate op threshold`` given difference = estimate - threshold
    and its standard error: pass when the whole one-sided interval satisfies op, fail when the bound on
    the other side already violates it."""
    upper, lower = difference + z * stderr, difference - z * stderr
    if op == "<":
        return "pass" if upper < 0 else "fail" if lower >= 0 else "inconclusive"
    if op == "<=":
        return "pass" if upper <= 0 else "fail" if lower > 0 else "inconclusive"
    if op == ">":
        return "pass" if lower > 0 else "fail" if upper <= 0 else "inconclusive"
    if op == ">=":
        return "pass" if lower >= 0 else "fail" if upper < 0 else "inconclusive"
    raise ValueError(f"confidence applies to <, <=, > and >=, not {op!r}")
