"""The assertion language: one class per check, each parsing its YAML form and evaluating it.

An assertion in a spec's ``expect:`` list is data, never code. Without ``check:`` it is a metric
comparison (``Compare``); otherwise ``check:`` names one of ``CHECKS``. Each check's ``parse`` turns one
YAML item into ``Expectation`` objects (one per scheme, ``*`` expanded) or raises a located SpecError;
its ``evaluate`` turns an expectation and a run's results (the results.json shape) into an ``Outcome``
whose message is one line: what was measured, against what, by how much. Adding a check is adding a
class to ``CHECKS``.

(Past 400 lines on purpose: six checks, each a parse and an evaluate, read best side by side; the largest
is the comparison with ``confidence``, whose bound comes from the paired statistics in quantlab.statistics.)

A check that is true (or false) by construction is refused when the spec is loaded, with why: a metric
the spec never computes (``metric_unavailable``), a sweep check on a scheme the sweep cannot move (RTN
and float schemes draw no calibration data, so every sweep point reuses one result), a monotone check
over seeds (seeds are labels, not sizes), a Pareto frontier of one scheme, a health check on a scheme
that never calibrates, a grid check on a float scheme, a spread bound below zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from quantlab import statistics
from quantlab.analysis import pareto_frontier
from quantlab.metrics import METRICS, TASK_METRIC, is_metric, resolve, unknown_metric_hint
from quantlab.spec.located import Ctx, LocatedList, SpecError, check_keys, get_value, number
from quantlab.spec.view import A_METHOD, SpecView, check_metric, scheme_names  # noqa: F401

OPERATORS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
             ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


@dataclass
class Expectation:
    """One assertion. ``kind`` is a key of CHECKS; ``scheme`` is one scheme (``*`` expanded)."""

    kind: str
    line: Optional[int]
    scheme: Optional[str] = None
    metric: Optional[str] = None
    op: Optional[str] = None
    threshold: Any = None          # a number, or {"metric", "scheme", "times", "plus"} for another scheme
    options: dict = field(default_factory=dict)
    xfail: Optional[str] = None

    @property
    def id(self) -> str:
        if self.kind == "compare":
            rhs = self.threshold
            rhs = f"{rhs['metric']}[{rhs['scheme']}]" if isinstance(rhs, dict) else f"{rhs:g}" if isinstance(rhs, (int, float)) else str(rhs)
            return f"{self.metric}[{self.scheme}] {self.op} {rhs}"
        target = self.scheme or ",".join(self.options.get("schemes", [])) or "all"
        return f"{self.kind}[{target}]"


@dataclass
class Outcome:
    passed: bool
    message: str          # one line: what was measured, against what, and by how much
    measured: Any = None
    inconclusive: bool = False   # failed only because the confidence interval straddles the threshold


def fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def metric_value(results, scheme: str, metric: str):
    """A scheme's metric from results["results"], following dotted paths (tasks.verb_tense.acc)."""
    return resolve(results["results"][scheme], metric)


class Check:
    """The interface: ``keys`` an item may have, ``parse`` and ``evaluate``."""

    name = ""
    keys: frozenset = frozenset()

    def parse(self, item, ctx: Ctx, spec: SpecView, xfail) -> list:
        raise NotImplementedError

    def evaluate(self, exp: Expectation, results) -> Outcome:
        raise NotImplementedError


# Metrics an assertion may state with ``confidence``: each is a smooth function of a mean over independent
# units (evaluation windows, or a task's items), so its standard error and a paired difference exist.
CONFIDENCE_METRICS = ("ppl", "ppl_gap", "kld_mean", "top1_agreement", "tasks.<task>.acc")
CONFIDENCE_OPERATORS = ("<", "<=", ">", ">=")


def confidence_units(metric: str) -> Optional[str]:
    """What ``metric``'s standard error is taken over ('windows', or 'items of <task>'); None when it
    does not support confidence."""
    if metric in ("ppl", "ppl_gap", "kld_mean", "top1_agreement"):
        return "windows"
    match = TASK_METRIC.fullmatch(metric) if isinstance(metric, str) else None
    return f"items of {match.group(1)}" if match and match.group(2) == "acc" else None


