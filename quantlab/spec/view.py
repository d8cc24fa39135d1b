"""What a check may know of the spec while it is parsed (``SpecView``), and the helpers checks share to
refuse, with a located one-line error, what a run could only fail on or never move: an undefined
scheme, a metric the spec never computes. Split from ``checks.py``, which keeps one class per check.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

from quantlab.metrics import lookup
from quantlab.spec.located import Ctx

A_METHOD = {"float": "a float", "rtn": "an RTN", "gptq": "a GPTQ", "checkpoint": "a checkpoint"}


@dataclass
class SpecView:
    """What a check may know of the spec while parsing: its schemes and its sweep."""

    schemes: dict                  # name -> SchemeConfig
    sweep: Optional[tuple]         # (dotted key, values) or None
    heldout_samples: int = 0       # calibration.heldout_samples (0: mean_heldout_rel_loss is not measured)
    kl_divergence: bool = True     # evaluation.kl_divergence (false: kld_* and top1_agreement are not measured)
    tasks: tuple = ()              # evaluation.tasks (tasks.<task>.* exists only for these)
    baseline: Optional[str] = None

    def moved_by_sweep(self, scheme: str, metric: str) -> bool:
        """Whether the sweep (calibration.* or seed) can change ``metric`` of ``scheme``: only a scheme that
        draws calibration data changes, and a metric measured against the baseline changes with it."""
        base = self.schemes.get(self.baseline)
        return self.schemes[scheme].needs_calibration or (
            (metric == "ppl_gap" or _paired(metric)) and base is not None and base.needs_calibration)

    def metric_unavailable(self, metric: str) -> Optional[str]:
        """Why ``metric`` is never computed under this spec (None: it is), so an assertion on it could only fail."""
        if _paired(metric) and not self.kl_divergence:
            return f"{metric} is not measured with evaluation.kl_divergence: false; set it to true or drop the assertion"
        if metric == "mean_heldout_rel_loss" and self.heldout_samples == 0 and not (
                self.sweep and self.sweep[0] == "calibration.heldout_samples" and min(self.sweep[1]) > 0):
            return f"{metric} is measured only with calibration.heldout_samples > 0; set it (e.g. 32) or drop the assertion"
        if metric.startswith("tasks.") and metric.split(".")[1] not in self.tasks:
            task = metric.split(".")[1]
            return f"{metric} needs task {task!r} under evaluation.tasks; add it there or drop the assertion"
        return None


A_METHOD = {"float": "a float", "rtn": "an RTN", "gptq": "a GPTQ", "checkpoint": "a checkpoint"}


def scheme_names(item, key, ctx: Ctx, schemes: dict, allow_star=True) -> list:
    """The scheme names an assertion's ``key`` lists (``*``: all), each checked to be defined."""
    value = item.get(key)
    if value == "*" and allow_star:
        return list(schemes)
    names = value if isinstance(value, list) else [value]
    for n in names:
        if n not in schemes:
            close = difflib.get_close_matches(str(n), list(schemes), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"defined schemes: {', '.join(schemes)}"
            raise ctx.error(f"{key} {n!r} is not defined under schemes; {hint}", key)
    return names


def check_metric(metric, ctx: Ctx, spec: SpecView, key="metric") -> None:
    reason = spec.metric_unavailable(metric) if isinstance(metric, str) else None
    if reason:
        raise ctx.error(reason, key)


def _paired(metric: str) -> bool:
    """Measured against the baseline's distributions on the same windows (quantlab.metrics)."""
    entry = lookup(metric)
    return entry is not None and entry.paired
