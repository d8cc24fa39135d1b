"""The metric registry: every per-scheme metric quantlab reports, in one table read by everyone.

The spec validator (which names an assertion or golden file may use), the evaluator (which keys it
returns), the results type (its fields), the report (units, which way is better) and the golden checks
all read ``METRICS``; a metric is added here once. ``tasks.<task>.acc`` (and ``acc_stderr``, ``n``) are
metrics too, one per task a spec evaluates (``TASK_METRIC``).

A percentile family (``kld_percentiles``, ``delta_p_percentiles``: ``FAMILIES``) is one dict-valued
field of a scheme's entry; each member is a metric of its own (``kld_percentiles.p99_9``), found by
``lookup`` and read by ``resolve`` like a task's accuracy.

A dotted metric path is resolved by ``resolve`` alone, and the perplexity gap is computed by
``ppl_gap`` alone.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Optional

from quantlab.statistics import DELTA_P_PERCENTILES, KLD_PERCENTILES


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    unit: str                     # "" for a pure number
    higher_is_better: Optional[bool]   # None: neither (a count of work, a size of a protocol)
    source: str                   # who computes it: evaluate, bytes, calibrate, run
    paired: bool = False          # measured against the baseline's next-token distributions on the same
                                  # windows: needs evaluation.kl_divergence, and moves when the baseline does


def _table(*rows) -> dict:
    return {row[0]: Metric(*row) for row in rows}


METRICS = _table(
    # name, description, unit, higher is better, source[, paired]
    ("ppl", "perplexity on the evaluation split", "", False, "evaluate"),
    ("ppl_stderr", "standard error of ppl, across windows", "", None, "evaluate"),
    ("ppl_gap", "ppl / baseline ppl - 1, on the same windows", "", False, "evaluate"),
    ("ppl_gap_stderr", "standard error of ppl_gap: exp(ln_ppl_ratio) * ln_ppl_ratio_stderr (delta method)", "",
     None, "evaluate", True),
    ("ln_ppl_ratio", "ln(ppl / baseline ppl) = mean NLL - the baseline's mean NLL, on the same windows", "nats",
     False, "evaluate", True),
    ("ln_ppl_ratio_stderr", "standard error of ln_ppl_ratio from the paired per-window NLL differences", "nats",
     None, "evaluate", True),
    ("nll_correlation", "correlation of the per-window mean NLLs with the baseline's", "", True, "evaluate", True),
    ("bits_per_byte", "mean NLL in bits per scored byte (byte-level models only)", "bits", False, "evaluate"),
    ("kld_mean", "mean KL divergence from the baseline's next-token distribution", "nats", False, "evaluate", True),
    ("kld_stderr", "standard error of kld_mean, across windows", "nats", None, "evaluate", True),
    ("kld_median", "median KL divergence from the baseline", "nats", False, "evaluate", True),
    ("kld_p99", "99th percentile KL divergence from the baseline", "nats", False, "evaluate", True),
    ("top1_agreement", "share of positions where the top-1 token matches the baseline's", "", True, "evaluate", True),
    ("top1_agreement_stderr", "standard error of top1_agreement, across windows", "", None, "evaluate", True),
    ("delta_p_mean", "mean change in the probability of the correct token, p - p_baseline", "", None, "evaluate", True),
    ("delta_p_stderr", "standard error of delta_p_mean, across windows", "", None, "evaluate", True),
    ("delta_p_rms", "root mean square of the change in the probability of the correct token", "", False,
     "evaluate", True),
    ("delta_p_rms_stderr", "standard error of delta_p_rms: se(mean dp^2) / (2 delta_p_rms)", "", None, "evaluate", True),
    ("nan_count", "NaN/Inf values in weights and logits", "", False, "evaluate"),
    ("eval_tokens", "tokens scored for perplexity", "tokens", None, "evaluate"),
    ("eval_seconds", "wall seconds to evaluate", "s", False, "evaluate"),
    ("tokens_per_second", "window-pass throughput while evaluating", "tokens/s", True, "evaluate"),
    ("bytes_total", "deployable bytes of the whole model", "B", False, "bytes"),
    ("bytes_linear", "deployable bytes of the quantized Linear layers", "B", False, "bytes"),
    ("bits_per_weight", "bytes_linear * 8 / Linear parameters (scales and zeros included)", "bits", False, "bytes"),
    ("quantize_seconds", "wall seconds to calibrate and quantize", "s", False, "calibrate"),
    ("mean_rel_loss", "mean over layers of the relative loss tr(D H D^T)/tr(W H W^T)", "", False, "calibrate"),
    ("mean_rtn_rel_loss", "mean over layers of the RTN relative loss on the same Hessians", "", False, "calibrate"),
    ("mean_heldout_rel_loss", "mean over layers of the relative loss on held-out inputs "
                              "(calibration.heldout_samples)", "", False, "calibrate"),
)

# What a task contributes to a scheme's entry: tasks.<task>.<field>.
TASK_FIELDS = {
    "acc": Metric("acc", "multiple-choice accuracy", "", True, "evaluate"),
    "acc_stderr": Metric("acc_stderr", "binomial standard error of acc", "", None, "evaluate"),
    "n": Metric("n", "items scored", "items", None, "evaluate"),
}
TASK_METRIC = re.compile(r"tasks\.([\w-]+)\.(" + "|".join(TASK_FIELDS) + r")")

# Dict-valued metrics: one field of a scheme's entry holding a family, each member a metric
# (``kld_percentiles.p99_9``). Percentiles are over every scored position, interpolated linearly.
FAMILIES = {
    "kld_percentiles": (Metric("kld_percentiles", "percentiles of the per-position KL divergence from the baseline",
                               "nats", False, "evaluate", True), tuple(KLD_PERCENTILES)),
    "delta_p_percentiles": (Metric("delta_p_percentiles", "percentiles of the per-position change in the probability "
                                   "of the correct token, p - p_baseline", "", None, "evaluate", True),
                            tuple(DELTA_P_PERCENTILES)),
}


def _ordinal(number: str) -> str:
    """'1' -> '1st', '99.9' -> '99.9th', '0.1' -> '0.1st'."""
    last = number[-1]
    suffix = {"1": "st", "2": "nd", "3": "rd"}.get(last, "th") if not number.endswith(("11", "12", "13")) else "th"
    return number + suffix


def _member(family: str, key: str) -> Metric:
    m = FAMILIES[family][0]
    what = {"max": "maximum", "min": "minimum", "median": "median"}.get(key, _ordinal(key[1:].replace("_", ".")) + " percentile")
    return Metric(f"{family}.{key}", f"{what} of {m.description.split(' of ', 1)[1]}", m.unit, m.higher_is_better,
                  m.source, m.paired)


# Per-layer statistics a golden layers file may record.
LAYER_METRICS = ("rel_loss", "rtn_rel_loss")


def lookup(name) -> Optional[Metric]:
    """The registry entry of a metric path, or None when it is not a metric."""
    if not isinstance(name, str):
        return None
    if name in METRICS:
        return METRICS[name]
    family, _, key = name.partition(".")
    if family in FAMILIES and key in FAMILIES[family][1]:
        return _member(family, key)
    match = TASK_METRIC.fullmatch(name)
    return TASK_FIELDS[match.group(2)] if match else None


def is_metric(name) -> bool:
    return lookup(name) is not None


def unknown_metric_hint(name) -> str:
    """'did you mean ...?' or the list of known metrics, for an error message."""
    members = [f"{f}.{k}" for f, (_, keys) in FAMILIES.items() for k in keys]
    close = difflib.get_close_matches(str(name), list(METRICS) + members, n=1)
    return f"did you mean {close[0]!r}?" if close else (f"known metrics: {', '.join(METRICS)}, "
                                                      f"{', '.join(f + '.<p>' for f in FAMILIES)}, tasks.<task>.acc")


def resolve(entry, path: str):
    """The value at a dotted metric path (``ppl``, ``tasks.verb_tense.acc``) in one scheme's entry of
    results.json (a dict or a ``SchemeResult``); None when any part is missing."""
    value = entry.to_json() if hasattr(entry, "to_json") else entry
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def ppl_gap(ppl: Optional[float], baseline_ppl: Optional[float]) -> Optional[float]:
    """Relative perplexity increase over the baseline: 0.15 means 15% worse. None when either is
    missing or the ratio is not a finite number."""
    if ppl is None or baseline_ppl is None or not baseline_ppl > 0:
        return None
    gap = ppl / baseline_ppl - 1.0
    return gap if math.isfinite(gap) else None