def unit_values(results, scheme: str, metric: str):
    """(value, per-unit influence values) of a confidence metric, or (None, why not).

    The value is a smooth function g of a mean over units; the influence of unit i is g'(mean) u_i, so
    std(influence) / sqrt(n) is the delta-method standard error of the value, and influences of two
    schemes on the same units subtract to the paired difference's. ppl = exp(mean window NLL);
    ppl_gap = exp(mean paired NLL difference to the baseline) - 1; kld_mean, top1_agreement and a task's
    acc are plain means of per-window (per-item) values."""
    entry = results["results"][scheme]
    if metric.startswith("tasks."):
        task = metric.split(".")[1]
        units = ((entry.get("tasks") or {}).get(task) or {}).get("correct")
    elif metric in ("ppl", "ppl_gap"):
        units = entry.get("window_nll")
        if metric == "ppl_gap":
            base = (results["results"].get(results.get("baseline")) or {}).get("window_nll")
            units = None if units is None or base is None or len(base) != len(units) or None in base or None in units \
                else [a - b for a, b in zip(units, base)]
    else:
        units = entry.get({"kld_mean": "window_kld", "top1_agreement": "window_top1"}[metric])
    if not units or any(u is None or not math.isfinite(u) for u in units):
        return None, (f"{metric} of {scheme} has no per-{'item' if metric.startswith('tasks.') else 'window'} values "
                      "to take a confidence from (not measured, non-finite, or recorded by an older quantlab: re-run "
                      "the spec)")
    mean = sum(units) / len(units)
    if metric == "ppl":
        value = math.exp(mean)
        return value, [value * u for u in units]
    if metric == "ppl_gap":
        return math.exp(mean) - 1.0, [math.exp(mean) * u for u in units]
    return mean, [float(u) for u in units]


