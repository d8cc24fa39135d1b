"""Reading a run's results: scheme order, the perplexity gap, usability, the size/perplexity Pareto
frontier and dominance, and pairing a GPTQ scheme with its RTN twin.

Every function takes the results.json shape (a dict loaded from disk, or a ``RunResult``, which is a
mapping over that shape), so the checks and the report answer the same questions the same way.
A missing piece makes a function return None or leave a scheme out; it never raises.
"""
from __future__ import annotations

import math
import numbers

from quantlab.metrics import ppl_gap


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def scheme_results(results) -> dict:
    return results.get("results") or {}


def scheme_meta(results, scheme) -> dict:
    """The scheme's description: method, bits, granularity, group_size, symmetric, grid."""
    return (results.get("schemes") or {}).get(scheme) or {}


def scheme_method(results, scheme):
    return scheme_meta(results, scheme).get("method")


def scheme_order(results) -> list:
    """Schemes from largest to smallest model, then by name: a stable order whatever the key order
    of the dict (results.json is written with sorted keys)."""
    def key(name):
        size = scheme_results(results)[name].get("bytes_total")
        return (0 if is_number(size) else 1, -(size if is_number(size) else 0), name)

    return sorted(scheme_results(results), key=key)


def gap_of(results, scheme):
    """The scheme's recorded ppl_gap, else computed from its and the baseline's ppl."""
    r = scheme_results(results).get(scheme) or {}
    if is_number(r.get("ppl_gap")):
        return r["ppl_gap"]
    base = scheme_results(results).get(results.get("baseline")) or {}
    return ppl_gap(r.get("ppl"), base.get("ppl"))


def usable(results, scheme) -> bool:
    """A scheme can be compared and shipped: finite ppl and size, and no NaN in its outputs."""
    r = scheme_results(results)[scheme]
    return is_number(r.get("ppl")) and is_number(r.get("bytes_total")) and not r.get("nan_count")


def pareto_frontier(results, ppl_rtol: float = 0.0) -> list:
    """Schemes no other scheme dominates, ordered by bytes_total. A dominates B when A has at most B's
    bytes and a perplexity lower than B's by more than ``ppl_rtol`` (relative; 0 = any amount, with a
    tie going to the smaller scheme). Schemes with a NaN, or a null ppl or size, are left out."""
    points = {s: (r["bytes_total"], r["ppl"]) for s, r in scheme_results(results).items() if usable(results, s)}
    frontier = [s for s, p in points.items() if not any(dominates(q, p, ppl_rtol) for q in points.values())]
    return sorted(frontier, key=lambda s: (points[s], s))


def dominates(a, b, ppl_rtol: float = 0.0) -> bool:
    """Point a = (bytes, ppl) dominates point b."""
    if ppl_rtol > 0:
        return a[0] <= b[0] and a[1] < b[1] * (1 - ppl_rtol)
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def dominator(results, scheme, frontier):
    """The smallest frontier scheme that dominates ``scheme``."""
    r = scheme_results(results)[scheme]
    point = (r["bytes_total"], r["ppl"])
    for f in frontier:
        q = scheme_results(results)[f]
        if dominates((q["bytes_total"], q["ppl"]), point):
            return f
    return None


def same_grid_rtn(results, gptq_scheme):
    """The RTN scheme quantizing to the same grid as ``gptq_scheme``, if the run has one."""
    grid_keys = ("bits", "granularity", "group_size", "symmetric", "grid")
    target = scheme_meta(results, gptq_scheme)
    if target.get("bits") is None:
        return None  # without its grid described, no pairing can be trusted
    for s in scheme_order(results):
        meta = scheme_meta(results, s)
        if meta.get("method") == "rtn" and all(meta.get(k) == target.get(k) for k in grid_keys):
            return s
    return None