class Compare(Check):
    """``{metric: ppl_gap, scheme: q, "<": 0.15}``, or against another scheme's metric; with
    ``confidence: 0.95`` it passes only when the one-sided bound is beyond the threshold."""

    name = "compare"
    keys = frozenset({"metric", "scheme", "xfail", "confidence", *OPERATORS})

    def parse(self, item, ctx, spec, xfail):
        check_keys(item, self.keys, ctx, "a metric assertion")
        if "metric" not in item or "scheme" not in item:
            raise ctx.error("a metric assertion needs metric and scheme, e.g. {metric: ppl_gap, scheme: int4-g64, '<': 0.15}")
        if not is_metric(item["metric"]):
            raise ctx.error(f"unknown metric {item['metric']!r}; {unknown_metric_hint(item['metric'])}", "metric")
        ops = [k for k in item if k in OPERATORS]
        if len(ops) != 1:
            raise ctx.error("a metric assertion needs exactly one comparison: one of " + ", ".join(repr(o) for o in OPERATORS)
                            + " (quote it in YAML: '<': 0.15)")
        op, rhs = ops[0], item[ops[0]]
        check_metric(item["metric"], ctx, spec)
        if isinstance(rhs, dict):
            rctx = Ctx(ctx.source, rhs)
            check_keys(rhs, {"metric", "scheme", "times", "plus"}, rctx, "a comparison against another scheme")
            if not is_metric(rhs.get("metric")):
                raise rctx.error(f"unknown metric {rhs.get('metric')!r} on the right-hand side", "metric")
            check_metric(rhs["metric"], rctx, spec)
            if "scheme" not in rhs:
                raise rctx.error("a comparison against another scheme needs scheme, e.g. {metric: ppl, scheme: fp32}")
            scheme_names(rhs, "scheme", rctx, spec.schemes, allow_star=False)
            rhs = {"metric": rhs["metric"], "scheme": rhs["scheme"],
                   "times": number(rhs.get("times", 1.0), rctx, "times", "times"),
                   "plus": number(rhs.get("plus", 0.0), rctx, "plus", "plus")}
        elif isinstance(rhs, bool) or not isinstance(rhs, (int, float)):
            raise ctx.error(f"the threshold after {op!r} must be a number or {{metric, scheme}}, got {rhs!r}", op)
        else:
            number(rhs, ctx, op, f"the threshold after {op!r}")
        options = {}
        if "confidence" in item:
            options["confidence"] = self._confidence(item, op, rhs, ctx)
        return [Expectation(self.name, ctx.line(), s, item["metric"], op, rhs, options=dict(options), xfail=xfail)
                for s in scheme_names(item, "scheme", ctx, spec.schemes)]

    @staticmethod
    def _confidence(item, op, rhs, ctx) -> float:
        level = number(item["confidence"], ctx, "confidence", "confidence")
        if not 0.5 < level < 1:
            raise ctx.error(f"confidence must be in (0.5, 1), e.g. 0.95 for a one-sided 95% bound, got {level:g}",
                            "confidence")
        if op not in CONFIDENCE_OPERATORS:
            raise ctx.error(f"confidence applies to <, <=, > and >=, not {op!r}: an interval never shows equality",
                            "confidence")
        units = confidence_units(item["metric"])
        if units is None:
            raise ctx.error(f"{item['metric']} has no standard error to take a confidence from; confidence works "
                            f"with {', '.join(CONFIDENCE_METRICS)}; drop confidence", "confidence")
        if isinstance(rhs, dict):
            other = confidence_units(rhs["metric"])
            if other is None:
                raise ctx.error(f"{rhs['metric']} on the right-hand side has no standard error; confidence works with "
                                f"{', '.join(CONFIDENCE_METRICS)}; drop confidence", "confidence")
            if other != units:
                raise ctx.error(f"confidence needs both sides measured on the same units for a paired difference, but "
                                f"{item['metric']} is over {units} and {rhs['metric']} over {other}; drop confidence",
                                "confidence")
        return level

    def evaluate(self, exp, results):
        measured = metric_value(results, exp.scheme, exp.metric)
        if isinstance(exp.threshold, dict):
            rhs = exp.threshold
            other = metric_value(results, rhs["scheme"], rhs["metric"])
            if other is None:
                return Outcome(False, f"{rhs['metric']} of {rhs['scheme']} was not computed, so it cannot be compared")
            threshold = other * rhs["times"] + rhs["plus"]
            against = describe_rhs(exp.metric, rhs, other, threshold)
        else:
            threshold, against = exp.threshold, fmt(exp.threshold)
        if measured is None:
            return Outcome(False, f"{exp.metric} of {exp.scheme} was not computed (null); enable it in evaluation")
        if isinstance(measured, float) and math.isnan(measured):
            return Outcome(False, f"{exp.metric} of {exp.scheme} is NaN", measured)
        if "confidence" in exp.options:
            return self._with_confidence(exp, results, measured, against)
        ok = OPERATORS[exp.op](measured, threshold)
        margin = threshold - measured if exp.op in ("<", "<=") else measured - threshold
        return Outcome(ok, f"{exp.metric} of {exp.scheme} = {fmt(measured)} {'' if ok else 'is not '}{exp.op} {against}"
                           f" (margin {fmt(margin)})", measured)

    @staticmethod
    def _with_confidence(exp, results, measured, against) -> Outcome:
        """Decide on the one-sided bound of D = lhs - rhs (rhs = other * times + plus, or a number): its
        standard error comes from the per-unit influences, paired unit by unit against another scheme."""
        level = exp.options["confidence"]
        z, pct = statistics.z_value(level), f"{100 * level:g}%"
        value, influence = unit_values(results, exp.scheme, exp.metric)
        if value is None:
            return Outcome(False, influence, measured)
        paired = isinstance(exp.threshold, dict)
        if paired:
            rhs = exp.threshold
            other, other_influence = unit_values(results, rhs["scheme"], rhs["metric"])
            if other is None:
                return Outcome(False, other_influence, measured)
            if len(other_influence) != len(influence):
                return Outcome(False, f"{exp.metric} of {exp.scheme} and {rhs['metric']} of {rhs['scheme']} were "
                                      f"measured on {len(influence)} and {len(other_influence)} units: no paired "
                                      "difference", measured)
            threshold = other * rhs["times"] + rhs["plus"]
            influence = [a - rhs["times"] * b for a, b in zip(influence, other_influence)]
        else:
            threshold = exp.threshold
        units = "items" if exp.metric.startswith("tasks.") else "windows"
        ddof = 0 if units == "items" else 1       # items: binomial and McNemar; windows: as ppl_stderr
        n = len(influence)
        if n <= ddof:
            return Outcome(False, f"{exp.metric} of {exp.scheme} was measured on {n} {units[:-1]}: no spread to take "
                                  f"a {pct} bound from; evaluate more tokens", measured)
        mean_i = sum(influence) / n
        sd = math.sqrt(sum((v - mean_i) ** 2 for v in influence) / (n - ddof))
        se = sd / math.sqrt(n)
        difference = value - threshold
        verdict = statistics.decide(difference, se, exp.op, z)
        upper = exp.op in ("<", "<=")
        # A pass shows the bound on the far side of op; a failure the near one, which is already out of reach.
        side = "upper" if upper == (verdict != "fail") else "lower"
        bound = difference + (z if side == "upper" else -z) * se
        op = _negated(exp.op) if verdict == "fail" else exp.op
        if paired:
            head = (f"{exp.metric} of {exp.scheme} = {fmt(measured)} vs {against}: difference {fmt(difference)}, "
                    f"{pct} {side} bound {fmt(bound)}")
            rel = f"{op} 0" if verdict != "inconclusive" else f"is not {op} 0"
            detail = f" (paired over {n} {units}, se {fmt(se)})"
        else:
            head = f"{exp.metric} of {exp.scheme} = {fmt(measured)}, {pct} {side} bound {fmt(threshold + bound)}"
            rel = f"{op} {against}" if verdict != "inconclusive" else f"is not {op} {against}"
            detail = f" (se {fmt(se)} over {n} {units})"
        if verdict == "pass":
            return Outcome(True, f"{head} {rel}{detail}", measured)
        if verdict == "fail":
            return Outcome(False, f"{head} {rel}{detail}: fails at {pct}", measured)
        needed = statistics.units_needed(sd, difference, z)
        more = "evaluate more tokens" if units == "windows" else "score more items"
        settle = (f"{needed} {units} needed at this spread, {n} evaluated" if needed is not None
                  else f"the estimate sits on the threshold: no number of {units} settles it")
        return Outcome(False, f"{head} {rel}{detail}: inconclusive at {pct}: {more} ({settle})", measured,
                       inconclusive=True)


def _negated(op: str) -> str:
    return {"<": ">=", "<=": ">", ">": "<=", ">=": "<"}[op]


def describe_rhs(metric: str, rhs: dict, other, threshold) -> str:
    """The right-hand side as computed: 'fp32's 0.941667 - 0.05 = 0.891667', 'ppl of fp32 (5.62)'."""
    if rhs["times"] == 1 and rhs["plus"] == 0:
        return f"{rhs['metric']} of {rhs['scheme']} ({fmt(other)})"
    named = f"{rhs['scheme']}'s" + ("" if rhs["metric"] == metric else f" {rhs['metric']}")
    text = f"{named} {fmt(other)}"
    if rhs["times"] != 1:
        text += f" \u00d7 {fmt(rhs['times'])}"
    if rhs["plus"] != 0:
        text += f" {'-' if rhs['plus'] < 0 else '+'} {fmt(abs(rhs['plus']))}"
    return f"{text} = {fmt(threshold)}"


class Grid(Check):
    """``{check: grid, scheme: q, range: [-7, 7]}``: the codes' min and max are exactly the range."""

    name = "grid"
    keys = frozenset({"check", "scheme", "range", "xfail"})

    def parse(self, item, ctx, spec, xfail):
        check_keys(item, self.keys, ctx, "check: grid")
        rng = item.get("range")
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
            raise ctx.error("check: grid needs range: [min, max] of integer codes, e.g. [-7, 7]", "range")
        names = scheme_names(item, "scheme", ctx, spec.schemes)
        if item.get("scheme") == "*":
            names = [s for s in names if spec.schemes[s].method != "float"]
        for s in names:
            if spec.schemes[s].method == "float":
                raise ctx.error(f"check: grid on {s!r}, a float scheme: it has no integer codes to check; "
                                "name an integer scheme", "scheme")
        return [Expectation(self.name, ctx.line(), s, options={"range": list(rng)}, xfail=xfail) for s in names]

    def evaluate(self, exp, results):
        codes = results["results"][exp.scheme].get("codes")
        lo, hi = exp.options["range"]
        if not codes:
            return Outcome(False, f"{exp.scheme} has no integer codes (a float scheme?): nothing to check against [{lo}, {hi}]")
        ok = codes["min"] == lo and codes["max"] == hi
        return Outcome(ok, f"codes of {exp.scheme} span [{codes['min']}, {codes['max']}]"
                           f"{'' if ok else ', expected exactly'} [{lo}, {hi}]", [codes["min"], codes["max"]])


class ParetoFrontier(Check):
    """``{check: pareto_frontier, schemes: [a, b]}``: each listed scheme is on the bytes/ppl frontier."""

    name = "pareto_frontier"
    keys = frozenset({"check", "schemes", "ppl_rtol", "xfail"})

    def parse(self, item, ctx, spec, xfail):
        check_keys(item, self.keys, ctx, "check: pareto_frontier")
        if len(spec.schemes) < 2:
            raise ctx.error("check: pareto_frontier needs at least two schemes in the spec: a frontier of one scheme "
                            "always holds it; add schemes to compare against", "check")
        names = scheme_names(item, "schemes", ctx, spec.schemes)
        # Schemes whose perplexities differ by less than ppl_rtol are equally good: FP16 or INT8 landing
        # 0.01% below FP32 by rounding luck does not push FP32 off the frontier.
        rtol = get_value(item, "ppl_rtol", float, 0.001, ctx, "check: pareto_frontier",
                         check=lambda v: 0 <= v < 1, fix="ppl_rtol is a relative tolerance, e.g. 0.001")
        return [Expectation(self.name, ctx.line(), s, options={"schemes": [s], "ppl_rtol": rtol}, xfail=xfail)
                for s in names]

    def evaluate(self, exp, results):
        rtol = exp.options["ppl_rtol"]
        frontier = pareto_frontier(results, ppl_rtol=rtol)
        ok = exp.scheme in frontier
        return Outcome(ok, f"{exp.scheme} is {'' if ok else 'not '}on the bytes/ppl Pareto frontier with perplexities "
                           f"within {rtol:g} counted equal (frontier: {', '.join(frontier)})", frontier)


class Health(Check):
    """``{check: health, scheme: q, max_damp: 0.1}``: no RTN fallback, calibration seen, damping bounded,
    calibration windows distinct (``allow_duplicate_windows: true`` lifts the last)."""

    name = "health"
    keys = frozenset({"check", "scheme", "max_damp", "allow_rtn_fallback", "require_calibration_tokens",
                      "allow_duplicate_windows", "xfail"})

    def parse(self, item, ctx, spec, xfail):
        check_keys(item, self.keys, ctx, "check: health")
        opts = {"max_damp": get_value(item, "max_damp", float, None, ctx, "check: health", check=lambda v: v > 0,
                                      fix="max_damp bounds the damping GPTQ may raise to, e.g. 0.1"),
                "allow_rtn_fallback": get_value(item, "allow_rtn_fallback", bool, False, ctx, "check: health"),
                "require_calibration_tokens": get_value(item, "require_calibration_tokens", bool, True, ctx, "check: health"),
                "allow_duplicate_windows": get_value(item, "allow_duplicate_windows", bool, False, ctx, "check: health")}
        names = [s for s in scheme_names(item, "scheme", ctx, spec.schemes)
                 if spec.schemes[s].method == "gptq" or item.get("scheme") != "*"]
        for s in names:
            cfg = spec.schemes[s]
            if cfg.method != "gptq":
                raise ctx.error(f"check: health on {s!r}, {A_METHOD[cfg.method]} scheme, always holds: only GPTQ calibrates, "
                                "falls back to RTN or raises damping; name a method: gptq scheme", "scheme")
            if opts["max_damp"] is not None and opts["max_damp"] < cfg.damp:
                raise ctx.error(f"max_damp {opts['max_damp']:g} is below the damp {cfg.damp:g} that {s!r} starts from, "
                                f"so the check always fails; use max_damp >= {cfg.damp:g}", "max_damp")
        if not names:
            raise ctx.error("check: health with scheme '*' found no method: gptq scheme to check; add one or drop it",
                            "scheme")
        return [Expectation(self.name, ctx.line(), s, options=opts, xfail=xfail) for s in names]

    def evaluate(self, exp, results):
        events = [e for e in results.get("health", []) if e.get("scheme") == exp.scheme]
        problems = []
        if not exp.options["allow_rtn_fallback"]:
            problems += [f"{e['layer']} fell back to RTN ({e.get('detail', '')})" for e in events if e["event"] == "rtn_fallback"]
        if exp.options["require_calibration_tokens"]:
            problems += [f"{e['layer']} saw no calibration tokens" for e in events if e["event"] == "no_calibration_tokens"]
        problems += [f"{e['layer']}: NaN ({e.get('detail', '')})" for e in events if e["event"] == "nan"]
        if not exp.options.get("allow_duplicate_windows"):
            problems += [e.get("detail", "") for e in events if e["event"] == "duplicate_calibration_windows"]
        max_damp = exp.options["max_damp"]
        if max_damp is not None:
            layers = results["results"][exp.scheme].get("layers") or {}
            problems += [f"{name} needed damp {info['damp']:.3g} > {max_damp:g}" for name, info in layers.items()
                         if info.get("damp") is not None and info["damp"] > max_damp]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            return Outcome(False, f"{exp.scheme} is unhealthy: {shown}", problems)
        return Outcome(True, f"{exp.scheme}: no layer fell back to RTN, every layer saw calibration tokens"
                             + (f", damping stayed <= {max_damp:g}" if max_damp is not None else ""), [])


HELDOUT_METRICS = ("mean_heldout_rel_loss", "quantize_seconds")   # what calibration.heldout_samples changes


class _OverSweep(Check):
    """What monotone, spread and best share: a metric of one scheme read at every value of the spec's sweep."""

    constant = ""   # what the check is on a series that never moves

    def _parse_common(self, item, ctx, spec) -> dict:
        check_keys(item, self.keys, ctx, f"check: {self.name}")
        if spec.sweep is None:
            raise ctx.error(f"check: {self.name} needs a sweep in the spec (e.g. sweep: {{calibration.samples: [4, 16, 64]}})",
                            "check")
        over = item.get("over", spec.sweep[0])
        if over != spec.sweep[0]:
            raise ctx.error(f"over: {over!r} does not match the spec's sweep key {spec.sweep[0]!r}", "over")
        if not is_metric(item.get("metric")):
            raise ctx.error(f"check: {self.name} needs metric, one of {', '.join(METRICS)}", "metric")
        check_metric(item["metric"], ctx, spec)
        if over == "calibration.heldout_samples" and item["metric"] not in HELDOUT_METRICS:
            raise ctx.error(f"{item['metric']} does not depend on calibration.heldout_samples (held-out windows are only "
                            f"measured, never fitted): over this sweep use {' or '.join(HELDOUT_METRICS)}", "metric")
        return {"over": over}

    def schemes(self, item, ctx, spec) -> list:
        """The schemes the sweep moves: '*' keeps those, a named one that it cannot move is refused."""
        names = scheme_names(item, "scheme", ctx, spec.schemes)
        if item.get("scheme") == "*":
            names = [s for s in names if spec.moved_by_sweep(s, item["metric"])]
        for s in names:
            if not spec.moved_by_sweep(s, item["metric"]):
                raise ctx.error(f"check: {self.name} of {s!r} over {spec.sweep[0]} is {self.constant} by construction: "
                                f"{A_METHOD[spec.schemes[s].method]} scheme draws no calibration data, so every sweep point "
                                "reuses one result; name a method: gptq scheme", "scheme")
        return names

    @staticmethod
    def series(exp: Expectation, results):
        """(sweep values, the metric at each) or (None, None) when the run has no such sweep."""
        sweep = next((s for s in results.get("sweeps", []) if s["key"] == exp.options["over"]), None)
        if sweep is None:
            return None, None
        return sweep["values"], [resolve(point.get(exp.scheme, {}), exp.metric) for point in sweep["results"]]


class Monotone(_OverSweep):
    """``{check: monotone, metric: m, scheme: q, direction: decreasing, slack: 0.01}`` over the sweep."""

    name = "monotone"
    keys = frozenset({"check", "metric", "scheme", "over", "xfail", "direction", "slack"})

    constant = "true"

    def parse(self, item, ctx, spec, xfail):
        opts = self._parse_common(item, ctx, spec)
        if opts["over"] == "seed":
            raise ctx.error("check: monotone over seed compares unrelated draws (a seed is a label, not a size); "
                            "use check: spread over a seed sweep", "check")
        if opts["over"] == "calibration.dataset":
            raise ctx.error("check: monotone over calibration.dataset orders corpora by name, which means nothing; "
                            "use check: best (one corpus better than every other by a margin)", "check")
        if list(spec.sweep[1]) != sorted(spec.sweep[1]):
            raise ctx.error(f"check: monotone reads the sweep in the order written; list the {opts['over']} values in "
                            f"increasing order, e.g. {sorted(spec.sweep[1])}", "check")
        opts["direction"] = get_value(item, "direction", str, "decreasing", ctx, "check: monotone",
                                      check=lambda v: v in ("decreasing", "increasing"), fix="use decreasing or increasing")
        opts["slack"] = get_value(item, "slack", float, 0.0, ctx, "check: monotone",
                                  check=lambda v: v >= 0, fix="slack is a relative tolerance >= 0")
        return [Expectation(self.name, ctx.line(), s, item["metric"], options=opts, xfail=xfail)
                for s in self.schemes(item, ctx, spec)]

    def evaluate(self, exp, results):
        xs, ys = self.series(exp, results)
        if xs is None or any(y is None for y in (ys or [None])):
            return Outcome(False, f"{exp.metric} of {exp.scheme} over {exp.options['over']} was not recorded")
        slack, falling = exp.options["slack"], exp.options["direction"] == "decreasing"
        worst = None
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            step = (y1 - y0) if falling else (y0 - y1)      # > 0 is a step the wrong way
            allowed = slack * abs(y0)
            if step > allowed and (worst is None or step - allowed > worst[0]):
                worst = (step - allowed, x0, y0, x1, y1)
        series = ", ".join(f"{x}: {fmt(y)}" for x, y in zip(xs, ys))
        if worst:
            _, x0, y0, x1, y1 = worst
            return Outcome(False, f"{exp.metric} of {exp.scheme} is not {exp.options['direction']} over {exp.options['over']}"
                                  f" (slack {slack:g}): {fmt(y0)} at {x0} -> {fmt(y1)} at {x1}; series {series}", ys)
        return Outcome(True, f"{exp.metric} of {exp.scheme} is {exp.options['direction']} over {exp.options['over']}: {series}", ys)


class Spread(_OverSweep):
    """``{check: spread, metric: ppl, scheme: q, "<=": 0.5}``: max - min over the sweep."""

    name = "spread"
    keys = frozenset({"check", "metric", "scheme", "over", "xfail", "<=", "<"})

    constant = "0"

    def parse(self, item, ctx, spec, xfail):
        opts = self._parse_common(item, ctx, spec)
        ops = [k for k in ("<=", "<") if k in item]
        if len(ops) != 1 or isinstance(item[ops[0]], bool) or not isinstance(item[ops[0]], (int, float)):
            raise ctx.error("check: spread needs one bound, e.g. '<=': 0.5 (max - min over the sweep)")
        bound = number(item[ops[0]], ctx, ops[0], f"the spread bound after {ops[0]!r}")
        if bound < 0 or (bound == 0 and ops[0] == "<"):
            raise ctx.error(f"spread {ops[0]} {bound:g} can never hold: a spread (max - min) is >= 0; "
                            "use '<=' with a bound >= 0", ops[0])
        return [Expectation(self.name, ctx.line(), s, item["metric"], ops[0], bound, options=opts, xfail=xfail)
                for s in self.schemes(item, ctx, spec)]

    def evaluate(self, exp, results):
        xs, ys = self.series(exp, results)
        if xs is None or any(y is None for y in (ys or [None])):
            return Outcome(False, f"{exp.metric} of {exp.scheme} over {exp.options['over']} was not recorded")
        spread = max(ys) - min(ys)
        ok = OPERATORS[exp.op](spread, exp.threshold)
        return Outcome(ok, f"spread (max - min) of {exp.metric} of {exp.scheme} over {len(ys)} values of {exp.options['over']}"
                           f" = {fmt(spread)} {'' if ok else 'is not '}{exp.op} {fmt(exp.threshold)}"
                           f" (margin {fmt(exp.threshold - spread)})", spread)


class Best(_OverSweep):
    """``{check: best, metric: ppl, scheme: q, at: shakespeare, by: 0.05}``: over the sweep, the metric at
    ``at`` beats its value at every other sweep value by at least the relative margin ``by`` (lower is
    better; ``direction: highest`` for accuracies)."""

    name = "best"
    keys = frozenset({"check", "metric", "scheme", "over", "xfail", "at", "by", "direction"})

    constant = "false"

    def parse(self, item, ctx, spec, xfail):
        opts = self._parse_common(item, ctx, spec)
        if "at" not in item or item["at"] not in spec.sweep[1]:
            raise ctx.error(f"check: best needs at: one of the sweep's values ({', '.join(map(str, spec.sweep[1]))})",
                            "at" if "at" in item else "check")
        opts["at"] = item["at"]
        opts["by"] = get_value(item, "by", float, 0.0, ctx, "check: best", check=lambda v: v >= 0,
                               fix="by is a relative margin >= 0, e.g. 0.05 for 5%")
        opts["direction"] = get_value(item, "direction", str, "lowest", ctx, "check: best",
                                      check=lambda v: v in ("lowest", "highest"), fix="use lowest or highest")
        return [Expectation(self.name, ctx.line(), s, item["metric"], options=opts, xfail=xfail)
                for s in self.schemes(item, ctx, spec)]

    def evaluate(self, exp, results):
        xs, ys = self.series(exp, results)
        if xs is None or exp.options["at"] not in xs or any(y is None for y in (ys or [None])):
            return Outcome(False, f"{exp.metric} of {exp.scheme} over {exp.options['over']} was not recorded")
        at, by, lowest = exp.options["at"], exp.options["by"], exp.options["direction"] == "lowest"
        best = ys[xs.index(at)]
        # The relative advantage over each other value: > 0 when ``at`` is better.
        gains = {x: ((y - best) if lowest else (best - y)) / abs(best) if best else float("inf")
                 for x, y in zip(xs, ys) if x != at}
        runner_up = min(gains, key=gains.get)
        series = ", ".join(f"{x}: {fmt(y)}" for x, y in zip(xs, ys))
        ok = gains[runner_up] >= by
        return Outcome(ok, f"{exp.metric} of {exp.scheme} at {at} = {fmt(best)} {'is' if ok else 'is not'} "
                           f"{exp.options['direction']} by {by:.1%} over {exp.options['over']}: the closest, "
                           f"{runner_up}, is {gains[runner_up]:+.1%} {'worse' if gains[runner_up] >= 0 else 'better'} "
                           f"(margin {gains[runner_up] - by:+.1%}); series {series}", gains[runner_up])


CHECKS = {c.name: c for c in (Compare(), Grid(), ParetoFrontier(), Health(), Monotone(), Spread(), Best())}


def parse_expectations(items, ctx: Ctx, spec: SpecView) -> list:
    """The spec's ``expect:`` list -> Expectations, each validated by its check."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise ctx.error("expect must be a list of assertions, each starting with '- '", "expect")
    out = []
    for i, item in enumerate(items):
        line = items.item_lines[i] if isinstance(items, LocatedList) else None
        if not isinstance(item, dict):
            raise SpecError("each expectation must be a mapping, e.g. {metric: ppl_gap, scheme: int4-g64, '<': 0.15}",
                            ctx.source, line)
        ictx = Ctx(ctx.source, item, "expect")
        xfail = item.get("xfail")
        if xfail is not None and not isinstance(xfail, str):
            raise ictx.error("xfail must be a sentence saying why the assertion is expected to fail", "xfail")
        name = item.get("check", "compare")
        if name not in CHECKS:
            raise ictx.error(f"unknown check {name!r}; use one of {', '.join(n for n in CHECKS if n != 'compare')} "
                             "(or omit check for a metric comparison)", "check")
        out.extend(CHECKS[name].parse(item, ictx, spec, xfail))
    return out


def check(exp: Expectation, results, spec) -> Outcome:
    """Evaluate one expectation. Never raises for a missing metric: that is a failed outcome."""
    where = f"{spec.source}:{exp.line}" if exp.line else spec.source
    outcome = CHECKS[exp.kind].evaluate(exp, results)
    outcome.message = f"{where}: {outcome.message}"
    return outcome
